"""The enclave domain: attestation, admission (validation, policy, budget), decryption of the
totals, the release pipeline and the ledger. It imports ``core`` only; its measured image is
this folder plus ``core/``."""

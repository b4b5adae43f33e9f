"""The platform verifier domain (simulated): it measures the enclave image before launch, holds
the attestation signing key (the enclave never has it), publishes its JWKS and issues tokens
only for the enclave it launched. It imports ``core`` only."""

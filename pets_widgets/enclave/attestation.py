"""What the enclave attests to, and the quotes that prove it to a site.

The measurement stands in for an MRENCLAVE: a hash of every file the enclave runs (its own
folder and ``core/``, the only code it imports) and of the policy it enforces, so a site that
approved one measurement refuses an enclave whose code or rules were changed.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace
from pathlib import Path

from pets_widgets.core.policy import Policy
from pets_widgets.core.signing import SigningKey, VerifyKey
from pets_widgets.core.wire import Quote

#: Folders of the package whose source files make up the enclave's measured code: the
#: enclave's own folder and everything it imports (``core``, which imports nothing else).
MEASURED_FOLDERS = ("enclave", "core")


def measured_files() -> list[Path]:
    """Every source file of the measured folders, in a fixed order."""
    package = Path(__file__).resolve().parent.parent
    return sorted(path for folder in MEASURED_FOLDERS
                  for path in (package / folder).rglob("*.py"))


@functools.cache
def code_measurement() -> str:
    """SHA-256 over the enclave's folder and ``core/`` (a stand-in for an MRENCLAVE): each
    file's path inside the package and its bytes, so adding, removing or changing any file
    the enclave runs changes the measurement."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in measured_files():
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def expected_measurement(policy: Policy) -> str:
    """The measurement an enclave running this code with this policy reports: what a site's
    governance approves."""
    return hashlib.sha256(f"{code_measurement()}:{policy.hash}".encode()).hexdigest()


class Attestor:
    """Signs quotes of the enclave's measurement and Paillier key (the CPU's attestation key
    stand-in). It never sees a query or a total."""

    def __init__(self, key_fingerprint: str):
        self._platform_key = SigningKey()
        self.key_fingerprint = key_fingerprint

    @property
    def platform_key(self) -> VerifyKey:
        """The public half sites pin to check quotes."""
        return self._platform_key.public

    def quote(self, nonce: str, policy: Policy) -> Quote:
        """A signed quote answering ``nonce``; the measurement is computed afresh from
        ``policy``, so a policy changed after start-up is seen by every site."""
        quote = Quote(expected_measurement(policy), nonce, self.key_fingerprint, policy.hash)
        return replace(quote, signature=self._platform_key.sign(quote.body()))

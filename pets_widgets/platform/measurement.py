"""The enclave image digest: what a site's governance approves.

The digest covers the bytes of every file the enclave runs (its own folder and ``core/``, the
only code it imports), the policy it will enforce and the data dictionary, so changing one byte
of any of them changes the digest. The files are read at each launch, not once per process, so
a file edited after the package was imported is seen by the next launch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pets_widgets.core.policy import Policy
from pets_widgets.core.schema import dictionary_digest

#: Folders of the package whose source files make up the enclave's code: the enclave's own
#: folder and everything it imports (``core``, which imports nothing else of ours).
MEASURED_FOLDERS = ("enclave", "core")
PACKAGE = Path(__file__).resolve().parent.parent


def measured_files() -> list[Path]:
    """Every source file of the measured folders, in a fixed order."""
    return sorted(path for folder in MEASURED_FOLDERS
                  for path in (PACKAGE / folder).rglob("*.py"))


def code_digest() -> str:
    """SHA-256 over each measured file's path inside the package and its bytes, read now:
    adding, removing or changing any file the enclave runs changes it."""
    digest = hashlib.sha256()
    for path in measured_files():
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def image_digest(code: str, policy: Policy, dictionary: str, debug: bool = False) -> str:
    """The image digest (``sha256:...``) of an enclave running ``code`` with ``policy`` and
    the data dictionary whose digest is ``dictionary``; a debug build has another digest
    (so approving a production image never approves its debug build)."""
    image: dict[str, object] = {"code": code, "policy": policy.hash, "dictionary": dictionary}
    if debug:
        image["debug"] = True
    text = json.dumps(image, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def expected_image_digest(policy: Policy | None = None, dictionary: str | None = None,
                          debug: bool = False) -> str:
    """The digest of the installed enclave code with ``policy`` (the default one when None)
    and the dictionary (the shipped one when None), a debug build when ``debug``: what
    ``attest digest`` prints."""
    return image_digest(code_digest(), policy or Policy(), dictionary or dictionary_digest(),
                        debug)

"""Private keys kept in PEM files that only their owner can read: a site's signing key, the
platform verifier's attestation key. Each party calls this for its own key only."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography.hazmat.primitives import serialization

from pets_widgets.core.errors import ConfigError

K = TypeVar("K")


def load_or_create(path: Path, kind: type, generate: Callable[[], K], what: str) -> K:
    """The key of type ``kind`` in ``path`` (unencrypted PKCS#8 PEM), or a new one from
    ``generate`` written there with mode 0600 (an existing file is never overwritten).

    Raises :class:`ConfigError` naming ``what`` (the configuration key) for a file that
    cannot be read or created, is not a PEM private key, or holds another kind of key.
    """
    try:
        if path.exists():
            try:
                key: Any = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError):
                raise ConfigError(f"{what}: {path} is not an unencrypted PEM private key") \
                    from None
            if not isinstance(key, kind):
                raise ConfigError(f"{what}: {path} holds another kind of key "
                                  f"({kind.__name__} expected)")
            return cast(K, key)
        new = generate()
        private: Any = new  # a cryptography private key: it serialises itself
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return new
    except OSError as exc:
        raise ConfigError(f"{what}: {path} cannot be read or created "
                          f"({type(exc).__name__})") from None

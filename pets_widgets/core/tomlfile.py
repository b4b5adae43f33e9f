"""Reading an operator's TOML configuration: the file, its tables, and its paths.

Shared by the site's and the enclave's configurations (each domain reads its own file with
these helpers; neither imports the other). Every error is a :class:`ConfigError` naming the
file and the key, and saying what the key allows.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pets_widgets.core.errors import ConfigError

#: What an environment variable's name may be (configurations name variables, never tokens).
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def read_toml(path: str | os.PathLike[str], file_name: str,
              what: str) -> tuple[dict[str, Any], Path]:
    """The parsed TOML of ``path`` (``path/file_name`` for a folder) and its absolute path;
    ``what`` names the kind of file in errors ("site configuration")."""
    try:
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / file_name
    except (OSError, ValueError, TypeError):
        raise ConfigError(f"{path!r}: not a {what} path") from None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read ({type(exc).__name__})") from None
    return data, path.resolve()


def table(data: Mapping[str, Any], key: str, label: str,
          required: bool = False) -> Mapping[str, Any]:
    """The sub-table ``[key]`` (empty when absent and not ``required``)."""
    value = data.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{label}: needs a [{key}] table")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{label}: {key} must be a table ([{key}])")
    return value


def known(data: Mapping[str, Any], allowed: Sequence[str], label: str, where: str) -> None:
    """Refuse keys a table does not have (a typo must not silently fall back to a default)."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{label}: {where} has unknown keys {unknown}; allowed: "
                          f"{list(allowed)}")


def config_path(value: object, key: str, base: Path, label: str) -> Path:
    """A configured path made absolute: a relative one must stay inside ``base``."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ConfigError(f"{label}: {key} must be a file path")
    given = Path(value).expanduser()
    if given.is_absolute():
        return given
    resolved = (base / given).resolve()
    if not resolved.is_relative_to(base.resolve()):
        raise ConfigError(f"{label}: {key} leaves the configuration's folder; give a path "
                          "inside it, or an absolute path")
    return resolved


def tls_files(data: Mapping[str, Any], base: Path, label: str) -> dict[str, Path | None]:
    """A ``[service]`` table's ``certfile``, ``keyfile`` (TLS, together) and ``client_ca``
    (mutual TLS, which needs TLS)."""
    files = {key: None if data.get(key) is None
             else config_path(data[key], f"service.{key}", base, label)
             for key in ("certfile", "keyfile", "client_ca")}
    if (files["certfile"] is None) != (files["keyfile"] is None):
        raise ConfigError(f"{label}: service.certfile and service.keyfile go together (TLS)")
    if files["client_ca"] is not None and files["certfile"] is None:
        raise ConfigError(f"{label}: service.client_ca needs TLS (certfile and keyfile)")
    return files


def service_limits(data: Mapping[str, Any], label: str, deadline: float,
                   max_body: int) -> tuple[float, int]:
    """A ``[service]`` table's ``deadline`` (seconds of work per request) and ``max_body``
    (bytes), the given defaults when absent."""
    seconds = data.get("deadline", deadline)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
            0 < seconds <= 3600):
        raise ConfigError(f"{label}: service.deadline must be seconds, more than 0 and at "
                          "most 3600")
    size = data.get("max_body", max_body)
    if isinstance(size, bool) or not isinstance(size, int) or not 2**10 <= size <= 2**30:
        raise ConfigError(f"{label}: service.max_body must be bytes, from 1024 to 2**30")
    return float(seconds), size


def site_names(value: object, label: str, key: str) -> tuple[str, ...]:
    """The study's site names as a data dictionary lists them: a list of distinct names."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(s, str) and s.strip() for s in value)):
        raise ConfigError(f"{label}: {key} must be a list of the study's site names")
    names = tuple(s.strip() for s in value)
    if len(set(names)) != len(names):
        raise ConfigError(f"{label}: {key} must list each site once")
    return names


def toml_literal(value: object) -> str:
    """A TOML literal: JSON's strings, numbers and arrays are TOML's too."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)

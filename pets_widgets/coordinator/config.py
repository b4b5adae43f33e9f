"""Federation configuration files (TOML): which sites, where, with which data.

Example (``examples/sites.toml`` is a complete one)::

    [federation]                 # optional
    key_bits = 2048              # Paillier key size (an argument to from_config wins)
    timeout = 60                 # seconds a site may take per query call (default 60)
    ledger = "ledger.sqlite"     # the audit log and budget (default: a temporary file)

    [[sites]]                    # a site service started on this machine from a source
    name = "NDRS"
    source = { kind = "synthetic", seed = 7, size = 3000 }

    [[sites]]
    name = "NORDIC"
    source = { kind = "csv", path = "registry_example.csv" }    # relative to this file

    [[sites]]                    # a site service on the registry's own machine
    name = "SIOP"
    backend = "service"
    url = "https://siop.example.org:8443/"
    token_env = "PETS_SIOP_TOKEN"     # the NAME of the variable holding the token
    verify_key = "3f1c..."            # the site's verify key, as site serve prints it
    ca_file = "siop-ca.pem"           # optional: the CA of its TLS certificate
    client_cert = "coordinator.pem"   # optional: this coordinator's certificate (mutual TLS)
    client_key = "coordinator.key.pem"

Backends: ``service`` (the default) is a site service (``python -m pets_widgets site
serve``): reached at its ``url``, or, without one, started on this machine from the entry's
``source`` or ``config`` (``kernel``, the old name, means the same). ``local`` keeps the site
in this process (a simulation, not a boundary). A site started here either names the
registry's own site configuration (``config``, see :mod:`pets_widgets.site.config`), which
decides its source, signing key, trust and floors, or gives a ``source``, from which a site
configuration is generated for this run (pinning this run's verifier, approving this code's
enclave image, default floors). ``[federation] verifier`` is a folder holding the platform
verifier's key and its published JWKS, kept across runs so that registries can pin it.

Sources: ``synthetic`` (seed, size, optional cases_per_year, loss_to_follow_up), ``csv`` and
``parquet`` (path), ``sql`` (an SQLAlchemy url, and a table or a fixed query). Paths are
relative to this file. A token never appears in the file: the file names the environment
variable that holds it. Per-site keys: ``timeout``, ``start_timeout``, ``key_file`` (where a
generated site configuration keeps the signing key) and ``population``: a CSV file of the
site's public person-years (columns ``diagnosis_year``, ``sex``, ``age_band``,
``person_years``; a ``site`` column is optional), read by the coordinator for incidence
rates. Synthetic sources come with their own; without one, rates are refused for that
federation.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pets_widgets.coordinator.service import DEFAULT_START_TIMEOUT, DEFAULT_TIMEOUT
from pets_widgets.core.errors import ConfigError
from pets_widgets.core.packing import DEFAULT_SITE_CAPACITY
from pets_widgets.core.paillier import ALLOWED_KEY_BITS
from pets_widgets.core.tomlfile import ENV_NAME, config_path
from pets_widgets.site.sources import Source, anchored, source_from_dict

BACKENDS = ("local", "service")
SITE_KEYS = ("name", "backend", "source", "config", "url", "token_env", "kernel_name",
             "timeout", "start_timeout", "key_file", "population", "verify_key", "ca_file",
             "client_cert", "client_key")
#: Keys of a ``service`` site: the coordinator holds a URL, a token's name and what it pins.
SERVICE_KEYS = ("name", "backend", "url", "token_env", "verify_key", "ca_file", "client_cert",
                "client_key", "timeout", "start_timeout", "population")
FEDERATION_KEYS = ("key_bits", "timeout", "site_capacity", "ledger", "verifier")
#: Keys of ``[enclave]``: an enclave service at ``url`` (or started here without one).
ENCLAVE_KEYS = ("backend", "url", "token_env", "ca_file", "client_cert", "client_key",
                "timeout", "start_timeout")
ENCLAVE_BACKENDS = ("local", "service")
_ENV_NAME = ENV_NAME


@dataclass(frozen=True)
class SiteConfig:
    """One site of a configuration file, validated."""

    name: str
    backend: str
    #: The site's data source, for a site configuration generated from this file; None when
    #: the registry holds its own (``config``).
    source: Source | None
    url: str | None = None
    token_env: str | None = None
    #: No longer used (site kernels are gone); accepted so old files still load.
    kernel_name: str = "python3"
    timeout: float = DEFAULT_TIMEOUT
    start_timeout: float = DEFAULT_START_TIMEOUT
    key_file: str | None = None
    #: Path of the site's public person-years CSV (absolute once parsed from a file).
    population: str | None = None
    #: The registry's own site configuration file (:mod:`pets_widgets.site.config`), as the
    #: site's machine sees it; None: one is generated from ``source`` for this run.
    config: str | None = None
    #: A ``service`` site: the hex Ed25519 key it signs with (pinned), the CA of its TLS
    #: certificate, and this coordinator's client certificate and key (mutual TLS).
    verify_key: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


@dataclass(frozen=True)
class EnclaveSettings:
    """Where the enclave runs (``[enclave]``): ``local``, an object in this process (a
    simulation; the default without the table), or ``service``: the enclave service at
    ``url`` called with the analyst's token from ``token_env``, or, without a url, one
    started on this machine by the platform verifier (the embedded default)."""

    backend: str = "local"
    url: str | None = None
    token_env: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    timeout: float = 120.0
    start_timeout: float = DEFAULT_START_TIMEOUT


@dataclass(frozen=True)
class FederationConfig:
    """A whole configuration file: its sites in order, and federation-wide settings."""

    sites: tuple[SiteConfig, ...]
    key_bits: int | None = None
    site_capacity: int = DEFAULT_SITE_CAPACITY
    path: str = "<memory>"
    #: The SQLite audit ledger (absolute once parsed from a file); None: a temporary one.
    ledger: str | None = None
    #: Folder of the platform verifier's signing key and published JWKS (kept across runs so
    #: that registries can pin it); None: a fresh verifier for this run.
    verifier: str | None = None
    enclave: EnclaveSettings = EnclaveSettings()

    @property
    def synthetic_only(self) -> bool:
        """Every site holds a seeded synthetic registry (nothing real to protect)."""
        return all(s.source is not None and s.source.kind == "synthetic" for s in self.sites)

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)


def load_config(path: str | os.PathLike[str]) -> FederationConfig:
    """Read and check a site configuration file; relative paths are made absolute."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_config(data, base=path.resolve().parent, label=str(path))


def parse_config(data: Mapping[str, Any], base: Path | None = None,
                 label: str = "<memory>") -> FederationConfig:
    """Check parsed TOML (a mapping) and build a :class:`FederationConfig`."""
    unknown = set(data) - {"federation", "sites", "enclave"}
    if unknown:
        raise ConfigError(f"{label}: unknown top-level keys {sorted(unknown)}; allowed: "
                          "[federation], [enclave] and [[sites]]")
    fed = data.get("federation", {})
    if not isinstance(fed, Mapping):
        raise ConfigError(f"{label}: [federation] must be a table")
    bad = set(fed) - set(FEDERATION_KEYS)
    if bad:
        raise ConfigError(f"{label}: [federation] has unknown keys {sorted(bad)}; allowed: "
                          f"{list(FEDERATION_KEYS)}")
    raw_sites = data.get("sites")
    if not isinstance(raw_sites, list) or not raw_sites:
        raise ConfigError(f"{label}: list at least one site as [[sites]] tables")
    default_timeout = _positive(fed.get("timeout", DEFAULT_TIMEOUT), f"{label}: timeout")
    sites = tuple(_site(raw, i, label, base, default_timeout) for i, raw in enumerate(raw_sites))
    names = [s.name for s in sites]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{label}: site names must be unique; repeated: {duplicates}")
    key_bits = fed.get("key_bits")
    if key_bits is not None and key_bits not in ALLOWED_KEY_BITS:
        raise ConfigError(f"{label}: key_bits must be one of {ALLOWED_KEY_BITS}")
    capacity = fed.get("site_capacity", DEFAULT_SITE_CAPACITY)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"{label}: site_capacity must be a positive integer")
    ledger = fed.get("ledger")
    if ledger is not None:
        if not isinstance(ledger, str) or not ledger.strip():
            raise ConfigError(f"{label}: ledger must be the path of an SQLite file")
        ledger = _inside(ledger, "ledger", base, label)
    verifier = fed.get("verifier")
    if verifier is not None:
        if not isinstance(verifier, str) or not verifier.strip():
            raise ConfigError(f"{label}: verifier must be the folder of the platform "
                              "verifier's key and JWKS")
        verifier = _inside(verifier, "verifier", base, label)
    enclave = _enclave(data.get("enclave"), label, base)
    if enclave.url is not None and (ledger is not None or key_bits is not None):
        raise ConfigError(f"{label}: [federation] ledger and key_bits belong to the enclave "
                          "service's operator when [enclave] has a url; remove them here")
    return FederationConfig(sites, key_bits, capacity, label, ledger, verifier, enclave)


def _enclave(raw: object, label: str, base: Path | None) -> EnclaveSettings:
    """The ``[enclave]`` table: where the enclave runs and how this analyst reaches it."""
    if raw is None:
        return EnclaveSettings()
    where = f"{label}: [enclave]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table")
    if "token" in raw:
        raise ConfigError(f"{where}: never put a token in the file; give the NAME of the "
                          "environment variable holding it as token_env")
    unknown = sorted(set(raw) - set(ENCLAVE_KEYS))
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; allowed: {list(ENCLAVE_KEYS)}")
    backend = raw.get("backend", "service")
    if backend not in ENCLAVE_BACKENDS:
        raise ConfigError(f"{where}: backend must be one of {list(ENCLAVE_BACKENDS)}")
    url, token_env = raw.get("url"), raw.get("token_env")
    if url is not None:
        if backend != "service" or not isinstance(url, str) or not re.match(r"^https?://",
                                                                            url):
            raise ConfigError(f"{where}: url must be \"http(s)://host:port/\" (a service)")
        if not isinstance(token_env, str) or not _ENV_NAME.fullmatch(token_env):
            raise ConfigError(f"{where}: an enclave service needs token_env, the name of the "
                              "environment variable holding your analyst token")
    elif token_env is not None or any(k in raw for k in ("ca_file", "client_cert",
                                                         "client_key")):
        raise ConfigError(f"{where}: token_env and TLS files are for an enclave service "
                          "reached by its url")
    files = {key: None if raw.get(key) is None else _inside(raw[key], key, base, where)
             for key in ("ca_file", "client_cert", "client_key")}
    return EnclaveSettings(
        backend, url, token_env, files["ca_file"], files["client_cert"], files["client_key"],
        _positive(raw.get("timeout", 120.0), f"{where}: timeout"),
        _positive(raw.get("start_timeout", DEFAULT_START_TIMEOUT), f"{where}: start_timeout"))


def _inside(value: object, key: str, base: Path | None, where: str) -> str:
    """A path of this file made absolute; a relative one may not leave the file's folder."""
    if base is None:
        return str(value)
    return str(config_path(value, key, base, where))


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _site(raw: object, index: int, label: str, base: Path | None,
          default_timeout: float) -> SiteConfig:
    where = f"{label}: site {index + 1}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where} needs a name")
    where = f"{label}: site {name!r}"
    if "token" in raw or "auth_token" in raw:
        raise ConfigError(f"{where}: never put a token in the file; put it in an environment "
                          "variable and give that variable's name as token_env")
    unknown = set(raw) - set(SITE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {list(SITE_KEYS)}")
    backend = raw.get("backend", "service")
    if backend == "gateway":
        raise ConfigError(f"{where}: the gateway backend is gone (a kernel behind a gateway "
                          "let any holder of its token run code there): run python -m "
                          "pets_widgets site serve --config site.toml on the site's machine and "
                          "list it here with backend = \"service\", url, token_env and "
                          "verify_key")
    if backend == "kernel":
        backend = "service"  # its old name: each site in its own process on this machine
    if backend not in BACKENDS:
        raise ConfigError(f"{where}: backend {backend!r} is not one of {list(BACKENDS)}")
    if backend == "service" and "url" in raw:
        return _service_site(raw, name.strip(), where, base, default_timeout)
    # A local site, or a site service started on this machine: paths are relative to this
    # file's folder.
    for key in ("token_env", "verify_key", "ca_file", "client_cert", "client_key"):
        if key in raw:
            raise ConfigError(f"{where}: {key} is for a site service reached by its url")
    site_config = raw.get("config")
    source: Source | None = None
    if site_config is not None:
        if "source" in raw or "key_file" in raw:
            raise ConfigError(f"{where}: a site with its own configuration (config) takes its "
                              "source and signing key from there; remove source and key_file")
        if not isinstance(site_config, str) or not site_config.strip():
            raise ConfigError(f"{where}: config must be the path of the site's site.toml")
        site_config = _inside(site_config, "config", base, where)
    elif "source" not in raw:
        raise ConfigError(f"{where}: needs a source table (synthetic, csv, parquet or sql), "
                          "config (the path of the registry's own site configuration) or url "
                          "(a site service)")
    else:
        try:
            source = source_from_dict(raw["source"])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if base is not None:
            source = anchored(source, base,
                              lambda path, key: config_path(path, key, base, where))
    key_file = raw.get("key_file")
    if key_file is not None:
        key_file = _inside(key_file, "key_file", base, where)
    population = raw.get("population")
    if population is not None:
        if not isinstance(population, str) or not population.strip():
            raise ConfigError(f"{where}: population must be the path of a CSV file")
        population = _inside(population, "population", base, where)
    return SiteConfig(
        name=name.strip(), backend=backend, source=source, population=population,
        timeout=_positive(raw.get("timeout", default_timeout), f"{where}: timeout"),
        start_timeout=_positive(raw.get("start_timeout", DEFAULT_START_TIMEOUT),
                                f"{where}: start_timeout"),
        key_file=key_file, config=site_config)


def _service_site(raw: Mapping[str, Any], name: str, where: str, base: Path | None,
                  default_timeout: float) -> SiteConfig:
    """A site service: its URL, the name of its token's variable, its pinned verify key and
    TLS files; no source, key file or trust anchor (those are the registry's)."""
    unknown = sorted(set(raw) - set(SERVICE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: a service site takes only {list(SERVICE_KEYS)}; "
                          f"remove {unknown} (the registry's own configuration decides them)")
    url, token_env = raw.get("url"), raw.get("token_env")
    if not isinstance(url, str) or not re.match(r"^https?://", url):
        raise ConfigError(f"{where}: a service site needs url = \"http(s)://host:port/\"")
    if not isinstance(token_env, str) or not _ENV_NAME.fullmatch(token_env):
        raise ConfigError(f"{where}: a service site needs token_env, the name of the "
                          "environment variable holding its token")
    verify_key = raw.get("verify_key")
    if not isinstance(verify_key, str) or not re.fullmatch(r"[0-9a-f]{64}", verify_key):
        raise ConfigError(f"{where}: verify_key must be the site's Ed25519 verify key, 64 hex "
                          "digits, as its registry published it (site serve prints it)")
    files: dict[str, str | None] = {}
    for key in ("ca_file", "client_cert", "client_key", "population"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{where}: {key} must be a file path")
        files[key] = None if value is None else _inside(value, key, base, where)
    if files["client_key"] is not None and files["client_cert"] is None:
        raise ConfigError(f"{where}: client_key goes with client_cert")
    return SiteConfig(
        name=name, backend="service", source=None, url=url, token_env=token_env,
        timeout=_positive(raw.get("timeout", default_timeout), f"{where}: timeout"),
        start_timeout=_positive(raw.get("start_timeout", DEFAULT_START_TIMEOUT),
                                f"{where}: start_timeout"),
        population=files["population"], verify_key=verify_key, ca_file=files["ca_file"],
        client_cert=files["client_cert"], client_key=files["client_key"])


def read_population(path: str, site: str) -> pd.DataFrame:
    """A site's public person-years from a CSV file, checked against the schema; a
    :class:`ConfigError` names the file and what is wrong (these are public numbers, so
    the message may quote them)."""
    from pets_widgets.enclave.pipeline.incidence import check_population

    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise ConfigError(f"site {site!r}: population file {path} does not exist") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"site {site!r}: population file {path} cannot be read as CSV "
                          f"({type(exc).__name__})") from None
    if "site" not in frame.columns:
        frame.insert(0, "site", site)
    elif not (frame["site"].astype(str) == site).all():
        raise ConfigError(f"site {site!r}: population file {path} holds rows of other sites")
    try:
        return check_population(frame, (site,))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"site {site!r}: population file {path}: {exc}") from None


def sites_of(names: Sequence[str], sources: Sequence[Source], backend: str,
             timeout: float = DEFAULT_TIMEOUT, enclave: str = "local") -> FederationConfig:
    """A configuration of ``backend`` sites with these names and sources (for the demo), and
    an ``enclave`` that is ``local`` or a ``service`` started here."""
    return FederationConfig(tuple(SiteConfig(n, backend, s, timeout=timeout)
                                  for n, s in zip(names, sources, strict=True)),
                            enclave=EnclaveSettings(enclave))

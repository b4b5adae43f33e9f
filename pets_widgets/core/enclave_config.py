"""The enclave operator's configuration: a TOML file the platform verifier measures and the
enclave service runs with.

It is read by two domains, each on its own: the platform verifier (``enclave serve``)
measures the policy and the dictionary into the image digest, and the enclave service takes
its ledger, key size, the sites' verify keys and its limits from it. Nothing in it comes from
an analyst::

    # enclave.toml, held by the enclave operator
    ledger = "ledger.sqlite"            # audit log, budget, stored releases, analysts' tokens
    key_bits = 2048                     # the Paillier key made at each start
    site_capacity = 4194304             # the study's public bound on any site's size
    verifier = "verifier"               # the platform verifier's folder (key, JWKS)
    population = "population.csv"       # optional: public person-years (incidence rates)
    debug = false                       # a debug build (test doors; sites refuse it)
    [dictionary]
    sites = ["NDRS", "NCI"]
    [site_keys]                         # each site's Ed25519 verify key, as its registry
    NDRS = "hex..."                     # published it
    NCI = "hex..."
    [policy]                            # any field of pets_widgets.Policy
    k = 5
    max_epsilon = 1.0
    [service]
    certfile = "server.pem"             # TLS (with keyfile); client_ca: mutual TLS
    keyfile = "server.key.pem"
    max_body = 4194304                  # the largest request body, in bytes
    deadline = 60.0                     # the most seconds one request may take

Relative paths are relative to the file's folder and must stay inside it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pets_widgets.core import schema as S
from pets_widgets.core.errors import ConfigError
from pets_widgets.core.packing import DEFAULT_SITE_CAPACITY
from pets_widgets.core.paillier import ALLOWED_KEY_BITS, DEFAULT_KEY_BITS
from pets_widgets.core.policy import Policy
from pets_widgets.core.tomlfile import (
    config_path,
    known,
    read_toml,
    service_limits,
    site_names,
    table,
    tls_files,
    toml_literal,
)

FILE_NAME = "enclave.toml"
TOP_KEYS = ("ledger", "key_bits", "site_capacity", "verifier", "population", "debug",
            "dictionary", "site_keys", "policy", "service")
SERVICE_KEYS = ("certfile", "keyfile", "client_ca", "max_body", "deadline")
POLICY_KEYS = tuple(f.name for f in fields(Policy))


@dataclass(frozen=True)
class EnclaveService:
    """How the enclave service listens (``[service]``): TLS, client certificates, limits."""

    certfile: Path | None = None
    keyfile: Path | None = None
    client_ca: Path | None = None
    #: A release's body holds every site's ciphertexts: about 1 MB at 10 sites and the
    #: policy's 20,000 cells; a larger limit only lets callers make the server buffer more.
    max_body: int = 4 * 2**20
    deadline: float = 60.0


@dataclass(frozen=True)
class EnclaveConfiguration:
    """One enclave's configuration, checked, with every path absolute."""

    sites: tuple[str, ...]
    site_keys: Mapping[str, str]
    policy: Policy
    ledger: Path
    verifier: Path
    path: Path
    key_bits: int = DEFAULT_KEY_BITS
    site_capacity: int = DEFAULT_SITE_CAPACITY
    population: Path | None = None
    debug: bool = False
    service: EnclaveService = EnclaveService()

    @property
    def schema(self) -> S.Schema:
        """The data dictionary the enclave enforces."""
        return S.Schema(self.sites)


def load_enclave_config(path: str | os.PathLike[str]) -> EnclaveConfiguration:
    """Read and check an enclave configuration; :class:`ConfigError` names the key."""
    data, path = read_toml(path, FILE_NAME, "enclave configuration")
    return parse_enclave_config(data, path)


def parse_enclave_config(data: Mapping[str, Any], path: Path) -> EnclaveConfiguration:
    label, base = str(path), path.parent
    known(data, TOP_KEYS, label, "the file")
    dictionary = table(data, "dictionary", label, required=True)
    known(dictionary, ("sites",), label, "[dictionary]")
    sites = site_names(dictionary.get("sites"), label, "dictionary.sites")
    keys = table(data, "site_keys", label, required=True)
    if set(keys) != set(sites):
        raise ConfigError(f"{label}: site_keys must give exactly one verify key per site of "
                          f"dictionary.sites ({', '.join(sites)})")
    for name, key in keys.items():
        if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ConfigError(f"{label}: site_keys.{name} must be the site's Ed25519 verify "
                              "key in hex (64 characters, as site serve prints it)")
    key_bits = data.get("key_bits", DEFAULT_KEY_BITS)
    if key_bits not in ALLOWED_KEY_BITS or isinstance(key_bits, bool):
        raise ConfigError(f"{label}: key_bits must be one of {list(ALLOWED_KEY_BITS)}")
    capacity = data.get("site_capacity", DEFAULT_SITE_CAPACITY)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"{label}: site_capacity must be a positive integer (the public "
                          "bound on any site's number of patients, the same as the sites')")
    debug = data.get("debug", False)
    if not isinstance(debug, bool):
        raise ConfigError(f"{label}: debug must be true or false")
    population = data.get("population")
    return EnclaveConfiguration(
        sites=sites, site_keys=dict(keys), policy=_policy(table(data, "policy", label), label),
        ledger=config_path(data.get("ledger", "ledger.sqlite"), "ledger", base, label),
        verifier=config_path(data.get("verifier", "verifier"), "verifier", base, label),
        path=path, key_bits=int(key_bits), site_capacity=capacity,
        population=None if population is None
        else config_path(population, "population", base, label),
        debug=debug, service=_service(table(data, "service", label), base, label))


def _policy(data: Mapping[str, Any], label: str) -> Policy:
    known(data, POLICY_KEYS, label, "[policy]")
    try:
        return Policy(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: policy: {exc}") from None


def _service(data: Mapping[str, Any], base: Path, label: str) -> EnclaveService:
    known(data, SERVICE_KEYS, label, "[service]")
    files = tls_files(data, base, label)
    default = EnclaveService()
    deadline, max_body = service_limits(data, label, default.deadline, default.max_body)
    return EnclaveService(files["certfile"], files["keyfile"], files["client_ca"], max_body,
                          deadline)


def write_enclave_config(folder: str | os.PathLike[str], *, sites: Sequence[str],
                         site_keys: Mapping[str, str], policy: Policy | None = None,
                         key_bits: int = DEFAULT_KEY_BITS,
                         site_capacity: int = DEFAULT_SITE_CAPACITY,
                         population: str | None = None, debug: bool = False,
                         ledger: str = "ledger.sqlite", verifier: str = "verifier") -> Path:
    """Write an ``enclave.toml`` in ``folder`` (as an enclave operator would) and return it;
    an existing file is never overwritten."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE_NAME
    if path.exists():
        raise ConfigError(f"{path} already exists; move it away or choose another folder")
    lines = ["# Enclave configuration: held by the enclave operator, measured by the platform",
             "# verifier (policy and dictionary are part of the image digest).",
             f"ledger = {toml_literal(ledger)}", f"key_bits = {int(key_bits)}",
             f"site_capacity = {int(site_capacity)}", f"verifier = {toml_literal(verifier)}",
             f"debug = {toml_literal(debug)}"]
    if population is not None:
        lines.append(f"population = {toml_literal(population)}")
    lines += ["", "[dictionary]", f"sites = {toml_literal(list(sites))}", "", "[site_keys]"]
    lines += [f"{toml_literal(name)} = {toml_literal(site_keys[name])}" for name in sites]
    lines += ["", "[policy]"]
    lines += [f"{k} = {toml_literal(v)}" for k, v in (policy or Policy()).to_dict().items()]
    text = "\n".join(lines) + "\n"
    parse_enclave_config(tomllib.loads(text), path.resolve())  # its own checks first
    path.write_text(text, encoding="utf-8")
    return path

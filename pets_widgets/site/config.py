"""A registry's own site configuration: a TOML file its operator writes and keeps.

Everything a site trusts and enforces comes from this file, never from the coordinator: its
name, the public bound on its size, its signing key, where its rows are, the platform
verifier it pins, the enclave images it approved, its floors and its lifetime budget::

    name = "NDRS"
    capacity = 50000                    # public bound on the site's size, used for packing
    signing_key = "signing-key.pem"     # the site's Ed25519 key (created 0600 if missing)
    budget = "site-budget.sqlite"       # the epsilon released over this site's data
    [dictionary]
    sites = ["NDRS", "NCI"]             # the study's sites, as its data dictionary lists them
    [source]                            # synthetic | csv | parquet | sql
    kind = "csv"
    path = "/data/registry.csv"
    [trust]
    verifier_jwks = "verifier-jwks.json"
    issuer = "https://verifier.pets.invalid"
    approved_images = ["sha256:..."]
    allow_debug = false
    [floor]
    k = 5
    max_epsilon = 1.0
    min_subset = 10
    lifetime_epsilon = 100.0
    allow_site_breakdown = false

Relative paths are relative to the file's folder and must stay inside it (an absolute path
may point anywhere); every error names the key that is wrong and what it allows.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pets_widgets.core import schema as S
from pets_widgets.core.errors import ConfigError
from pets_widgets.core.evidence import ISSUER
from pets_widgets.core.keyfile import load_or_create
from pets_widgets.core.packing import DEFAULT_SITE_CAPACITY
from pets_widgets.core.signing import SigningKey
from pets_widgets.core.tomlfile import (
    ENV_NAME,
    config_path,
    known,
    read_toml,
    service_limits,
    site_names,
    table,
    tls_files,
    toml_literal,
)
from pets_widgets.site.budget import SiteBudget
from pets_widgets.site.site import Site
from pets_widgets.site.sources import Source, anchored, source_from_dict
from pets_widgets.site.trust import Floors, SiteTrust

#: The file name ``site init`` writes and the site service looks for in a folder.
FILE_NAME = "site.toml"
TOP_KEYS = ("name", "capacity", "signing_key", "budget", "dictionary", "source", "trust",
            "floor", "service")
TRUST_KEYS = ("verifier_jwks", "issuer", "approved_images", "allow_debug")
SERVICE_KEYS = ("token_env", "certfile", "keyfile", "client_ca", "deadline", "max_body")
FLOOR_KEYS = tuple(f.name for f in fields(Floors))
#: The study's public bound on any one site's size, unless the site file says otherwise (the
#: same default as a federation file's ``site_capacity``: every site of a study must agree).
DEFAULT_CAPACITY = DEFAULT_SITE_CAPACITY


@dataclass(frozen=True)
class ServiceSettings:
    """How ``site serve`` runs the site service (``[service]``).

    ``token_env`` names the environment variable holding the service's token (never the
    token itself); ``certfile`` and ``keyfile`` turn on TLS and ``client_ca`` requires client
    certificates signed by that CA (mutual TLS); ``deadline`` is the most seconds the site
    spends on one request and ``max_body`` the largest request body, in bytes.
    """

    token_env: str = "PETS_SITE_TOKEN"
    certfile: Path | None = None
    keyfile: Path | None = None
    client_ca: Path | None = None
    deadline: float = 30.0
    max_body: int = 64 * 2**10


@dataclass(frozen=True)
class SiteConfiguration:
    """One registry's site configuration, checked, with every path made absolute.

    ``trust`` holds the pinned JWKS itself (read from ``verifier_jwks``), so a later change
    of that file does not change what a running site trusts.
    """

    name: str
    capacity: int
    signing_key: Path
    budget: Path
    source: Source
    trust: SiteTrust
    floors: Floors
    sites: tuple[str, ...]
    path: Path
    service: ServiceSettings = ServiceSettings()

    @property
    def schema(self) -> S.Schema:
        """The data dictionary this site enforces (the study's sites as its categories)."""
        return S.Schema(self.sites)

    @property
    def folder(self) -> Path:
        return self.path.parent


def load_site_config(path: str | os.PathLike[str]) -> SiteConfiguration:
    """Read and check a site configuration file.

    Raises :class:`ConfigError` naming the file and the key (``trust.approved_images``,
    ``floor.k``...) with what it allows. The pinned JWKS file is read now; the signing key
    and the data are not (see :func:`open_site`).
    """
    data, path = read_toml(path, FILE_NAME, "site configuration")
    return parse_site_config(data, path)


def parse_site_config(data: Mapping[str, Any], path: Path) -> SiteConfiguration:
    """Check parsed TOML of the site configuration at ``path`` (its folder anchors paths)."""
    label = str(path)
    base = path.parent
    known(data, TOP_KEYS, label, "the file")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{label}: name must be the site's name, as the dictionary lists it")
    name = name.strip()
    capacity = data.get("capacity", DEFAULT_CAPACITY)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"{label}: capacity must be a positive integer (a public bound on "
                          "the site's number of patients)")
    dictionary = table(data, "dictionary", label)
    known(dictionary, ("sites",), label, "[dictionary]")
    sites = site_names(dictionary.get("sites", [name]), label, "dictionary.sites")
    if name not in sites:
        raise ConfigError(f"{label}: dictionary.sites must list each site once, {name!r} "
                          "among them")
    try:
        source = source_from_dict(table(data, "source", label, required=True))
    except ConfigError as exc:
        raise ConfigError(f"{label}: source: {exc}") from None
    source = anchored(source, base, lambda path, key: config_path(path, key, base, label))
    return SiteConfiguration(
        name=name, capacity=capacity,
        signing_key=config_path(data.get("signing_key", "signing-key.pem"), "signing_key", base,
                          label),
        budget=config_path(data.get("budget", "site-budget.sqlite"), "budget", base, label),
        source=source, trust=_trust(table(data, "trust", label, required=True), base, label),
        floors=_floors(table(data, "floor", label), label), sites=sites, path=path,
        service=_service(table(data, "service", label), base, label))





def _trust(table: Mapping[str, Any], base: Path, label: str) -> SiteTrust:
    known(table, TRUST_KEYS, label, "[trust]")
    jwks_path = config_path(table.get("verifier_jwks"), "trust.verifier_jwks", base, label)
    try:
        jwks = json.loads(jwks_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{label}: trust.verifier_jwks: {jwks_path} does not exist; copy "
                          "the platform verifier's published JWKS there") from None
    except (ValueError, OSError):
        raise ConfigError(f"{label}: trust.verifier_jwks: {jwks_path} is not a readable JSON "
                          "file") from None
    if not _valid_jwks(jwks):
        raise ConfigError(f"{label}: trust.verifier_jwks: {jwks_path} is not the verifier's "
                          "JWKS (an object with a non-empty list of EC P-256 keys, each with "
                          "a string kid)")
    issuer = table.get("issuer", ISSUER)
    if not isinstance(issuer, str) or not issuer.strip():
        raise ConfigError(f"{label}: trust.issuer must be the verifier's issuer URL")
    images = table.get("approved_images")
    if (not isinstance(images, list)
            or not all(isinstance(i, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", i)
                       for i in images)):
        raise ConfigError(f"{label}: trust.approved_images must be a list of image digests "
                          "(\"sha256:...\"; python -m pets_widgets attest digest prints one)")
    allow_debug = table.get("allow_debug", False)
    if not isinstance(allow_debug, bool):
        raise ConfigError(f"{label}: trust.allow_debug must be true or false")
    return SiteTrust(jwks, tuple(images), issuer, allow_debug)


def _valid_jwks(jwks: object) -> bool:
    """A JWKS PyJWT reads, of ES256 (P-256) keys each named by a string ``kid``."""
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not keys:
        return False
    for key in keys:
        if not isinstance(key, dict) or not isinstance(key.get("kid"), str):
            return False
        try:
            if jwt.PyJWK.from_dict(key, algorithm="ES256").algorithm_name != "ES256":
                return False
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            return False
    return True


def _floors(table: Mapping[str, Any], label: str) -> Floors:
    known(table, FLOOR_KEYS, label, "[floor]")
    default = Floors()
    k = table.get("k", default.k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{label}: floor.k must be a positive integer (the smallest "
                          "suppression threshold this site accepts)")
    min_subset = table.get("min_subset", default.min_subset)
    if isinstance(min_subset, bool) or not isinstance(min_subset, int) or min_subset < 0:
        raise ConfigError(f"{label}: floor.min_subset must be a whole number of patients")
    numbers = {}
    for key in ("max_epsilon", "lifetime_epsilon"):
        value = table.get(key, getattr(default, key))
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not 0 < value < float("inf")):
            raise ConfigError(f"{label}: floor.{key} must be a positive number")
        numbers[key] = float(value)
    breakdown = table.get("allow_site_breakdown", default.allow_site_breakdown)
    if not isinstance(breakdown, bool):
        raise ConfigError(f"{label}: floor.allow_site_breakdown must be true or false")
    return Floors(k, numbers["max_epsilon"], min_subset, numbers["lifetime_epsilon"], breakdown)


def _service(table: Mapping[str, Any], base: Path, label: str) -> ServiceSettings:
    known(table, SERVICE_KEYS, label, "[service]")
    default = ServiceSettings()
    token_env = table.get("token_env", default.token_env)
    if not isinstance(token_env, str) or not ENV_NAME.fullmatch(token_env):
        raise ConfigError(f"{label}: service.token_env must be the NAME of an environment "
                          "variable holding the token (letters, digits, _)")
    files = tls_files(table, base, label)
    deadline, max_body = service_limits(table, label, default.deadline, default.max_body)
    return ServiceSettings(token_env, files["certfile"], files["keyfile"], files["client_ca"],
                           deadline, max_body)


# --------------------------------------------------------------------------- opening a site
def load_signing_key(path: Path) -> SigningKey:
    """The site's long-term Ed25519 key: read from ``path``, or created there (mode 0600)."""
    return SigningKey(load_or_create(path, Ed25519PrivateKey, Ed25519PrivateKey.generate,
                                     "signing_key"))


def open_site(config: SiteConfiguration) -> Site:
    """The site of ``config``: its rows loaded and checked, its key, budget, floors and trust.

    Raises :class:`DataValidationError` when the rows do not match the dictionary and
    :class:`ConfigError` for an unusable key file.
    """
    schema = config.schema
    rows = config.source.load(schema, config.name, config.capacity)
    try:
        budget = SiteBudget(config.budget, config.floors.lifetime_epsilon)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"budget: {config.budget} cannot be opened as an SQLite file "
                          f"({type(exc).__name__})") from None
    site = Site(config.name, rows, schema, config.source.population(config.name),
                config.capacity, signing_key=load_signing_key(config.signing_key),
                floors=config.floors, budget=budget)
    site.enroll(config.trust)
    return site


# --------------------------------------------------------------------------- writing one
def write_site_config(folder: str | os.PathLike[str], name: str, source: Mapping[str, Any], *,
                      sites: Sequence[str] | None = None, capacity: int = DEFAULT_CAPACITY,
                      verifier_jwks: Mapping[str, Any] | None = None, issuer: str = ISSUER,
                      approved_images: Sequence[str] = (), allow_debug: bool = False,
                      floors: Floors | None = None,
                      signing_key: str = "signing-key.pem",
                      token_env: str = "PETS_SITE_TOKEN") -> Path:
    """Write a starting site configuration (``site.toml``) in ``folder`` and return its path.

    ``source`` is the ``[source]`` table (``{"kind": "csv", "path": ...}``); ``verifier_jwks``,
    when given, is written beside it as ``verifier-jwks.json`` (what an operator copies from
    the platform). An existing ``site.toml`` is never overwritten. The key file is not
    created here: :func:`open_site` creates it (0600) the first time the site opens.
    """
    sites = list(sites or [name])
    if name not in sites or len(set(sites)) != len(sites):
        raise ConfigError(f"--sites must list each site of the study once, {name!r} among them")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError("capacity must be a positive integer")
    source_from_dict(source)  # its own checks, before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE_NAME
    if path.exists():
        raise ConfigError(f"{path} already exists; move it away or choose another folder")
    if verifier_jwks is not None:
        (folder / "verifier-jwks.json").write_text(json.dumps(verifier_jwks, indent=2) + "\n",
                                                   encoding="utf-8")
    floors = floors or Floors()
    text = _TEMPLATE.format(
        name=_toml(name), capacity=int(capacity), sites=_toml(sites),
        signing_key=_toml(signing_key),
        source="\n".join(f"{k} = {_toml(v)}" for k, v in source.items() if v is not None),
        issuer=_toml(issuer), images=_toml(list(approved_images)),
        allow_debug=_toml(allow_debug), k=floors.k, max_epsilon=_toml(floors.max_epsilon),
        min_subset=floors.min_subset, lifetime=_toml(floors.lifetime_epsilon),
        breakdown=_toml(floors.allow_site_breakdown), token_env=_toml(token_env))
    path.write_text(text, encoding="utf-8")
    return path


_toml = toml_literal


_TEMPLATE = """\
# Site configuration of registry {name}: held by the registry, never sent by a coordinator.
# Check it with:  python -m pets_widgets site check --config site.toml
name = {name}
# A public bound on the site's number of patients (it sizes the encrypted encoding).
capacity = {capacity}
# The site's Ed25519 signing key (created with mode 0600 if missing).
signing_key = {signing_key}
# The epsilon released over this site's data so far, against floor.lifetime_epsilon.
budget = "site-budget.sqlite"

[dictionary]
# The study's sites, as its data dictionary lists them.
sites = {sites}

[source]
# synthetic (seed, size) | csv or parquet (path) | sql (url, and table or query)
{source}

[trust]
# The platform verifier's public keys (JWKS), copied from the platform and pinned here.
verifier_jwks = "verifier-jwks.json"
issuer = {issuer}
# Enclave image digests this site's governance approved (python -m pets_widgets attest digest).
approved_images = {images}
# Debug enclaves (noiseless test doors) are refused unless this is true.
allow_debug = {allow_debug}

[floor]
# The least this site accepts from any enclave policy, and its own limits.
k = {k}
max_epsilon = {max_epsilon}
min_subset = {min_subset}
# Total epsilon this site lets be released over its data, ever.
lifetime_epsilon = {lifetime}
# May this site's numbers be shown on their own (grouped or filtered by site)?
allow_site_breakdown = {breakdown}

[service]
# python -m pets_widgets site serve: the NAME of the environment variable holding its token.
token_env = {token_env}
# TLS: certfile and keyfile; client_ca also requires client certificates (mutual TLS).
# certfile = "server.pem"
# keyfile = "server.key.pem"
# client_ca = "clients-ca.pem"
# The most seconds the site spends on one request, and the largest request body in bytes.
deadline = 30.0
max_body = 65536
"""

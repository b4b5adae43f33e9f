"""Runs one query across the sites: attest, compute and encrypt at each site, sum, release.

The coordinator here is untrusted: it passes specs and quotes to sites, multiplies their
ciphertexts (the homomorphic sum) and hands everything to the enclave. It never holds a
private key, a row or a plaintext aggregate.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from pets_widgets.coordinator.config import (
    FederationConfig,
    SiteConfig,
    load_config,
    read_population,
    sites_of,
)
from pets_widgets.coordinator.enclaves import (
    EnclaveProcess,
    LocalEnclave,
    Receipt,
    ServiceEnclave,
)
from pets_widgets.coordinator.service import ServiceSite, SiteProcess, close_sites, start_sites
from pets_widgets.core import schema as S
from pets_widgets.core.analyst import resolve_analyst
from pets_widgets.core.budget import Budget
from pets_widgets.core.enclave_config import write_enclave_config
from pets_widgets.core.errors import (
    AttestationError,
    ConfigError,
    DataValidationError,
    EnclaveError,
    IntegrityError,
    PetsError,
    QueryValidationError,
    SiteAttestationError,
    SiteError,
    SiteIntegrityError,
    SiteRefusal,
)
from pets_widgets.core.evidence import ISSUER
from pets_widgets.core.packing import capacity_for
from pets_widgets.core.paillier import DEFAULT_KEY_BITS, PublicKey, add_encrypted, foreground
from pets_widgets.core.policy import Policy
from pets_widgets.core.query import QuerySpec
from pets_widgets.core.release import Release
from pets_widgets.core.signing import VerifyKey
from pets_widgets.core.tomlfile import toml_literal
from pets_widgets.core.wire import AggregateRequest, EncryptedAggregate
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.enclave import Enclave
from pets_widgets.platform.measurement import expected_image_digest
from pets_widgets.platform.verifier import JWKS_FILE, PlatformVerifier
from pets_widgets.site import synthetic
from pets_widgets.site.config import (
    SiteConfiguration,
    load_signing_key,
    load_site_config,
    open_site,
    write_site_config,
)
from pets_widgets.site.site import Site
from pets_widgets.site.sources import SyntheticSource
from pets_widgets.site.trust import Floors

#: ``progress(stage, site, fraction_done)``; stage is attest, compute, encrypt (reported when
#: the site's signed, encrypted aggregate has arrived), aggregate or release.
Progress = Callable[[str, str | None, float], None]
STAGES = ("attest", "compute", "encrypt", "aggregate", "release")


class SiteBackend(Protocol):
    """What the coordinator needs from a site, wherever it runs (an object, a service)."""

    name: str
    backend: str
    verify_key: VerifyKey

    def challenge(self) -> str: ...

    def respond(self, request: AggregateRequest) -> EncryptedAggregate: ...


class LocalSite:
    """A :class:`~pets_widgets.site.site.Site` object in this process (the fast default).

    ``source`` is the data source the rows were loaded from, when there is one (sites built
    from a configuration file); test oracles rebuild pooled rows from it.
    """

    backend = "local"
    #: Sites compute and encrypt in parallel threads (gmpy2 releases the GIL while it works).
    parallel = True

    def __init__(self, site: Site, source: Any = None,
                 population: pd.DataFrame | None = None, config: Path | None = None):
        self._site = site
        self.name = site.name
        self.verify_key = site.verify_key
        self.source = source
        self._population = population
        #: The site configuration file the site was opened from.
        self.config = config

    def challenge(self) -> str:
        return self._site.challenge()

    def respond(self, request: AggregateRequest) -> EncryptedAggregate:
        return self._site.respond(request)

    def close(self) -> None:
        self._site.close()

    def status(self) -> dict[str, Any]:
        budget = self._site.budget
        return {"alive": True, "rows": self._site.rows_rounded, "state": "up", "detail": "",
                "epsilon_used": float(budget.used()), "epsilon_left": float(budget.left())}

    @property
    def population(self) -> pd.DataFrame | None:
        """Public denominators: the federation file's population CSV, else the site's own."""
        return self._population if self._population is not None else self._site.population


def aggregate(public_key: PublicKey,
              aggregates: Sequence[EncryptedAggregate]) -> list[int]:
    """The untrusted aggregator: multiply the sites' ciphertexts (adds their plaintexts)."""
    return add_encrypted(public_key, [a.ciphertexts for a in aggregates])


def as_site_error(site: str, exc: BaseException) -> SiteError:
    """Name the site in any failure it caused, keeping the failure's own class where known."""
    if isinstance(exc, SiteError):
        return exc
    if isinstance(exc, AttestationError):
        return SiteAttestationError(site, str(exc), rule=exc.rule)
    if isinstance(exc, SiteRefusal):
        return SiteError(site, f"refused: {exc}", rule=exc.rule)
    if isinstance(exc, IntegrityError):
        return SiteIntegrityError(site, str(exc))
    if isinstance(exc, PetsError):
        return SiteError(site, str(exc))
    return SiteError(site, f"{type(exc).__name__}: {exc}")


class Challenges:
    """Each site's current nonce, asked (in parallel) only when the enclave needs them, and
    handed back to the sites' caches when the enclave answered without asking the sites (a
    stored release): a nonce is never wasted, nor used twice."""

    def __init__(self, sites: Sequence[SiteBackend], report: Progress):
        self._sites, self._report = sites, report
        self._given: dict[str, str] = {}

    def __call__(self) -> dict[str, str]:
        n = len(self._sites)

        def one(i_site: tuple[int, SiteBackend]) -> tuple[str, str]:
            i, site = i_site
            self._report("attest", site.name, 0.8 * i / n)
            try:
                return site.name, site.challenge()
            except Exception as exc:
                raise as_site_error(site.name, exc) from exc

        if n > 1 and any(getattr(s, "parallel", False) for s in self._sites):
            with ThreadPoolExecutor(max_workers=n) as pool:
                self._given = dict(pool.map(one, enumerate(self._sites)))
        else:
            self._given = dict(one(pair) for pair in enumerate(self._sites))
        return dict(self._given)

    def give_back(self) -> None:
        for site in self._sites:
            nonce = self._given.get(site.name)
            if nonce is not None and hasattr(site, "give_back"):
                site.give_back(nonce)


class Federation:
    """Sites, an enclave and the coordinator between them. ``run(spec)`` releases a result.

    ``enclave`` is an :class:`~pets_widgets.enclave.enclave.Enclave` object (the in-process
    simulation: the analyst's process then holds the enclave too, so nothing stops it from
    reading the key or the ledger) or a
    :class:`~pets_widgets.coordinator.enclaves.ServiceEnclave`: the enclave service, which
    holds the key, the policy and the ledger in its own process and charges the analyst its
    token belongs to.
    """

    def __init__(self, sites: Sequence[SiteBackend], enclave: Enclave | ServiceEnclave):
        names = tuple(s.name for s in sites)
        if names != enclave.schema.sites:
            raise ValueError(f"sites {names} do not match the enclave's {enclave.schema.sites}")
        self._sites = tuple(sites)
        self.enclave = enclave
        self.schema = enclave.schema
        self._port: LocalEnclave | ServiceEnclave
        if isinstance(enclave, Enclave):
            self._port = LocalEnclave(enclave)
            for site in self._sites:
                enclave.register_site(site.name, site.verify_key)
            population = self.population()
            if not population.empty:  # public denominators only: no patient data moves
                enclave.register_population(population)
        else:
            self._port = enclave  # it holds the sites' keys and denominators itself

    def __repr__(self) -> str:
        backends = {s.backend for s in self._sites}
        where = ("enclave service at " + self.enclave.url if isinstance(self.enclave,
                                                                        ServiceEnclave)
                 else "in-process enclave: a one-process simulation")
        return (f"Federation(sites={list(self.site_names)}, backend={'/'.join(sorted(backends))},"
                f" key_bits={self.enclave.key_bits}, {where})")

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._sites)

    @property
    def policy(self) -> Policy:
        return self.enclave.policy

    @property
    def is_service(self) -> bool:
        """Whether the enclave is a service (its own process), not an object in this one."""
        return isinstance(self.enclave, ServiceEnclave)

    @property
    def ledger(self) -> audit.Ledger:
        """The in-process enclave's ledger. An enclave service keeps its ledger to itself:
        there this raises AttributeError (use :meth:`budget` and :meth:`audit_log`)."""
        if isinstance(self.enclave, ServiceEnclave):
            raise AttributeError("the ledger is inside the enclave service; this process "
                                 "sees its own budget (fed.budget()) and audit rows "
                                 "(fed.audit_log()) only")
        return self.enclave.ledger

    @property
    def analyst(self) -> str:
        """Who this process's queries are charged to: the owner of the analyst token (an
        enclave service), else the default analyst of the simulation."""
        if isinstance(self.enclave, ServiceEnclave):
            return self.enclave.analyst
        return resolve_analyst(None)

    def _analyst(self, analyst: str | None) -> str:
        """The analyst to charge: an enclave service charges its token's owner, and refuses
        any other name; the simulation plays whoever is named."""
        if isinstance(self.enclave, ServiceEnclave):
            owner = self.enclave.analyst
            if analyst is not None and analyst != owner:
                raise QueryValidationError(
                    "analyst", f"the enclave service charges the owner of this process's "
                    f"analyst token ({owner!r}); no other name can be given", [owner])
            return owner
        return resolve_analyst(analyst)

    # -- running queries ----------------------------------------------------------------------
    def run(self, spec: QuerySpec, epsilon: float = 1.0, k: int | None = None,
            analyst: str | None = None, progress: Progress | None = None) -> Release:
        """Release ``spec`` over all sites: noised at ``epsilon``, cells below ``k`` hidden.

        ``analyst`` plays another analyst in the in-process simulation; an enclave service
        charges the owner of the analyst token and refuses another name.

        Raises :class:`QueryValidationError` for bad input, :class:`QueryRefused` (or its
        :class:`BudgetExceeded`) when the enclave's policy says no, and :class:`SiteError`
        naming the site when a site fails; in every one of those cases nothing is released
        and no budget is spent, and the ledger has an audit row saying why.
        """
        with foreground():  # background precomputation waits while a query runs
            return self._run(spec, epsilon, k, analyst, progress)

    def _run(self, spec: QuerySpec, epsilon: float, k: int | None, analyst: str | None,
             progress: Progress | None) -> Release:
        report = progress or (lambda stage, site, frac: None)
        who = self._analyst(analyst)
        nonces = self._challenges(report)
        admitted = self._port.admit(spec, epsilon, self.policy.k if k is None else k, who,
                                    self.site_names, nonces)
        if isinstance(admitted, Release):
            nonces.give_back()
            report("release", None, 1.0)
            return admitted.ordered(spec.order)
        aggregates, summed = self._gather(admitted, report)
        report("release", None, 0.95)
        release = self._port.release(admitted, aggregates, summed)
        report("release", None, 1.0)
        return release.ordered(spec.order)  # the table in the order the user wrote

    def _challenges(self, report: Progress) -> Challenges:
        return Challenges(self._sites, report)

    def _gather(self, receipt: Receipt,
                report: Progress) -> tuple[list[EncryptedAggregate], list[int]]:
        """Collect every site's encrypted aggregate and sum them, or fail naming the site."""
        n = len(self._sites)

        def one(i_site: tuple[int, SiteBackend]) -> EncryptedAggregate:
            i, site = i_site
            try:
                request = AggregateRequest(receipt.spec, receipt.tokens[site.name],
                                           receipt.public_key, receipt.packing)
                report("compute", site.name, 0.8 * (i + 0.5) / n)
                aggregate = site.respond(request)
            except Exception as exc:
                raise as_site_error(site.name, exc) from exc
            if aggregate.site != site.name:
                raise SiteIntegrityError(site.name, "replied with another site's aggregate")
            report("encrypt", site.name, 0.8 * (i + 1) / n)
            return aggregate

        try:
            if n > 1 and any(getattr(s, "parallel", False) for s in self._sites):
                with ThreadPoolExecutor(max_workers=n) as pool:
                    aggregates = list(pool.map(one, enumerate(self._sites)))
            else:
                aggregates = [one(pair) for pair in enumerate(self._sites)]
        except SiteError as exc:
            self._port.abort(receipt, f"site.{exc.rule}" if exc.rule else "site", str(exc))
            raise
        report("aggregate", None, 0.85)
        try:
            summed = aggregate(receipt.public_key, aggregates)
        except IntegrityError as exc:
            self._port.abort(receipt, "integrity", str(exc))
            raise
        return aggregates, summed

    # -- what the dashboard shows ---------------------------------------------------------------
    def budget(self, analyst: str | None = None) -> Budget:
        """Epsilon spent and left for ``analyst`` (default: the current analyst; an enclave
        service answers for its token's owner only) and overall."""
        return self._port.budget(self._analyst(analyst))

    def audit_log(self, analyst: str | None = None) -> pd.DataFrame:
        """The ledger's audit rows (one analyst's when given) as a DataFrame; an enclave
        service shows the token owner's own rows only."""
        if isinstance(self.enclave, ServiceEnclave):
            analyst = self._analyst(analyst)
        rows = self._port.audit_rows(analyst)
        columns = ["id", "time", "analyst", "spec_hash", "spec_json", "sites", "epsilon_asked",
                   "epsilon_spent", "outcome", "rule", "reason"]
        return pd.DataFrame(rows, columns=columns)

    def status(self) -> pd.DataFrame:
        """Each site's backend, liveness, size (rounded to 100), state (``up``, or ``down``
        with the cause in ``detail``) and signing-key fingerprint, for the dashboard header.
        Liveness, size and budget are asked of each site (its service's ``/status``)."""
        records = []
        for site in self._sites:
            info = site.status() if hasattr(site, "status") else {"alive": None, "rows": None}
            records.append({"site": site.name, "backend": site.backend, **info,
                            "key_fingerprint": site.verify_key.fingerprint})
        return pd.DataFrame(records).set_index("site")

    def population(self) -> pd.DataFrame:
        """Public person-years denominators of every site (not patient data)."""
        frames = [p for s in self._sites if (p := getattr(s, "population", None)) is not None]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def close(self) -> None:
        """Stop the site services this process started, in parallel (local sites need
        nothing). They are also stopped at interpreter exit, and by themselves when this
        process is gone; closing twice is harmless."""
        close_sites(self._sites)
        if isinstance(self.enclave, ServiceEnclave):
            self.enclave.close()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], *,
                    ledger: audit.Ledger | str | os.PathLike[str] | None = None,
                    policy: Policy | None = None, key_bits: int | None = None,
                    site_capacity: int | None = None, debug: bool = False,
                    floors: Floors | None = None) -> Federation:
        """A federation of the sites listed in a TOML configuration file (see
        :mod:`pets_widgets.coordinator.config`), started in parallel: site services (reached
        by URL, or started on this machine) or local sites.

        ``ledger`` is the SQLite audit ledger (a temporary file when None); ``key_bits``
        overrides the file's, which defaults to 2048. Raises :class:`ConfigError` for a bad
        file, :class:`DataValidationError` for registry data that does not match the schema
        and :class:`SiteError` naming a site that cannot be started or reached.
        """
        return build_federation(load_config(path), ledger=ledger, policy=policy,
                                key_bits=key_bits, site_capacity=site_capacity, debug=debug,
                                floors=floors)

    def write_config(self, path: str | os.PathLike[str],
                     prefix: str = "PETS_DASHBOARD") -> dict[str, str]:
        """Write a federation file listing this federation's services by URL (each site's
        pinned verify key, the enclave's URL) and return the environment that file's
        ``token_env`` names refer to: how a server that started the services lets its
        notebooks' kernels reach them (``Federation.from_config``) without starting their
        own. Only for site services and an enclave service."""
        if not isinstance(self.enclave, ServiceEnclave) or not all(
                isinstance(s, ServiceSite) for s in self._sites):
            raise ConfigError("write_config needs site services and an enclave service")
        env: dict[str, str] = {}
        token_env = f"{prefix}_ANALYST_TOKEN"
        lines = ["# Written by the server that started these services; tokens are in the",
                 "# environment variables named here.", "[enclave]",
                 f"url = {toml_literal(self.enclave.url + '/')}",
                 f"token_env = {toml_literal(token_env)}", ""]
        env[token_env] = self.enclave.token
        for i, site in enumerate(self._sites):
            assert isinstance(site, ServiceSite)
            token_env = f"{prefix}_SITE_{i}_TOKEN"
            env[token_env] = site.token
            lines += ["[[sites]]", f"name = {toml_literal(site.name)}", 'backend = "service"',
                      f"url = {toml_literal(site.url + '/')}",
                      f"token_env = {toml_literal(token_env)}",
                      f"verify_key = {toml_literal(site.verify_key.to_bytes().hex())}", ""]
        Path(path).write_text("\n".join(lines), encoding="utf-8")
        return env

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def temporary_ledger() -> Path:
    """A new SQLite file for a ledger, removed (with its WAL files) at interpreter exit."""
    fd, name = tempfile.mkstemp(prefix="pets-ledger-", suffix=".sqlite")
    os.close(fd)
    path = Path(name)

    def remove() -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                Path(f"{path}{suffix}").unlink()

    atexit.register(remove)
    return path


def build_federation(config: FederationConfig, *, ledger: audit.Ledger | str | os.PathLike[str]
                     | None = None, policy: Policy | None = None, key_bits: int | None = None,
                     site_capacity: int | None = None, debug: bool = False,
                     floors: Floors | None = None,
                     state: str | os.PathLike[str] | None = None) -> Federation:
    """Start every site of ``config`` (in parallel) and return the federation.

    ``state`` is a folder that keeps, across runs, what this machine's services hold: the
    generated sites' keys and lifetime budgets, the enclave's ledger (budget, audit log,
    stored releases, analysts' tokens) and the platform verifier's key; without it each run
    starts afresh in temporary folders.

    A simulated platform verifier measures and launches the enclave (a debug build when
    ``debug``: the test doors need one) and issues its tokens. Every site is opened from a
    site configuration (:mod:`pets_widgets.site.config`): the registry's own file when the
    entry names one (``config``), which decides everything the site trusts and enforces;
    otherwise one generated for this run from the entry's source, as a registry's operator
    would write it: it pins this verifier's JWKS, approves the image digest of this code
    with ``policy`` and the shipped dictionary (computed independently of the launch),
    accepts a debug enclave only when ``debug`` is asked for here, and keeps ``floors``
    (the defaults of :class:`~pets_widgets.site.trust.Floors` when None).

    Local sites load their rows in this process; site services load them in their own
    process. If any site fails to start, the ones already started are stopped and the error
    names the site (:class:`SiteError`, or :class:`DataValidationError` for a local site's
    registry file that does not match the schema).
    """
    policy = policy or Policy()
    bits = key_bits if key_bits is not None else (config.key_bits or DEFAULT_KEY_BITS)
    capacity = site_capacity if site_capacity is not None else config.site_capacity
    schema = S.Schema(config.site_names)
    if ledger is None:
        ledger = config.ledger
    backends: list[Any] = []
    remote: list[Any] = []
    enclave: Enclave | ServiceEnclave
    state = Path(state).expanduser().resolve() if state is not None else None
    folders = _site_folders(config, state)
    if config.enclave.backend == "service":
        if isinstance(ledger, audit.Ledger):
            raise ConfigError("ledger: an enclave service opens its ledger itself; give its "
                              "path, not a Ledger object")
        enclave, jwks = _enclave_service(config, ledger, policy, bits, capacity, debug,
                                         folders, state)
        remote.append(enclave)
        issuer = ISSUER
    else:
        if ledger is None and state is not None:
            ledger = state / "ledger.sqlite"
        if not isinstance(ledger, audit.Ledger):
            ledger = audit.Ledger(Path(ledger) if ledger is not None else temporary_ledger())
        verifier = (PlatformVerifier.open(config.verifier) if config.verifier is not None
                    else PlatformVerifier())
        launched = verifier.launch(policy, schema.digest, debug=debug)
        enclave = Enclave(schema, ledger, policy, bits, capacity, issuer=launched)
        jwks, issuer = verifier.jwks(), verifier.issuer
    generated = SiteDefaults(jwks, issuer, expected_image_digest(policy, schema.digest, debug),
                             debug, floors or Floors(), capacity, schema.sites, folders)
    try:
        for sc in config.sites:
            population = (read_population(sc.population, sc.name)
                          if sc.population is not None else None)
            if sc.backend == "service" and sc.url is not None:
                service = ServiceSite(sc.name, sc.url, token_env=sc.token_env,
                                      verify_key=sc.verify_key, sites=schema.sites,
                                      ca_file=sc.ca_file, client_cert=sc.client_cert,
                                      client_key=sc.client_key, timeout=sc.timeout,
                                      start_timeout=sc.start_timeout, population=population)
                backends.append(service)
                remote.append(service)
                continue
            site_config = generated.site_config(sc)
            if sc.backend == "service":  # started here, as its operator would
                service = embedded_service(sc, site_config, population)
                backends.append(service)
                remote.append(service)
                continue
            try:
                site = open_site(site_config)
            except DataValidationError as exc:  # what leaves a site: rules and counts
                raise exc.counted() from None
            backends.append(LocalSite(site, source=site_config.source, population=population,
                                      config=site_config.path))
        start_sites(remote)
        return Federation(backends, enclave)
    except BaseException:
        close_sites(remote)
        raise


def _temporary_folder(prefix: str) -> Path:
    """A fresh folder (0700), removed with its contents at interpreter exit."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _site_folders(config: FederationConfig, state: Path | None) -> dict[str, Path]:
    """A folder for each site whose configuration this run generates: under ``state`` (its
    key and lifetime budget kept across runs), else a fresh one removed at exit. Made before
    anything starts, so an enclave started here can pin each site's verify key."""
    folders = {}
    for entry in config.sites:
        if entry.url is not None or entry.config is not None:
            continue
        if state is not None:
            folder = state / "sites" / entry.name
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            folder = _temporary_folder("pets-site-config-")
        folders[entry.name] = folder
    return folders


def _verify_key(entry: SiteConfig, folder: Path | None) -> str:
    """The hex verify key of a site of this run, as its operator publishes it."""
    if entry.url is not None:
        if entry.verify_key is None:
            raise SiteError(entry.name, "needs verify_key in the federation file")
        return entry.verify_key
    if entry.config is not None:
        path = load_site_config(entry.config).signing_key
    else:
        assert folder is not None
        path = folder / (entry.key_file or "signing-key.pem")
    return load_signing_key(path).public.to_bytes().hex()


def _enclave_service(config: FederationConfig, ledger: str | os.PathLike[str] | None,
                     policy: Policy, bits: int, capacity: int, debug: bool,
                     folders: dict[str, Path],
                     state: Path | None) -> tuple[ServiceEnclave, dict[str, Any]]:
    """The federation's enclave service and the verifier JWKS its sites pin: reached at
    ``[enclave] url``, or started here as its operators would (the embedded default).

    Started here: an ``enclave.toml`` is written in ``state/enclave`` (a fresh folder when
    ``state`` is None; there the ledger and the verifier's key are kept) with the sites' verify
    keys, ``policy``, the ledger, the key size, the public denominators), an analyst token
    is issued for this process's user with ``enclave add-analyst`` (a separate process: this
    one never opens the ledger), and ``enclave serve`` starts the platform verifier, which
    measures and launches the enclave. This process keeps only the token and the URL.
    """
    settings = config.enclave
    schema = S.Schema(config.site_names)
    if settings.url is not None:
        client = ServiceEnclave(settings.url, token_env=settings.token_env,
                                ca_file=settings.ca_file, client_cert=settings.client_cert,
                                client_key=settings.client_key, timeout=settings.timeout,
                                start_timeout=settings.start_timeout)
        if config.verifier is None:
            return client, {"keys": []}  # no site is generated here (each has its own)
        return client, json.loads((Path(config.verifier) / JWKS_FILE).read_text("utf-8"))
    if state is None:
        home = _temporary_folder("pets-enclave-")
    else:
        home = state / "enclave"
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (home / "enclave.toml").unlink(missing_ok=True)  # written anew for this run
    keys, frames = {}, []
    for sc in config.sites:
        keys[sc.name] = _verify_key(sc, folders.get(sc.name))
        population = (read_population(sc.population, sc.name) if sc.population is not None
                      else sc.source.population(sc.name) if sc.source is not None else None)
        if population is not None:
            frames.append(population)
    if frames:
        pd.concat(frames, ignore_index=True).to_csv(home / "population.csv", index=False)
    path = write_enclave_config(
        home, sites=schema.sites, site_keys=keys, policy=policy, key_bits=bits,
        site_capacity=capacity, population="population.csv" if frames else None, debug=debug,
        ledger=str(Path(ledger).resolve()) if ledger is not None else "ledger.sqlite",
        verifier=str(Path(config.verifier).resolve()) if config.verifier
        else str(state / "verifier") if state is not None else "verifier")
    # The operator's act, in its own process and at the same time as the launch.
    issuing = subprocess.Popen(
        [sys.executable, "-m", "pets_widgets", "enclave", "add-analyst", resolve_analyst(None),
         "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True)
    process = EnclaveProcess(path, debug=debug, log=home / "enclave.log")
    jwks_path = process.jwks(settings.start_timeout)
    out, err = issuing.communicate()
    if jwks_path is None or issuing.returncode != 0:
        process.stop()
        if issuing.returncode != 0:
            raise EnclaveError(f"no analyst token could be issued ({err.strip()[-300:]})",
                               rule="token")
        raise EnclaveError(f"it stopped while starting ({process.describe()})", rule="start")
    client = ServiceEnclave("", token=out.strip(), timeout=settings.timeout,
                            start_timeout=settings.start_timeout, process=process)
    return client, json.loads(jwks_path.read_text("utf-8"))


def _check_member(site: SiteConfiguration, name: str, sites: tuple[str, ...],
                  capacity: int) -> None:
    """A registry's own configuration must be the site the federation lists, in the same
    study, with the same public capacity (both sides size the encoding from it)."""
    if site.name != name:
        raise SiteError(name, f"its configuration {site.path} names another site")
    if site.sites != sites:
        raise SiteError(name, "its data dictionary lists other sites than the federation's",
                        rule="dictionary")
    if site.capacity != capacity:
        raise SiteError(name, f"its capacity ({site.capacity:,}) differs from the "
                              f"federation's site_capacity ({capacity:,}); both are public "
                              "bounds and every site of a study must use the same",
                        rule="capacity")


@dataclass(frozen=True)
class SiteDefaults:
    """What a site configuration generated for one run holds: what a registry's operator
    would write after pinning this run's verifier and approving this run's enclave image."""

    jwks: dict[str, Any]
    issuer: str
    image: str
    allow_debug: bool
    floors: Floors
    capacity: int
    sites: tuple[str, ...]
    #: The folders made for the run's sites (see :func:`_site_folders`).
    folders: Mapping[str, Path] = field(default_factory=dict)

    def write(self, entry: SiteConfig) -> Path:
        """A fresh folder (removed at interpreter exit) with the site's ``site.toml``."""
        assert entry.source is not None
        folder = self.folders.get(entry.name) or _temporary_folder("pets-site-config-")
        (folder / "site.toml").unlink(missing_ok=True)  # pins this run's verifier and image
        return write_site_config(
            folder, entry.name, entry.source.to_dict(), sites=self.sites,
            capacity=self.capacity, verifier_jwks=self.jwks, issuer=self.issuer,
            approved_images=(self.image,), allow_debug=self.allow_debug, floors=self.floors,
            signing_key=entry.key_file or "signing-key.pem")

    def site_config(self, entry: SiteConfig) -> SiteConfiguration:
        """The site configuration of a site this process opens or starts: the registry's
        own file (``config``), or one written for this run; checked against the study."""
        config = load_site_config(entry.config or self.write(entry))
        _check_member(config, entry.name, self.sites, self.capacity)
        return config


def embedded_service(entry: SiteConfig, config: SiteConfiguration,
                     population: pd.DataFrame | None) -> ServiceSite:
    """A site service on 127.0.0.1 for ``entry``, started here as its operator would: the
    verify key is read from the configuration's key file (created first) and pinned, then
    ``site serve`` runs in its own process with a fresh token in its environment."""
    key = load_signing_key(config.signing_key)
    token = secrets.token_hex(16)
    process = SiteProcess(config.path, 0, token, config.service.token_env,
                          log=config.path.parent / "service.log")
    return ServiceSite(entry.name, "", token=token,
                       verify_key=key.public.to_bytes().hex(), sites=config.sites,
                       timeout=entry.timeout, start_timeout=entry.start_timeout,
                       source=config.source, population=population, process=process)


def demo_federation(seed: int = 7, n_sites: int = 2, rows_per_site: int | None = None, *,
                    key_bits: int = DEFAULT_KEY_BITS, policy: Policy | None = None,
                    ledger: str | os.PathLike[str] | None = None, backend: str = "local",
                    site_capacity: int | None = None, debug: bool = False,
                    allow_site_breakdown: bool = False,
                    floors: Floors | None = None, enclave: str | None = None,
                    state: str | os.PathLike[str] | None = None) -> Federation:
    """A federation of synthetic registries: NDRS and NCI by default, seeded and realistic.

    ``enclave`` is ``"service"`` (the default with ``backend="service"``: the platform
    verifier launches the enclave service in its own process, which holds the key, the
    policy and the ledger; this process gets an analyst token for its user) or ``"local"``
    (the default otherwise: an enclave object in this process, a simulation).

    ``backend="local"`` keeps the sites in this process; ``backend="service"`` starts each
    site as its own site service on 127.0.0.1 (``site serve``, in parallel; ``"kernel"`` is
    its old name), which generates its rows itself; both give the same rows for the same
    seed. Close a service federation with ``fed.close()`` or a ``with`` block (it is also
    closed at interpreter exit).
    ``ledger`` is the SQLite file of the audit log and budget (a temporary file when None,
    unless ``state`` names a folder that keeps the ledger, keys and budgets across runs, as
    the dashboard's server does: see :func:`build_federation`).
    Each site approves the image digest of an enclave running this code with ``policy``: a
    quietly changed policy or code is refused at attestation. ``debug=True`` launches a debug
    enclave that the sites accept (what :mod:`pets_widgets.testing` needs for exact totals);
    ``allow_site_breakdown=True`` lets the sites' numbers be shown by site (refused by
    default, by every site); ``floors`` sets every site's floors and limits at once (it wins
    over ``allow_site_breakdown``). ``site_capacity`` is the
    public bound on any site's number of patients that sizes the packing slots; by default
    the largest demo site's size rounded up to two significant figures and at least to the
    next hundred (:func:`~pets_widgets.core.packing.capacity_for`).
    """
    if backend == "kernel":
        backend = "service"  # its old name: each site in its own process
    if backend not in ("local", "service"):
        raise QueryValidationError("backend", f"{backend!r} is not available for the demo "
                                   "(sites elsewhere need a federation file: "
                                   "Federation.from_config)", ["local", "service"])
    profiles = synthetic.profiles(n_sites, rows_per_site)
    if site_capacity is None:
        site_capacity = capacity_for(max(
            rows_per_site or p.cases_per_year * synthetic.N_YEARS for p in profiles))
    sources = [SyntheticSource(seed, rows_per_site, p.cases_per_year, p.loss_to_follow_up)
               for p in profiles]
    enclave = enclave or ("service" if backend == "service" else "local")
    if enclave not in ("local", "service"):
        raise QueryValidationError("enclave", f"{enclave!r} is not an enclave backend",
                                   ["local", "service"])
    config = sites_of([p.name for p in profiles], sources, backend, enclave=enclave)
    return build_federation(config, ledger=ledger, policy=policy, key_bits=key_bits,
                            site_capacity=site_capacity, debug=debug,
                            floors=floors or Floors(allow_site_breakdown=allow_site_breakdown),
                            state=state)

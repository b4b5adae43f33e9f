"""What a registry's operator runs on the site's own machine: ``site init``, ``site check`` and
``attest verify`` (see ``python -m pets_widgets --help``).

Each returns text for the operator and an exit status. ``site check`` reads the site's rows
but reports only the rules broken, how many rows break each and the size rounded to 100:
never a row number or a value, so its output can be pasted into a ticket.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pets_widgets.core.errors import ConfigError, DataValidationError
from pets_widgets.site.config import (
    DEFAULT_CAPACITY,
    SiteConfiguration,
    load_signing_key,
    load_site_config,
    write_site_config,
)
from pets_widgets.site.trust import Check, token_checks

#: Exit statuses: all good; a check failed (data, token); the configuration is unusable.
OK, FAILED, UNUSABLE = 0, 1, 2


@dataclass
class Report:
    """Lines for the operator and the command's exit status."""

    lines: list[str] = field(default_factory=list)
    status: int = OK

    def __str__(self) -> str:
        return "\n".join(self.lines)


def parse_synthetic(text: str) -> dict[str, Any]:
    """``seed=7,size=38000`` as a synthetic ``[source]`` table; a :class:`ConfigError` names
    the bad item and the allowed keys."""
    allowed = {"seed": int, "size": int, "cases_per_year": int, "loss_to_follow_up": float}
    table: dict[str, Any] = {"kind": "synthetic"}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in allowed or not value:
            raise ConfigError(f"--synthetic: {item!r} is not key=value with a key in "
                              f"{sorted(allowed)}")
        try:
            table[key] = allowed[key](value)
        except ValueError:
            raise ConfigError(f"--synthetic: {key} must be a number") from None
    table.setdefault("seed", 7)
    return table


def init_site(folder: str | os.PathLike[str], name: str, source: Mapping[str, Any], *,
              sites: Sequence[str] | None = None, capacity: int | None = None,
              verifier_jwks: str | os.PathLike[str] | None = None,
              approved_images: Sequence[str] = ()) -> Report:
    """Write a starting ``site.toml`` and the site's signing key (0600) in ``folder``.

    ``verifier_jwks`` is the platform verifier's published JWKS file, copied beside the
    configuration; without it the operator must put one there before the site can run.
    """
    jwks = None
    if verifier_jwks is not None:
        try:
            jwks = json.loads(Path(verifier_jwks).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError(f"--verifier-jwks: {verifier_jwks} is not a readable JSON "
                              "file") from None
    if capacity is None:
        capacity = DEFAULT_CAPACITY
    path = write_site_config(folder, name, source, sites=sites, capacity=capacity,
                             verifier_jwks=jwks, approved_images=approved_images)
    key = load_signing_key(path.parent / "signing-key.pem")
    report = Report([f"wrote {path}", f"signing key {path.parent / 'signing-key.pem'} "
                     f"(mode 0600), verify key {key.public.to_bytes().hex()}",
                     f"capacity {capacity:,}: the study's public bound on any one site's "
                     "size; every site of the study must use the same"])
    if jwks is None:
        report.lines.append(f"next: copy the platform verifier's JWKS to "
                            f"{path.parent / 'verifier-jwks.json'}")
    if approved_images:
        report.lines.append("approved enclave images: " + ", ".join(approved_images)
                            + " (review them: see README, What a registry checks)")
    report.lines.append(f"then: python -m pets_widgets site check --config {path}")
    return report


def check_site(path: str | os.PathLike[str]) -> Report:
    """Validate a site configuration and the site's data, as an operator reads it."""
    report = Report()
    try:
        config = load_site_config(path)
    except ConfigError as exc:
        return Report([f"configuration: FAIL {exc}"], UNUSABLE)
    report.lines += [f"configuration: ok ({config.path})", f"site: {config.name} "
                     f"(study sites: {', '.join(config.sites)})",
                     f"capacity: {config.capacity:,} (public bound)"]
    report.lines += _key_lines(config)
    report.lines += [
        f"trust: issuer {config.trust.issuer}, {len(config.trust.verifier_jwks['keys'])} "
        f"pinned key(s), {len(config.trust.approved_images)} approved image(s), debug "
        f"enclaves {'ALLOWED' if config.trust.allow_debug else 'refused'}",
        "floors: " + ", ".join(f"{k}={v}" for k, v in config.floors.to_dict().items())]
    if not config.trust.approved_images:
        report.lines.append("warning: no enclave image is approved yet: the site answers "
                            "nothing (python -m pets_widgets attest digest prints one)")
    report.lines.append(_budget_line(config))
    try:
        rows = config.source.load(config.schema, config.name, config.capacity)
    except DataValidationError as exc:
        counted = exc.counted()
        report.status = FAILED
        report.lines.append(f"data: FAIL {config.source.describe()} breaks "
                            f"{len(counted.problems)} rule(s):")
        report.lines += [f"  - {p.describe()}" for p in counted.problems]
        return report
    except ConfigError as exc:
        return Report([*report.lines, f"data: FAIL {exc}"], UNUSABLE)
    except (OSError, ValueError) as exc:
        return Report([*report.lines, f"data: FAIL {config.source.describe()} cannot be read "
                       f"({type(exc).__name__})"], UNUSABLE)
    report.lines.append(f"data: ok, about {int(round(len(rows), -2)):,} patients "
                        f"({config.source.describe()})")
    return report


def _key_lines(config: SiteConfiguration) -> list[str]:
    key_path = config.signing_key
    if not key_path.exists():
        return [f"signing key: {key_path} is created (0600) when the site first opens"]
    try:
        key = load_signing_key(key_path)
    except ConfigError as exc:
        return [f"signing key: FAIL {exc}"]
    lines = [f"signing key: ok, fingerprint {key.public.fingerprint}"]
    if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
        lines.append(f"warning: {key_path} is readable by other users (chmod 600 it)")
    return lines


def _budget_line(config: SiteConfiguration) -> str:
    from pets_widgets.site.budget import SiteBudget

    if not config.budget.exists():
        return f"budget: none used of {config.floors.lifetime_epsilon:g} (no ledger yet)"
    budget = SiteBudget(config.budget, config.floors.lifetime_epsilon)
    return (f"budget: epsilon {float(budget.used()):g} used, {float(budget.left()):g} left "
            f"of {config.floors.lifetime_epsilon:g}")


def read_token_file(path: str | os.PathLike[str]) -> tuple[str, str | None, int | None]:
    """A token file: the JWT itself, or JSON ``{"token", "nonce", "public_key_n"}`` (the
    request a site received), as (token, nonce, key)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"{path}: not a readable token file") from None
    if not text.startswith("{"):
        return text, None, None
    try:
        data = json.loads(text)
        nonce, key = data.get("nonce"), data.get("public_key_n")
        return (str(data["token"]), None if nonce is None else str(nonce),
                None if key is None else int(key))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{path}: JSON token files hold token, and optionally nonce and "
                          "public_key_n") from None


def verify_token_file(token_file: str | os.PathLike[str], config_path: str | os.PathLike[str],
                      *, nonce: str | None = None, public_key_n: int | None = None,
                      now: float | None = None) -> Report:
    """Check a token exactly as the site of ``config_path`` would and list every check.

    The status is OK only when every check was made and passed: a check that needs the live
    request (the site's challenge, the key it would encrypt to) counts as not passed until
    they are given, in the token file or as arguments.
    """
    try:
        config = load_site_config(config_path)
        token, file_nonce, file_key = read_token_file(token_file)
    except ConfigError as exc:
        return Report([f"FAIL {exc}"], UNUSABLE)
    checks, _ = token_checks(
        token, site=config.name, nonce=nonce or file_nonce,
        public_key_n=public_key_n if public_key_n is not None else file_key,
        trust=config.trust, floors=config.floors, dictionary=config.schema.digest, now=now)
    report = Report([_line(c) for c in checks])
    passed = sum(c.passed is True for c in checks)
    report.lines.append(f"{passed} of {len(checks)} checks passed for site {config.name}")
    report.status = OK if passed == len(checks) else FAILED
    return report


def _line(check: Check) -> str:
    mark = {True: "PASS", False: "FAIL", None: "----"}[check.passed]
    return f"{mark}  {check.rule:<20} {check.message}"

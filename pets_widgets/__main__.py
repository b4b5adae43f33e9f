"""Command line (``python -m pets_widgets --help``).

``demo`` prints a released crosstab and its card; ``dashboard`` serves the dashboard with
Voila on 127.0.0.1. For a registry's operator: ``site init`` writes a starting site
configuration and key, ``site check`` validates them and the data; ``attest digest`` prints
the image digest of the installed enclave and ``attest verify`` checks a token as a site
would."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pets_widgets.core.enclave_config import EnclaveConfiguration
    from pets_widgets.enclave.ledger import Ledger


def demo(seed: int) -> None:
    import pets_widgets as pw

    fed = pw.demo_federation(seed=seed)
    print(f"{fed}: synthetic registries, about "
          + ", ".join(f"{s} {n:,}" for s, n in fed.status()["rows"].items()) + " patients\n")
    spec = pw.Crosstab(rows="tumour_group", cols="age_band", where={"sex": ["F"]})
    print(f"Query: {spec.describe()}\n")
    release = fed.run(spec, epsilon=1.0, analyst="demo")
    print(release.display_table().to_string())
    print(f"\n<{release.card.k} = hidden cell\n")
    print(release.card.describe())


def site_command(args: argparse.Namespace) -> int:
    from pets_widgets.core.errors import ConfigError
    from pets_widgets.platform.measurement import expected_image_digest
    from pets_widgets.site import operator

    if args.site_command == "serve":
        from pets_widgets.site.serve import serve

        return serve(args.config, args.host, args.port)
    if args.site_command == "check":
        report = operator.check_site(args.config)
    else:
        try:
            source = source_table(args)
            sites = ([s.strip() for s in args.sites.split(",") if s.strip()] if args.sites
                     else [args.name])
            report = operator.init_site(args.dir, args.name, source, sites=sites,
                                        capacity=args.capacity,
                                        verifier_jwks=args.verifier_jwks,
                                        approved_images=args.approve
                                        or [expected_image_digest()])
        except ConfigError as exc:
            report = operator.Report([f"error: {exc}"], operator.UNUSABLE)
    print(report)
    return report.status


def source_table(args: argparse.Namespace) -> dict[str, object]:
    """The ``[source]`` table of ``site init``'s data options (paths made absolute)."""
    from pets_widgets.core.errors import ConfigError
    from pets_widgets.site.operator import parse_synthetic

    if args.synthetic is not None:
        return parse_synthetic(args.synthetic)
    if args.csv or args.parquet:
        kind = "csv" if args.csv else "parquet"
        return {"kind": kind, "path": str(Path(args.csv or args.parquet).resolve())}
    if not args.table:
        raise ConfigError("--sql needs --table, the table holding the registry's rows")
    return {"kind": "sql", "url": args.sql, "table": args.table}


def attest_command(args: argparse.Namespace) -> int:
    if args.attest_command == "digest":
        from pets_widgets.platform.measurement import expected_image_digest

        print(expected_image_digest())
        return 0
    if args.attest_command == "jwks":
        from pets_widgets.platform.verifier import JWKS_FILE, PlatformVerifier

        verifier = PlatformVerifier.open(args.dir)
        print(f"{Path(args.dir).resolve() / JWKS_FILE}  (key {verifier.kid}, issuer "
              f"{verifier.issuer})")
        return 0
    from pets_widgets.site.operator import verify_token_file

    report = verify_token_file(args.token_file, args.config, nonce=args.nonce,
                               public_key_n=args.public_key_n)
    print(report)
    return report.status


def enclave_command(args: argparse.Namespace) -> int:
    """The enclave operator's commands (out of band: no analyst can reach them)."""
    from pets_widgets.core.enclave_config import load_enclave_config
    from pets_widgets.core.errors import ConfigError, IntegrityError

    if args.enclave_command == "serve":
        from pets_widgets.platform.launch import serve

        return serve(args.config, args.host, args.port, debug=args.debug)
    try:
        config = load_enclave_config(args.config)
        if args.enclave_command == "check":
            print(f"{config.path}: usable; sites {', '.join(config.sites)}; policy "
                  f"{config.policy.hash[:12]}; ledger {config.ledger}")
            print(config.policy.describe())
            return 0
        ledger = open_operator_ledger(config)
    except (ConfigError, IntegrityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.enclave_command == "add-analyst":
        try:
            token = ledger.add_analyst(args.name)
        except ValueError as exc:
            print(f"error: name: {exc}", file=sys.stderr)
            return 2
        print(token)
        print(f"(the token of analyst {args.name}: give it to them alone; the ledger keeps only "
              "its hash, and a new add-analyst replaces it)", file=sys.stderr)
        return 0
    if args.enclave_command == "revoke":
        if not ledger.revoke_analyst(args.name):
            print(f"error: no analyst {args.name!r} with a working token", file=sys.stderr)
            return 1
        print(f"revoked the token of {args.name}")
        return 0
    if args.enclave_command == "unlock":
        locked = ledger.meta("locked")
        if not locked:
            print("the ledger is not locked")
            return 0
        ledger.unlock()
        print(f"unlocked (the lock was: {locked})")
        return 0
    from pets_widgets.enclave.ledger import main as audit_main

    return audit_main([str(config.ledger), *(["--json"] if args.json else [])])


def open_operator_ledger(config: EnclaveConfiguration) -> Ledger:
    """The ledger of an enclave configuration, for its operator (the same policy check the
    enclave makes: a ledger created under another policy is refused)."""
    from pets_widgets.core.errors import IntegrityError
    from pets_widgets.enclave.ledger import Ledger

    ledger = Ledger(config.ledger)
    bound = ledger.meta("policy_digest")
    if bound is not None and bound != config.policy.hash:
        raise IntegrityError(f"{config.ledger} was created under another policy than this "
                             "configuration's")
    return ledger


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pets_widgets")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="print a released crosstab with its parameter card; "
                            "demo reset: remove the dashboard's demo state (budget, audit log)")
    p_demo.add_argument("action", nargs="?", choices=["reset"],
                        help="reset: start the demo over (stop the dashboard first)")
    p_demo.add_argument("--seed", type=int, default=7)
    p_dash = sub.add_parser("dashboard", help="serve the dashboard with Voila on 127.0.0.1 "
                            "and print its URL")
    p_dash.add_argument("--port", type=int, default=None,
                        help="port on 127.0.0.1 (default 8866, or a free one if taken)")
    p_dash.add_argument("--notebook", default=None, help="notebook to serve "
                        "(default notebooks/dashboard.ipynb)")
    p_dash.add_argument("--no-preheat", action="store_true",
                        help="do not keep a kernel warm for the next visitor")
    p_dash.add_argument("--config", default=None,
                        help="a TOML federation file (site services or local sites; see "
                             "examples/sites.toml) instead of the synthetic demo")
    p_site = sub.add_parser("site", help="a registry's site: write or check its configuration")
    site = p_site.add_subparsers(dest="site_command", required=True)
    p_init = site.add_parser("init", help="write a starting site.toml and signing key in DIR")
    p_init.add_argument("dir")
    p_init.add_argument("--name", required=True, help="the site's name, as the study lists it")
    data = p_init.add_mutually_exclusive_group(required=True)
    data.add_argument("--synthetic", metavar="seed=7,size=38000",
                      help="a seeded synthetic registry (keys: seed, size, cases_per_year, "
                           "loss_to_follow_up)")
    data.add_argument("--csv", metavar="FILE", help="a CSV file of the registry's rows")
    data.add_argument("--parquet", metavar="FILE", help="a Parquet file of the rows")
    data.add_argument("--sql", metavar="URL", help="an SQLAlchemy URL (with --table)")
    p_init.add_argument("--table", help="the table of --sql")
    p_init.add_argument("--sites", help="the study's sites as its data dictionary lists "
                        "them, comma-separated, --name among them (default: just --name)")
    p_init.add_argument("--capacity", type=int, help="public bound on the site's size")
    p_init.add_argument("--verifier-jwks", metavar="FILE",
                        help="the platform verifier's published JWKS, copied beside site.toml")
    p_init.add_argument("--approve", metavar="DIGEST", action="append",
                        help="an enclave image digest to approve (default: the installed "
                             "enclave with the default policy, as attest digest prints)")
    p_serve = site.add_parser("serve", help="run the site service (fixed routes GET /status "
                              "and POST /aggregate, on Kernel Gateway) until Ctrl-C")
    p_serve.add_argument("--config", required=True, metavar="SITE.toml")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=None, help="default: a free port")
    p_check = site.add_parser("check", help="validate a site configuration and its data "
                              "(rules and counts only, never rows or values)")
    p_check.add_argument("--config", required=True, metavar="SITE.toml")
    p_enclave = sub.add_parser("enclave", help="the enclave operator: serve the enclave "
                               "(launched and measured by the platform verifier), manage "
                               "analysts' tokens, unlock, audit")
    enclave = p_enclave.add_subparsers(dest="enclave_command", required=True)
    p_eserve = enclave.add_parser("serve", help="measure and launch the enclave service (routes "
                                  "/status /admit /release /budget /audit) until Ctrl-C")
    p_eserve.add_argument("--config", required=True, metavar="ENCLAVE.toml")
    p_eserve.add_argument("--host", default="127.0.0.1")
    p_eserve.add_argument("--port", type=int, default=None, help="default: a free port")
    p_eserve.add_argument("--debug", action="store_true", help="a debug build (noiseless test "
                          "door; its digest differs and sites refuse it by default)")
    for name, text in (("add-analyst", "print a new token for analyst NAME (the ledger keeps "
                        "its hash only)"), ("revoke", "stop analyst NAME's token working")):
        p_an = enclave.add_parser(name, help=text)
        p_an.add_argument("name", metavar="NAME")
        p_an.add_argument("--config", required=True, metavar="ENCLAVE.toml")
    for name, text in (("unlock", "lift the lock an integrity incident set"),
                       ("audit", "print every audit row and the budgets"),
                       ("check", "validate an enclave configuration")):
        p_op = enclave.add_parser(name, help=text)
        p_op.add_argument("--config", required=True, metavar="ENCLAVE.toml")
        if name == "audit":
            p_op.add_argument("--json", action="store_true")
    p_attest = sub.add_parser("attest", help="attestation: the enclave image digest to approve, "
                              "and a token checked as a site would")
    attest = p_attest.add_subparsers(dest="attest_command", required=True)
    attest.add_parser("digest", help="print the image digest of the installed enclave code "
                      "with the default policy and dictionary (what a site approves)")
    p_jwks = attest.add_parser("jwks", help="open (or create) the platform verifier's key in "
                               "DIR and print the path of the JWKS site operators pin")
    p_jwks.add_argument("dir", metavar="DIR")
    p_verify = attest.add_parser("verify", help="check an attestation token exactly as a site "
                                 "would; exit 0 only if every check passes")
    p_verify.add_argument("token_file", metavar="TOKEN_FILE", help="the JWT, or JSON with "
                          "token, nonce and public_key_n")
    p_verify.add_argument("--config", required=True, metavar="SITE.toml")
    p_verify.add_argument("--nonce", help="the challenge the site issued for this request")
    p_verify.add_argument("--public-key-n", type=int, help="the Paillier modulus the site "
                          "would encrypt to")
    args = parser.parse_args(argv)
    if args.command == "site":
        return site_command(args)
    if args.command == "attest":
        return attest_command(args)
    if args.command == "enclave":
        return enclave_command(args)
    if args.command == "demo" and args.action == "reset":
        from pets_widgets.coordinator.state import reset_demo

        removed = reset_demo()
        print(f"removed the demo's state in {removed}" if removed is not None
              else "the demo has no state to remove")
    elif args.command == "demo":
        demo(args.seed)
    elif args.command == "dashboard":
        from pets_widgets.ui.serve import serve

        return serve(args.notebook, args.port, preheat=not args.no_preheat,
                     config=args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

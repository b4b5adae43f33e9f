"""Command line: ``python -m pets_widgets demo`` prints a released crosstab and its card;
``python -m pets_widgets dashboard`` serves the dashboard with Voila on 127.0.0.1;
``python -m pets_widgets attest digest`` prints the image digest of the installed enclave."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pets_widgets")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="print a released crosstab with its parameter card")
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
                        help="a TOML site configuration (local, kernel or gateway sites; see "
                             "examples/sites.toml) instead of the synthetic demo")
    p_attest = sub.add_parser("attest", help="attestation: the enclave image digest to approve")
    attest = p_attest.add_subparsers(dest="attest_command", required=True)
    attest.add_parser("digest", help="print the image digest of the installed enclave code "
                      "with the default policy and dictionary (what a site approves)")
    args = parser.parse_args(argv)
    if args.command == "attest":
        from pets_widgets.platform.measurement import expected_image_digest

        print(expected_image_digest())
    elif args.command == "demo":
        demo(args.seed)
    elif args.command == "dashboard":
        from pets_widgets.ui.serve import serve

        return serve(args.notebook, args.port, preheat=not args.no_preheat,
                     config=args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

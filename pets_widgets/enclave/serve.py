"""The enclave service process, launched by the platform verifier (``enclave serve``).

Kernel Gateway's notebook-http personality serves the annotated cells of
``pets_widgets/enclave/service.ipynb`` (``GET /status``, ``POST /admit``, ``POST /release``,
``GET /budget``, ``GET /audit``) and nothing else, on the same hardened engine as the site
service (:mod:`pets_widgets.core.gateway`). A request reaches the routes only with the token
of an analyst the ledger knows (and not revoked); the kernel looks the token up again and
charges its owner. Run through ``python -m pets_widgets enclave serve``, which measures the
image first; started directly it has no verifier and answers 503.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pets_widgets.core.enclave_config import load_enclave_config
from pets_widgets.core.errors import ConfigError
from pets_widgets.core.gateway import ServiceGatewayApp, gateway_config, private_runtime, run
from pets_widgets.core.net import LOOPBACK
from pets_widgets.enclave.ledger import Ledger
from pets_widgets.enclave.service import CONFIG_ENV

#: The notebook whose annotated cells are the routes (shipped with the package).
NOTEBOOK = Path(__file__).with_name("service.ipynb")


def serve(config_path: str, host: str = LOOPBACK, port: int = 0) -> int:
    """Serve the enclave of ``config_path`` until SIGTERM; prints its URL once it answers."""
    try:
        config = load_enclave_config(config_path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ[CONFIG_ENV] = str(config.path)
    private_runtime("pets-enclave-runtime-")
    service = config.service
    scheme = "https" if service.certfile is not None else "http"
    app: Any = ServiceGatewayApp(config=gateway_config(
        NOTEBOOK, host, port, certfile=service.certfile, keyfile=service.keyfile,
        client_ca=service.client_ca))
    # The gateway's own check, before any kernel is touched: a token of a known analyst.
    tokens = Ledger(config.ledger)
    app.authorize = lambda given: tokens.analyst_for(given) is not None
    app.what, app.max_body = "enclave", service.max_body
    app.announce = f"enclave serving at {scheme}://{host}:{{port}}/"
    return run(app)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pets_widgets.enclave.serve",
                                     description="the enclave service (started by the "
                                     "platform verifier: python -m pets_widgets enclave serve)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    return serve(args.config, args.host, args.port)


if __name__ == "__main__":
    raise SystemExit(main())

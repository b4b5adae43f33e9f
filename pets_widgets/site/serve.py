"""``python -m pets_widgets site serve``: the site as a service with fixed routes.

Jupyter Kernel Gateway's notebook-http personality serves the annotated cells of
``pets_widgets/site/service.ipynb`` as ``GET /status`` and ``POST /aggregate`` and nothing
else: ``/api/kernels``, ``/api/kernelspecs`` and ``/api/sessions`` answer 404, so a client
holding the token can call the routes and cannot run code. The gateway runs in this process
with the token from the environment variable the configuration names, TLS and client
certificates when the configuration gives them, a limit on request bodies and on idle
connections, and one kernel (requests are answered one at a time, so the site's own state
needs no locking across kernels).
"""

from __future__ import annotations

import hmac
import os
import sys
from pathlib import Path
from typing import Any

from pets_widgets.core.errors import ConfigError
from pets_widgets.core.gateway import (
    PARENT_ENV,
    ServiceGatewayApp,
    gateway_config,
    private_runtime,
    run,
)
from pets_widgets.core.net import LOOPBACK, free_port
from pets_widgets.site.config import load_signing_key, load_site_config
from pets_widgets.site.service import CONFIG_ENV

__all__ = ["NOTEBOOK", "PARENT_ENV", "serve"]

#: The notebook whose annotated cells are the routes (shipped with the package).
NOTEBOOK = Path(__file__).with_name("service.ipynb")
def serve(config_path: str | os.PathLike[str], host: str = LOOPBACK,
          port: int | None = None) -> int:
    """Run the site service of ``config_path`` until Ctrl-C or SIGTERM; returns an exit code.

    Prints the URL and the site's verify key (what a coordinator's federation file pins)
    once the service answers.
    """
    try:
        config = load_site_config(config_path)
        token = os.environ.get(config.service.token_env, "")
        if len(token) < 16:
            raise ConfigError(f"service.token_env: set {config.service.token_env} to the "
                              "service's token (at least 16 characters) before starting it")
        key = load_signing_key(config.signing_key)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = free_port(host) if port is None else port  # 0: any free port, announced
    service = config.service
    scheme = "https" if service.certfile is not None else "http"
    # The site kernel inherits this process's environment: that is how it learns its
    # configuration, and the only way (no request can name a path).
    os.environ[CONFIG_ENV] = str(config.path)
    private_runtime("pets-site-runtime-")
    app: Any = ServiceGatewayApp(config=gateway_config(
        NOTEBOOK, host, port, certfile=service.certfile, keyfile=service.keyfile,
        client_ca=service.client_ca))
    expected = token.encode()
    app.authorize = lambda given: hmac.compare_digest(given.encode(), expected)
    app.what, app.max_body = "site", service.max_body
    app.announce = (f"site {config.name} serving at {scheme}://{host}:{{port}}/ "
                    f"verify key {key.public.to_bytes().hex()}")
    return run(app)

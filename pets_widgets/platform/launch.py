"""``python -m pets_widgets enclave serve``: the platform verifier launches the enclave service.

This process is the (simulated) platform: it holds the verifier's signing key, measures the
enclave image (the code, and the policy and dictionary of the enclave's configuration), and
starts the enclave service as a child process that never sees the key. The child asks for
tokens over a token service on 127.0.0.1 that only it can call (a launch secret in its
environment, compared in constant time); every token names the image measured here, so an
enclave whose code or policy changed presents a digest no site approved.

It prints, for operators: the verifier's JWKS path (what sites pin), then the enclave's URL
and image digest (what sites approve) once the enclave serves; it stops the enclave on
Ctrl-C or SIGTERM, and stops by itself when the enclave stops.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pets_widgets.core.enclave_config import EnclaveConfiguration, load_enclave_config
from pets_widgets.core.errors import ConfigError
from pets_widgets.core.evidence import AdmissionClaims
from pets_widgets.core.gateway import PARENT_ENV
from pets_widgets.core.net import LOOPBACK
from pets_widgets.core.policy import Policy
from pets_widgets.platform.verifier import JWKS_FILE, LaunchedEnclave, PlatformVerifier

#: The environment the enclave service is started with: where to ask for tokens, and the
#: file holding the secret that proves it is the enclave this verifier launched.
URL_ENV = "PETS_VERIFIER_URL"
SECRET_ENV = "PETS_VERIFIER_SECRET_FILE"
#: The largest token request the token service reads (one nonce per site of a study).
MAX_TOKEN_REQUEST = 2**20


class TokenService:
    """The verifier's token service for the one enclave it launched (127.0.0.1 only).

    ``GET /launch`` says what was measured (image digest, debug); ``POST /tokens`` signs one
    token per site, for its nonce, on one admission. Both need the launch secret.
    """

    def __init__(self, launched: LaunchedEnclave, secret: str, host: str = LOOPBACK):
        self.launched = launched
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: with Nagle's algorithm on, each
            # reply would wait for the client's delayed ACK (40 ms on Linux).
            disable_nagle_algorithm = True
            # An idle or slow connection is dropped (each holds a thread).
            timeout = 10

            def log_message(self, *args: Any) -> None:  # no request is logged
                return

            def do_GET(self) -> None:
                if not self._allowed():
                    return
                if self.path != "/launch":
                    return self._send(404, {"error": "no such route"})
                self._send(200, {"image_digest": launched.image_digest,
                                 "debug": launched.debug})

            def do_POST(self) -> None:
                if not self._allowed():
                    return
                if self.path != "/tokens":
                    return self._send(404, {"error": "no such route"})
                try:
                    size = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    size = -1
                if not 0 < size <= MAX_TOKEN_REQUEST:
                    return self._send(413, {"error": "token request too large"})
                try:
                    body = json.loads(self.rfile.read(size))
                    admission = AdmissionClaims.from_dict(body["admission"])
                    policy = Policy(**body["policy"])
                    key = int(body["public_key_n"], 16)
                    tokens = {str(site): service.launched.token(
                        audience=str(site), nonce=str(nonce), public_key_n=key,
                        admission=admission, policy=policy)
                        for site, nonce in dict(body["nonces"]).items()}
                except (KeyError, TypeError, ValueError):
                    return self._send(400, {"error": "not a token request"})
                self._send(200, {"tokens": tokens})

            def _allowed(self) -> bool:
                given = self.headers.get("Authorization", "").removeprefix("secret ")
                if hmac.compare_digest(given.encode(), secret.encode()):
                    return True
                self._send(401, {"error": "not the launched enclave"})
                return False

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="pets-verifier-tokens")

    def start(self) -> TokenService:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def launch(config: EnclaveConfiguration, *, debug: bool = False) -> tuple[PlatformVerifier,
                                                                         LaunchedEnclave]:
    """Open the verifier's folder and measure the enclave image of ``config`` now."""
    verifier = PlatformVerifier.open(config.verifier)
    return verifier, verifier.launch(config.policy, config.schema.digest,
                                     debug=debug or config.debug)


def _watch_parent(parent: int, child: subprocess.Popen[bytes]) -> None:
    """Stop the enclave once the coordinator that started this verifier is gone."""
    while child.poll() is None:
        if os.getppid() != parent:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            return
        threading.Event().wait(1.0)


def serve(config_path: str, host: str = LOOPBACK, port: int | None = None,
          debug: bool = False) -> int:
    """Run ``enclave serve``: measure, launch the enclave service, relay its announcement,
    and stop it on Ctrl-C or SIGTERM; returns its exit code."""
    try:
        config = load_enclave_config(config_path)
        verifier, launched = launch(config, debug=debug)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    jwks = config.verifier / JWKS_FILE
    print(f"verifier jwks at {jwks} issuer {verifier.issuer} kid {verifier.kid}", flush=True)
    secret = secrets.token_hex(32)
    tokens = TokenService(launched, secret).start()
    # The secret reaches the enclave in a file of a private folder, which it deletes once
    # read: not in its environment, where /proc/<pid>/environ would show it for good.
    private = tempfile.mkdtemp(prefix="pets-launch-")
    secret_file = os.path.join(private, "secret")
    descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as fh:
        fh.write(secret)
    env = {**os.environ, URL_ENV: tokens.url, SECRET_ENV: secret_file,
           PARENT_ENV: str(os.getpid())}
    child = subprocess.Popen(
        [sys.executable, "-m", "pets_widgets.enclave.serve", "--config", str(config.path),
         "--host", host, "--port", str(0 if port is None else port)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)

    def stop(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit():  # started by a coordinator: stop with it
        threading.Thread(target=_watch_parent, args=(int(parent), child), daemon=True,
                         name="pets-verifier-parent").start()
    assert child.stdout is not None
    try:
        for raw in child.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if "serving at" in line:
                line += f" image {launched.image_digest}" + (" DEBUG" if launched.debug else "")
            print(line, flush=True)
        return child.wait()
    finally:
        tokens.stop()
        shutil.rmtree(private, ignore_errors=True)
        if child.poll() is None:
            child.kill()
            child.wait(5)

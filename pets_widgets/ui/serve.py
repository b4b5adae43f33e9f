"""Serve the dashboard notebook with Voila on 127.0.0.1 and print its URL.

``python -m pets_widgets dashboard`` (and ``bash scripts/dev.sh dashboard``) runs this. Voila
listens on loopback only, never moves to another port by itself (``--Voila.port_retries=0``:
the URL printed is the URL served), keeps one kernel warm (``--preheat_kernel``) so the page
opens quickly, and is stopped with its kernels on Ctrl-C or SIGTERM. ``MPLBACKEND`` is
removed from the kernels' environment: ``Agg`` there would make figures vanish.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pets_widgets.core.net import free_port

DEFAULT_PORT = 8866
HOST = "127.0.0.1"
NOTEBOOK = Path("notebooks") / "dashboard.ipynb"


def find_notebook(path: str | os.PathLike[str] | None = None) -> Path:
    """The dashboard notebook: ``path``, else ``notebooks/dashboard.ipynb`` of this checkout
    or of the current directory."""
    candidates = ([Path(path)] if path is not None else
                  [Path(__file__).resolve().parents[1] / NOTEBOOK, Path.cwd() / NOTEBOOK])
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no dashboard notebook at {', '.join(map(str, candidates))}")


def port_is_free(port: int) -> bool:
    """Whether Voila can listen on ``port``: as Voila (tornado) binds with SO_REUSEADDR, so
    does this check, and a port left in TIME_WAIT by a dashboard just stopped is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


#: Seconds a page's kernel may sit with no browser connected before it is shut down, and how
#: often that is checked (a closed tab's kernel holds half a gigabyte).
CULL_IDLE_SECONDS, CULL_INTERVAL_SECONDS = 300, 60


def voila_command(notebook: Path, port: int, preheat: bool = True) -> list[str]:
    """The Voila command line (run in the notebook's folder): loopback only, the printed port
    only, and the kernels of closed pages culled once idle."""
    cmd = [sys.executable, "-m", "voila", "--no-browser", f"--port={port}",
           f"--Voila.ip={HOST}", "--Voila.port_retries=0",
           f"--MappingKernelManager.cull_idle_timeout={CULL_IDLE_SECONDS}",
           f"--MappingKernelManager.cull_interval={CULL_INTERVAL_SECONDS}",
           "--MappingKernelManager.cull_connected=False"]
    if preheat:
        cmd += ["--preheat_kernel=True", "--pool_size=1"]
    return [*cmd, notebook.name]


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until Voila serves its static files (polling the page would start a kernel)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"voila exited with code {proc.returncode}")
        with (contextlib.suppress(urllib.error.URLError, ConnectionError, OSError),
              urllib.request.urlopen(url + "voila/static/voila.js", timeout=2) as reply):
            if reply.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"voila did not answer on {url} within {timeout:g} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # Voila shuts its kernels down
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def serve(notebook: str | os.PathLike[str] | None = None, port: int | None = None,
          preheat: bool = True, timeout: float = 180.0, extra_args: Sequence[str] = (),
          config: str | os.PathLike[str] | None = None) -> int:
    """Start Voila on ``notebook`` at ``http://127.0.0.1:port/``, print the URL once it
    answers, and run until Ctrl-C or SIGTERM; returns Voila's exit code.

    ``config``: a site configuration file the dashboard's kernels use instead of the demo
    (passed to them as ``$PETS_SITES_CONFIG``, resolved to an absolute path). Without one,
    this process starts the demo's services once (the platform verifier with the enclave
    service, and a site service per synthetic registry, their state kept in the demo's
    state folder: :mod:`pets_widgets.coordinator.state`), and every page's kernel reaches
    those services by URL: every page load shares one ledger, budget and audit log, and the
    same question gets the same answer. They stop with this command."""
    nb = find_notebook(notebook)
    if port is None:
        port = DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port()
    elif not port_is_free(port):
        print(f"port {port} on {HOST} is in use; choose another with --port", file=sys.stderr)
        return 2
    url = f"http://{HOST}:{port}/"
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    if config is not None:
        config_path = Path(config).resolve()
        if not config_path.is_file():
            print(f"no site configuration file at {config_path}", file=sys.stderr)
            return 2
        env["PETS_SITES_CONFIG"] = str(config_path)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    services = None
    try:
        if config is None:
            services = start_services(env)
        print(f"Starting Voila on {nb.name} ...", flush=True)
        proc = subprocess.Popen([*voila_command(nb, port, preheat), *extra_args],
                                cwd=nb.parent, env=env, start_new_session=True)
    except BaseException:
        signal.signal(signal.SIGTERM, previous)
        if services is not None:
            services.close()
        raise
    try:
        wait_ready(url, proc, timeout)
        print(f"\nDashboard ready: {url}\n(open it in a browser; Ctrl-C stops it)\n", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(proc)
        if services is not None:
            services.close()


def start_services(env: dict[str, str]) -> Any:
    """Start the demo's services (enclave and sites) and point ``env`` (the kernels') at
    them: ``$PETS_SITES_CONFIG`` names the federation file, its tokens are added."""
    from pets_widgets.coordinator.federation import demo_federation
    from pets_widgets.coordinator.state import demo_state

    state = demo_state()
    print(f"Starting the enclave and site services (state in {state}) ...", flush=True)
    fed = demo_federation(backend="service", state=state)
    try:
        path = state / "federation.toml"
        env.update(fed.write_config(path))
        env["PETS_SITES_CONFIG"] = str(path)
    except BaseException:
        fed.close()
        raise
    return fed

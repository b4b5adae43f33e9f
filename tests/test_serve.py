"""``python -m pets_widgets dashboard``: Voila on 127.0.0.1, the URL printed, everything stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from pets_widgets.__main__ import main
from pets_widgets.ui import serve
from tests import voila


def test_voila_command_listens_on_loopback_and_never_moves_port():
    cmd = serve.voila_command(serve.find_notebook(), 8899)
    assert cmd[:3] == [sys.executable, "-m", "voila"]
    for flag in ("--no-browser", "--port=8899", "--Voila.ip=127.0.0.1", "--Voila.port_retries=0"):
        assert flag in cmd
    assert cmd[-1] == "dashboard.ipynb"


def test_a_taken_port_is_refused_with_a_clear_message(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["dashboard", "--port", str(port)]) == 2
    assert f"port {port}" in capsys.readouterr().err


def test_a_missing_site_configuration_is_refused_before_voila_starts(tmp_path, capsys):
    assert serve.serve(config=tmp_path / "nowhere.toml") == 2
    assert "nowhere.toml" in capsys.readouterr().err


def test_missing_notebook_names_the_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dashboard notebook"):
        serve.find_notebook(tmp_path / "nope.ipynb")


@pytest.mark.slow
def test_dashboard_command_prints_the_url_serves_and_stops_everything(tmp_path):
    port = voila.free_port()
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    env["PETS_STATE_DIR"] = str(tmp_path)  # the demo's services keep their state here
    proc = subprocess.Popen([sys.executable, "-m", "pets_widgets", "dashboard", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        line = ""
        while "Dashboard ready" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, "no URL printed"
            line = proc.stdout.readline()
        url = line.split("Dashboard ready:", 1)[1].strip()
        assert url == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url + "voila/static/voila.js", timeout=10) as reply:
            assert reply.status == 200
        time.sleep(1)
        started = voila.descendants(proc.pid)
        assert started, "voila is not running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while voila.alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not voila.alive(started), "voila or a kernel outlived the command"
        # The services it started kept their state for the next run.
        assert (tmp_path / "demo" / "enclave" / "ledger.sqlite").exists()
        assert (tmp_path / "demo" / "federation.toml").exists()
    finally:
        voila.stop_process_group(proc)
        for pid in voila.alive(started):
            os.kill(pid, signal.SIGKILL)


def test_binder_installs_the_package_and_the_readme_gives_the_voila_path():
    root = serve.find_notebook().parents[1]
    post_build = root / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK)
    text = post_build.read_text()
    assert "-c scripts/constraints.txt" in text and "MPLBACKEND=" not in text.replace(
        "Never sets MPLBACKEND", "")
    assert (root / "binder" / "runtime.txt").read_text().strip() == "python-3.11"
    readme = (root / "README.md").read_text()
    assert "urlpath=voila%2Frender%2Fnotebooks%2Fdashboard.ipynb" in readme
    assert "voila/render/notebooks/dashboard.ipynb" in readme
    for shot in ("crosstab", "histogram", "survival", "explorer", "audit"):
        assert (root / "docs" / "screenshots" / f"dashboard-{shot}.png").is_file(), shot


def test_a_port_just_released_is_free_again_and_closed_pages_kernels_are_culled():
    """Restarting on the same --port right after a stop works: the connections the last
    server closed linger in TIME_WAIT, which Voila's own bind (SO_REUSEADDR) ignores."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end stays in TIME_WAIT
    server.close()
    client.close()
    assert serve.port_is_free(port)
    cmd = serve.voila_command(serve.find_notebook(), port)
    assert f"--MappingKernelManager.cull_idle_timeout={serve.CULL_IDLE_SECONDS}" in cmd
    assert "--MappingKernelManager.cull_connected=False" in cmd

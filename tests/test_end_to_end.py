"""End to end at the default key size, and the package's import boundaries."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pets_widgets as pw


@pytest.mark.slow
def test_default_demo_federation_end_to_end_at_2048_bits(tmp_path):
    fed = pw.demo_federation(seed=7, ledger=tmp_path / "ledger.sqlite", debug=True)
    assert fed.enclave.key_bits == 2048 and fed.enclave.public_key.n.bit_length() == 2048
    assert fed.site_names == ("NDRS", "NCI")
    spec = pw.Crosstab(rows="tumour_group", cols="age_band", where={"sex": ["F"]})
    release = fed.run(spec, analyst="e2e")
    exact = pw.testing.noiseless(fed, spec)
    visible = ~release.suppressed.to_numpy()
    got = release.table.to_numpy(dtype=float, na_value=np.nan)[visible]
    want = exact.table.to_numpy(dtype=float)[visible]
    inner = np.zeros_like(visible)
    inner[:-1, :-1] = True
    interior = visible & inner
    diff = (release.table.to_numpy(dtype=float, na_value=np.nan)[interior]
            - exact.table.to_numpy(dtype=float)[interior])
    assert np.abs(diff).max() <= 12  # discrete Laplace(1): P(|X| > 12) < 1e-5 per cell
    assert got.size > 30 and np.isfinite(want).all()
    assert release.card.noise_interval_95 == 3 and release.card.budget_left == 9


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_core_imports_nothing_from_jupyter_and_not_the_test_door():
    out = _run(
        "import sys, pets_widgets as pw\n"
        "fed = pw.demo_federation(rows_per_site=300, key_bits=1024)\n"
        "fed.run(pw.Count(by=['sex']))\n"
        "bad = [m for m in ('ipywidgets', 'IPython', 'pets_widgets.testing') if m in sys.modules]\n"
        "print(bad)\n")
    assert out.strip() == "[]"


def test_the_test_door_is_only_reached_explicitly():
    out = _run("import sys, pets_widgets as pw\npw.testing\nprint('pets_widgets.testing' in "
               "sys.modules)\n")
    assert out.strip() == "True"

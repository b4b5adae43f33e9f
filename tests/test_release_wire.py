"""A Release leaves the enclave service as JSON and comes back equal: tables with their
index names, level values and dtypes, hidden cells missing, the card, curves and log-rank."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import pets_widgets as pw
from pets_widgets.core.errors import IntegrityError
from pets_widgets.core.release_wire import release_from_dict, release_to_dict

from .test_site_service import SPECS


def assert_same(back: pw.Release, release: pw.Release) -> None:
    for name in ("table", "suppressed", "lower", "upper"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(release, name), obj=name)
    assert back.card == release.card and back.spec == release.spec
    assert set(back.extras) == set(release.extras)
    if release.curves is not None:
        pd.testing.assert_frame_equal(back.curves, release.curves)
    if release.logrank is not None:
        assert back.logrank.p_value == release.logrank.p_value
        assert back.logrank.degrees_of_freedom == release.logrank.degrees_of_freedom
        pd.testing.assert_frame_equal(back.logrank.table, release.logrank.table)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_every_kind_survives_the_wire_exactly(fed2, spec):
    release = pw.testing.noiseless(fed2, spec)
    text = json.dumps(release_to_dict(release), allow_nan=False)  # strict JSON
    assert_same(release_from_dict(json.loads(text)), release)


def test_a_noisy_release_with_hidden_cells_survives_the_wire(fed2):
    release = fed2.run(pw.Crosstab(rows="tumour_group", cols="age_band",
                                   where={"diagnosis_year": (2012, 2012)}), epsilon=0.2,
                       analyst="wire")
    assert release.suppressed.to_numpy().any()
    data = json.loads(json.dumps(release_to_dict(release), allow_nan=False))
    assert_same(release_from_dict(data), release)


def test_a_malformed_release_is_an_integrity_error():
    with pytest.raises(IntegrityError, match="not a release"):
        release_from_dict({"spec": {"kind": "count"}})

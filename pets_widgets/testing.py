"""Test-only doors: exact totals, pooled rows and a seeded noise sampler.

Nothing in pets_widgets imports this module, the widgets cannot reach it, and it is the
only way to get noiseless totals or patient rows out of a federation (rows of site
services are never asked of the sites: they are rebuilt from each site's declared
source). It exists so every statistical output has an oracle: with noise off, a federated
result must equal the same computation on the pooled rows.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from fractions import Fraction

import numpy as np
import pandas as pd

from pets_widgets.coordinator.federation import Federation, LocalSite
from pets_widgets.core.query import QuerySpec
from pets_widgets.core.release import Release
from pets_widgets.core.wire import EncryptedAggregate
from pets_widgets.enclave.admission import Admission
from pets_widgets.enclave.enclave import Enclave
from pets_widgets.enclave.pipeline.noise import NoiseMechanism


def admit_exact(enclave: Enclave, spec: QuerySpec, analyst: str,
                sites: Sequence[str]) -> Admission:
    """An open admission for the exact door (see :meth:`Enclave.admit_exact`)."""
    if not enclave.debug:
        raise RuntimeError("exact totals need a debug enclave: build the federation with "
                           "demo_federation(..., debug=True) or from_config(..., debug=True)")
    return enclave.admit_exact(spec, analyst, sites)


def release_exact(enclave: Enclave, admission: Admission,
                  aggregates: Sequence[EncryptedAggregate], summed: Sequence[int]) -> Release:
    """Exact totals of verified aggregates (see :meth:`Enclave.release_exact`)."""
    return enclave.release_exact(admission, aggregates, summed)


def noiseless(fed: Federation, spec: QuerySpec) -> Release:
    """A Release from exact totals: the full encrypted pipeline (the federation's own gather
    of every site's aggregate), with no noise, no suppression and no budget. Its table is in
    the canonical (dictionary) order of ``by``, as the pandas oracles group; ``fed.run``
    returns the user's order (``release.ordered(spec.order)`` gives it here too).

    Only a debug enclave has this door (in process, or ``enclave serve --debug``): its
    tokens say so and its image digest differs, so default sites refuse it."""
    if not fed.enclave.debug:
        raise RuntimeError("exact totals need a debug enclave: build the federation with "
                           "demo_federation(..., debug=True) or from_config(..., debug=True)")
    sites = fed.site_names
    receipt = fed._port.admit_exact(spec, "pets_widgets.testing", sites,
                                    fed._challenges(lambda stage, site, frac: None))
    aggregates, summed = fed._gather(receipt, lambda stage, site, frac: None)
    return fed._port.release(receipt, aggregates, summed)


def site_rows(fed: Federation, site: object) -> pd.DataFrame:
    """One site's patient rows, for the test oracle only.

    Site services never send rows: they are rebuilt here, in the test process,
    from the site's declared source (the synthetic seed and size, the CSV or Parquet file,
    the SQL database), exactly as the site service loaded them.
    """
    source = getattr(site, "source", None)
    if source is not None:
        return source.load(fed.schema, site.name, fed.enclave.site_capacity)  # type: ignore[attr-defined]
    if isinstance(site, LocalSite):
        return site._site._rows
    raise TypeError(f"{site!r} declares no source to rebuild its rows from")


def pooled_rows(fed: Federation) -> pd.DataFrame:
    """All sites' patient rows in one DataFrame (the test oracle's input)."""
    pooled = pd.concat([site_rows(fed, site) for site in fed._sites], ignore_index=True)
    for name in fed.schema.names:
        var = fed.schema[name]
        if var.is_categorical and var.kind.value == "categorical":
            pooled[name] = pd.Categorical(pooled[name].astype(str), categories=var.categories)
    return pooled


def _bernoulli(p: Fraction, rng: random.Random) -> bool:
    return rng.randrange(p.denominator) < p.numerator


def _bernoulli_exp_le1(gamma: Fraction, rng: random.Random) -> bool:
    k = 1
    while _bernoulli(gamma / k, rng):
        k += 1
    return k % 2 == 1


def _bernoulli_exp(gamma: Fraction, rng: random.Random) -> bool:
    while gamma > 1:
        if not _bernoulli_exp_le1(Fraction(1), rng):
            return False
        gamma -= 1
    return _bernoulli_exp_le1(gamma, rng)


def discrete_laplace(scale: Fraction, rng: random.Random) -> int:
    """One exact draw with P(y) proportional to exp(-|y|/scale): Canonne, Kamath and Steinke
    (2020), Algorithms 1 and 2, in rational arithmetic."""
    scale = Fraction(scale)
    t, s = scale.numerator, scale.denominator
    while True:
        u = rng.randrange(t)
        if not _bernoulli_exp(Fraction(u, t), rng):
            continue
        v = 0
        while _bernoulli_exp(Fraction(1), rng):
            v += 1
        y = (u + t * v) // s
        b = rng.randrange(2)
        if b == 1 and y == 0:
            continue
        return -y if b else y


class SeededDiscreteLaplace:
    """The exact CKS sampler driven by ``random.Random(seed)``: reproducible, for tests only."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)
        self.name = f"discrete Laplace (CKS 2020, exact; SEEDED TEST SAMPLER, seed {seed})"

    def sample(self, values: Sequence[int], scale: Fraction) -> list[int]:
        return [int(v) + discrete_laplace(Fraction(scale), self._rng) for v in values]


def seeded_sampler(seed: int) -> SeededDiscreteLaplace:
    """A reproducible exact discrete Laplace sampler to inject with :func:`use_mechanism`."""
    return SeededDiscreteLaplace(seed)


@contextlib.contextmanager
def use_mechanism(fed: Federation, mechanism: NoiseMechanism) -> Iterator[Federation]:
    """Run ``fed``'s enclave with another noise mechanism inside the ``with`` block (the
    in-process simulation only: an enclave service draws its own noise, and no caller can
    change how)."""
    if not isinstance(fed.enclave, Enclave):
        raise RuntimeError("another noise mechanism can be injected into an in-process "
                           "enclave only; an enclave service draws its own noise")
    releaser = fed.enclave._releaser
    old = releaser.mechanism
    releaser.mechanism = mechanism
    try:
        yield fed
    finally:
        releaser.mechanism = old


def pandas_counts(rows: pd.DataFrame, by: Sequence[str]) -> np.ndarray:
    """Counts of ``rows`` in every combination of ``by`` (all categories, zeros included)."""
    if not by:
        return np.array([len(rows)])
    return rows.groupby(list(by), observed=False).size().to_numpy()

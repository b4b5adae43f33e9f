"""From decrypted totals to a Release: the noise scales, the noise, the subset rule, the tables
and the parameter card, as plain functions.

The enclave calls these on real totals; the explorer (:func:`pets_widgets.ui.explore.simulate`)
calls the same functions on public synthetic totals, so a simulation cannot disagree with a
release about how a number is noised, hidden or described.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.card import NoiseComponent, ParameterCard
from pets_widgets.core.clock import now
from pets_widgets.core.errors import InternalError, QueryRefused
from pets_widgets.core.policy import Policy
from pets_widgets.core.query import FilterValue, Layout, QuerySpec, structural_zeros
from pets_widgets.core.release import Release
from pets_widgets.core.sentences import filters_in_words
from pets_widgets.enclave.pipeline.builders import BUILDERS
from pets_widgets.enclave.pipeline.noise import NoiseMechanism, noise_interval
from pets_widgets.enclave.pipeline.tables import NoisyBlocks, Tables

#: The card's sentence for the cell rules; ``{k}`` and ``{protection}`` are filled in.
PRIMARY_RULE = "primary: cells with a noisy value below k={k} hidden"
SECONDARY_RULE = ("secondary: further cells hidden so no hidden cell can be worked out from "
                  "the totals to within {protection}")
#: The card's words for the test door's exact releases.
EXACT_MECHANISM = "none (test-only exact totals)"
EXACT_RULE = "none (test-only exact release)"


def block_scale(sensitivity: int, epsilon: Fraction, share: Fraction) -> Fraction:
    """Noise scale of a block: its sensitivity over its share of epsilon (exact).

    Privacy: each block's noise is calibrated to its own sensitivity at its own share of
    epsilon; the shares of a layout sum to one, so by sequential composition the release as a
    whole is epsilon-differentially private.
    """
    return Fraction(sensitivity) / (epsilon * share)


def block_scales(layout: Layout, epsilon: Fraction) -> dict[str, Fraction]:
    """The noise scale of every block of ``layout`` at ``epsilon``."""
    return {b.name: block_scale(b.sensitivity, epsilon, b.budget_share) for b in layout.blocks}


def draw_noise(mechanism: NoiseMechanism, layout: Layout,
               epsilon: Fraction) -> dict[str, np.ndarray]:
    """One draw of ``mechanism``'s noise for every cell of every block, at the block's own
    scale: the mechanism applied to zeros (it adds its noise to what it is given, and adds
    independent noise to each value, so totals plus this draw is the mechanism on the
    totals). It does not depend on the totals, so it can be drawn while they decrypt."""
    return {b.name: np.asarray(mechanism.sample([0] * b.size, scale), dtype=np.int64)
            for b, scale in zip(layout.blocks, block_scales(layout, epsilon).values(),
                                strict=True)}


def noise_params(layout: Layout, epsilon: Fraction, values: Mapping[str, np.ndarray],
                 where: Mapping[str, FilterValue], schema: S.Schema) -> NoisyBlocks:
    """``values`` with their blocks' noise scales, 95% intervals and structural zeros."""
    scales = block_scales(layout, epsilon)
    return NoisyBlocks(dict(values), {b: float(s) for b, s in scales.items()},
                       {b: noise_interval(s) for b, s in scales.items()},
                       structural_zeros(layout, where, schema))


def add_noise(params: NoisyBlocks, totals: Mapping[str, np.ndarray],
              noise: Mapping[str, np.ndarray]) -> NoisyBlocks:
    """Totals plus one draw of noise, cell by cell, as :class:`NoisyBlocks`.

    ``params`` is :func:`noise_params` of the query's layout, epsilon and filter (its values
    are not used), computed once however many draws are made. Cells the schema's rules make
    impossible (structural zeros, e.g. a stage for a leukaemia, or DIPG outside the CNS
    group) are then set to exactly zero: that is post-processing with public knowledge, and
    it keeps pure noise out of tables.
    """
    values = {}
    for name, impossible in params.structural.items():
        noisy = np.asarray(totals[name], dtype=np.int64) + noise[name]
        noisy[impossible] = 0
        values[name] = noisy
    return replace(params, values=values)


def exact_blocks(totals: Mapping[str, np.ndarray]) -> NoisyBlocks:
    """Totals with no noise (scale and interval 0): the test door's and the truth of a
    simulation."""
    return NoisyBlocks(dict(totals), {b: 0.0 for b in totals}, {b: 0 for b in totals})


def subset_refusal(spec: QuerySpec, layout: Layout, noisy: NoisyBlocks,
                   policy: Policy) -> QueryRefused | None:
    """The differencing defence: a filter must select at least ``min_subset`` patients.

    Privacy: judged on the noisy cells of the partition blocks (their sum is post-processing
    of the release's own noise), so the decision costs nothing beyond the release's epsilon;
    the enclave charges it even when it refuses, and stores the decision per filter.
    """
    if not spec.where or policy.min_subset <= 0:
        return None
    subset = sum(int(noisy.values[b.name].sum()) for b in layout.blocks if b.partition)
    if subset < policy.min_subset:
        return QueryRefused(
            "min_subset", f"the filter ({filters_in_words(spec.where)}) selects fewer than "
            "the policy "
            f"minimum of {policy.min_subset} patients (judged on noisy counts)")
    return None


def build_tables(spec: QuerySpec, schema: S.Schema, layout: Layout, noisy: NoisyBlocks, k: int,
                 policy: Policy, public: Mapping[str, pd.DataFrame], *,
                 suppress: bool = True) -> Tables:
    """The kind's tables from noisy blocks (post-processing only)."""
    builder = BUILDERS.get(spec.kind)
    if builder is None:
        raise InternalError(f"no table builder for query kind {spec.kind!r}")
    return builder(spec, schema, layout, noisy, k, policy.protection, suppress, **public)


def suppression_rule(k: int, tables: Tables, policy: Policy, *, suppress: bool = True) -> str:
    """The card's sentence for what was hidden and why."""
    if not suppress:
        return EXACT_RULE
    if tables.suppression:  # a kind with its own rule (survival strata, rates)
        return tables.suppression
    rule = PRIMARY_RULE.format(k=k)
    if tables.margins and not tables.margins.startswith("none"):
        rule += "; " + SECONDARY_RULE.format(protection=policy.protection)
    return rule


def parameter_card(spec: QuerySpec, layout: Layout, epsilon: Fraction, k: int,
                   noisy: NoisyBlocks, tables: Tables, policy: Policy, *, mechanism: str,
                   sites: tuple[str, ...], analyst: str = "", repeated: bool = False,
                   suppress: bool = True, notes: tuple[str, ...] = ()) -> ParameterCard:
    """The parameter card of a release (or simulated release) of ``spec``."""
    components = tuple(
        NoiseComponent(b.name, float(epsilon * b.budget_share), b.sensitivity,
                       noisy.scales[b.name], noisy.intervals[b.name])
        for b in layout.blocks)
    first = components[0]
    return ParameterCard(
        mechanism=mechanism, epsilon=float(epsilon), epsilon_per_cell=first.epsilon,
        sensitivity=first.sensitivity, noise_scale=first.noise_scale,
        noise_interval_95=first.noise_interval_95, k=k,
        suppression_rule=suppression_rule(k, tables, policy, suppress=suppress),
        spec_hash=spec.hash, sites=sites, time=now(), components=components,
        margins=tables.margins, postprocessing=tables.postprocessing, analyst=analyst,
        repeated=repeated, policy=policy.to_dict(), notes=tables.notes + notes)


def build_release(spec: QuerySpec, schema: S.Schema, layout: Layout, noisy: NoisyBlocks,
                  epsilon: Fraction, k: int, policy: Policy,
                  public: Mapping[str, pd.DataFrame], *, mechanism: str,
                  sites: tuple[str, ...], analyst: str = "", repeated: bool = False,
                  suppress: bool = True, notes: tuple[str, ...] = ()) -> Release:
    """Tables and card of a release, from noisy blocks: the last step in the enclave and in
    the explorer's simulation alike."""
    tables = build_tables(spec, schema, layout, noisy, k, policy, public, suppress=suppress)
    card = parameter_card(spec, layout, epsilon, k, noisy, tables, policy,
                          mechanism=mechanism, sites=sites, analyst=analyst,
                          repeated=repeated, suppress=suppress, notes=notes)
    return Release(spec, tables.table, tables.suppressed, card, tables.lower, tables.upper,
                   tables.extras, status=tables.status)

"""The parameter card: everything a reviewer needs to read a release (how it was noised,
hidden and charged).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class NoiseComponent:
    """The noise on one block of cells: its share of epsilon, sensitivity, scale, interval."""

    block: str
    epsilon: float
    sensitivity: int
    noise_scale: float
    noise_interval_95: int


@dataclass(frozen=True)
class ParameterCard:
    """Everything a reviewer needs to read a release: how it was noised, hidden and charged."""

    mechanism: str
    epsilon: float
    epsilon_per_cell: float
    sensitivity: int
    noise_scale: float
    noise_interval_95: int
    k: int
    suppression_rule: str
    spec_hash: str
    sites: tuple[str, ...]
    time: str
    components: tuple[NoiseComponent, ...] = ()
    margins: str = ""
    postprocessing: str = ""
    analyst: str = ""
    budget_spent: float = 0.0
    budget_left: float = math.inf
    federation_budget_left: float = math.inf
    repeated: bool = False
    policy: dict[str, object] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["sites"] = list(self.sites)
        out["components"] = [asdict(c) for c in self.components]
        out["notes"] = list(self.notes)
        return out

    def describe(self) -> str:
        """The card in plain words."""
        lines = [
            f"Noise: {self.mechanism}; epsilon {self.epsilon:g} for this release "
            f"({self.epsilon_per_cell:g} per cell).",
        ]
        for c in self.components:
            lines.append(
                f"  {c.block}: sensitivity {c.sensitivity}, noise scale {c.noise_scale:.4g}, "
                f"95% of noise within +/-{c.noise_interval_95}."
            )
        lines.append(f"Suppression: {self.suppression_rule}")
        if self.margins:
            lines.append(f"Margins: {self.margins}")
        if self.postprocessing:
            lines.append(f"Post-processing: {self.postprocessing}")
        lines.append(f"Sites: {', '.join(self.sites)}. Spec hash {self.spec_hash[:12]}...")
        if self.repeated:
            lines.append("This question was asked before: the stored release is returned and "
                         "nothing was spent.")
        if self.analyst:
            lines.append(
                f"Budget: analyst {self.analyst!r} spent {self.budget_spent:g} in total, "
                f"{self.budget_left:g} left; federation {self.federation_budget_left:g} left."
            )
        if self.policy:
            p = self.policy
            lines.append(
                f"Policy (enforced in the enclave): k at least {p.get('k')}, at most epsilon "
                f"{p.get('max_epsilon')} per release, filters must select at least "
                f"{p.get('min_subset')} patients, budget {p.get('analyst_budget')} per analyst "
                f"and {p.get('federation_budget')} for the federation.")
        lines.extend(self.notes)
        return "\n".join(lines)

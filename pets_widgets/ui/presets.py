"""Named survival analyses researchers pick from a menu: presets are data, not code paths.

Each preset is one row of :data:`SURVIVAL_PRESETS` (a name, a label, the stratifying
variables); :func:`survival` turns a row into an ordinary :class:`~pets_widgets.core.query.Survival`
spec, optionally restricted to one tumour group or one rare subtype. Adding a preset means
adding a row.

Example
-------
>>> import pets_widgets as pw
>>> spec = pw.presets.survival("by_age_band", subtype="DIPG")
>>> pw.presets.names()[:2]
('overall', 'by_tumour_group')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.errors import QueryValidationError
from pets_widgets.core.query import Survival


@dataclass(frozen=True)
class SurvivalPreset:
    """One named analysis: Kaplan-Meier by ``by`` to ``horizon_months`` in monthly steps."""

    name: str
    label: str
    by: tuple[str, ...]
    horizon_months: int = 60
    interval_months: int = 1


_ROWS = (
    SurvivalPreset("overall", "All patients", ()),
    SurvivalPreset("by_tumour_group", "By tumour group (ICCC-3)", ("tumour_group",)),
    SurvivalPreset("by_age_band", "By age at diagnosis", ("age_band",)),
    SurvivalPreset("by_sex", "By sex", ("sex",)),
    SurvivalPreset("by_diagnosis_period", "By period of diagnosis", ("diagnosis_period",)),
    SurvivalPreset("by_site", "By registry", ("site",)),
    SurvivalPreset("by_stage", "By stage at diagnosis", ("stage",)),
)

#: The survival presets by name, in menu order.
SURVIVAL_PRESETS: Mapping[str, SurvivalPreset] = MappingProxyType({p.name: p for p in _ROWS})


def names() -> tuple[str, ...]:
    """Names of the survival presets, in menu order."""
    return tuple(SURVIVAL_PRESETS)


def table() -> pd.DataFrame:
    """The presets as a table (name, label, by, horizon, interval), e.g. for a dropdown."""
    return pd.DataFrame(
        [(p.name, p.label, ", ".join(p.by) or "-", p.horizon_months, p.interval_months)
         for p in _ROWS],
        columns=["name", "label", "by", "horizon_months", "interval_months"],
    ).set_index("name")


def survival(name: str, *, tumour_group: str | None = None, subtype: str | None = None,
             where: Mapping[str, object] | None = None) -> Survival:
    """The :class:`Survival` spec of preset ``name``, optionally for one tumour group or
    one rare subtype (or both, and any further ``where`` filters).

    Raises :class:`QueryValidationError` naming ``name``, ``tumour_group`` or ``subtype``
    with the allowed values.
    """
    preset = SURVIVAL_PRESETS.get(name)
    if preset is None:
        raise QueryValidationError("name", f"{name!r} is not a survival preset", names())
    filters: dict[str, object] = dict(where or {})
    for field_name, value, var in (("tumour_group", tumour_group, S.TUMOUR_GROUP),
                                   ("subtype", subtype, S.SUBTYPE)):
        if value is None:
            continue
        if not isinstance(value, str):
            raise QueryValidationError(field_name, f"{value!r} is not one category; pick one",
                                       var.categories)
        if field_name in filters:
            raise QueryValidationError(f"where.{field_name}", f"is given twice (also as "
                                       f"{field_name}=)", var.categories)
        filters[field_name] = [value]
    return Survival(by=preset.by, where=filters, horizon_months=preset.horizon_months,
                    interval_months=preset.interval_months)

"""A :class:`~pets_widgets.core.release.Release` as JSON and back: how a release leaves the
enclave service for the analyst.

JSON only (never pickle: unpickling would let the sender run code in the receiver). Tables
keep their index and column names, level values and dtypes (``Int64`` with missing cells,
``float64``, ``bool``), so a release read back equals the one the enclave built; extras are
frames, tuples, the log-rank result, and JSON's own numbers, strings, lists and objects.
A release carries only released values: hidden cells are missing in ``table``.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import numpy as np
import pandas as pd

from pets_widgets.core.card import NoiseComponent, ParameterCard
from pets_widgets.core.errors import IntegrityError
from pets_widgets.core.query import spec_from_dict
from pets_widgets.core.release import Release

#: Release fields that are frames of the table's shape.
FRAMES = ("table", "suppressed", "lower", "upper")


def release_to_dict(release: Release) -> dict[str, Any]:
    """``release`` as JSON-ready data (see :func:`release_from_dict`)."""
    out: dict[str, Any] = {"spec": release.spec.to_dict(), "card": _encode(release.card.to_dict()),
                           "extras": _encode(release.extras)}
    for name in FRAMES:
        out[name] = frame_to_dict(getattr(release, name))
    out["status"] = None if release.status is None else frame_to_dict(release.status)
    return out


def release_from_dict(data: Any) -> Release:
    """The :class:`Release` of :func:`release_to_dict`'s output; a malformed one raises
    :class:`IntegrityError` (the sender is not what it claims)."""
    try:
        card = dict(_decode(data["card"]))
        card["sites"] = tuple(card["sites"])
        card["components"] = tuple(NoiseComponent(**c) for c in card["components"])
        card["notes"] = tuple(card["notes"])
        names = {f.name for f in fields(ParameterCard)}
        frames = {name: frame_from_dict(data[name]) for name in FRAMES}
        status = data.get("status")
        return Release(spec=spec_from_dict(data["spec"]),
                       card=ParameterCard(**{k: v for k, v in card.items() if k in names}),
                       extras=_decode(data["extras"]),
                       status=None if status is None else frame_from_dict(status), **frames)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"not a release ({type(exc).__name__})") from None


# --------------------------------------------------------------------------- frames
def _index_to_dict(index: pd.Index) -> dict[str, Any]:
    levels = ([index.get_level_values(i) for i in range(index.nlevels)]
              if isinstance(index, pd.MultiIndex) else [index])
    return {"names": list(index.names), "multi": isinstance(index, pd.MultiIndex),
            "levels": [[_scalar(v) for v in level] for level in levels],
            "dtypes": [str(level.dtype) for level in levels]}


def _index_from_dict(data: Any) -> pd.Index:
    levels = [pd.Index(values, dtype=dtype, name=name) for values, dtype, name
              in zip(data["levels"], data["dtypes"], data["names"], strict=True)]
    if data["multi"]:
        return pd.MultiIndex.from_arrays(levels, names=data["names"])
    return levels[0]


def frame_to_dict(frame: pd.DataFrame) -> dict[str, Any]:
    """A DataFrame as JSON-ready data, its dtypes and missing values kept."""
    return {"index": _index_to_dict(frame.index), "columns": _index_to_dict(frame.columns),
            "dtypes": [str(d) for d in frame.dtypes],
            "data": [[_scalar(v) for v in frame.iloc[:, i]] for i in range(frame.shape[1])]}


def frame_from_dict(data: Any) -> pd.DataFrame:
    """The DataFrame of :func:`frame_to_dict`'s output."""
    index = _index_from_dict(data["index"])
    columns = _index_from_dict(data["columns"])
    series = []
    for values, dtype in zip(data["data"], data["dtypes"], strict=True):
        if dtype == "float64":
            values = [math.nan if v is None else v for v in values]
        series.append(pd.array(values, dtype=dtype))
    frame = pd.DataFrame(dict(enumerate(series)), index=index)
    frame.columns = columns
    return frame


def _scalar(value: Any) -> Any:
    """A cell or label as JSON: numpy scalars as Python's, missing values as None."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


# --------------------------------------------------------------------------- extras
def _encode(value: Any) -> Any:
    if isinstance(value, pd.DataFrame):
        return {"__frame__": frame_to_dict(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if type(value).__name__ == "StatisticalResult":
        return {"__logrank__": {
            "p_value": float(value.p_value), "test_statistic": float(value.test_statistic),
            "test_name": value.test_name, "t_0": value.t_0,
            "null_distribution": value.null_distribution,
            "degrees_of_freedom": value.degrees_of_freedom,
            "table": frame_to_dict(value.table), "noisy": bool(value.noisy),
            "note": str(value.note)}}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a release cannot carry a {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__frame__" in value:
        return frame_from_dict(value["__frame__"])
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_decode(k): _decode(v) for k, v in value["__dict__"]}
    if "__float__" in value:
        return float(value["__float__"])
    if "__logrank__" in value:
        from lifelines.statistics import StatisticalResult

        data = value["__logrank__"]
        result = StatisticalResult(data["p_value"], data["test_statistic"],
                                   test_name=data["test_name"], t_0=data["t_0"],
                                   null_distribution=data["null_distribution"],
                                   degrees_of_freedom=data["degrees_of_freedom"])
        result.table = frame_from_dict(data["table"])
        result.noisy, result.note = data["noisy"], data["note"]
        return result
    raise ValueError("unknown object in a release")

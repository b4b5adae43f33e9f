"""Repository-wide pytest setup: the notebooks in notebooks/ are collected by nbval (see
``testpaths`` and ``addopts`` in pyproject.toml) and are slow tests; the survival notebook
waits until survival analysis (``pw.Survival``, ``pw.presets``, ``pw.plots``) is installed."""

from __future__ import annotations

import importlib.util

import pytest

NEEDS_SURVIVAL = ("03_survival_across_registries.ipynb",)


def _survival_available() -> bool:
    return all(importlib.util.find_spec(f"pets_widgets.{m}") is not None
               for m in ("presets", "plots"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    survival = _survival_available()
    for item in items:
        if item.path.suffix != ".ipynb":
            continue
        item.add_marker(pytest.mark.slow)
        if item.path.name in NEEDS_SURVIVAL and not survival:
            item.add_marker(pytest.mark.skip(
                reason="needs survival analysis (pw.Survival, pw.presets, pw.plots)"))

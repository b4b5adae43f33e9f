"""Repository-wide pytest setup: the notebooks in notebooks/ are collected by nbval (see
``testpaths`` and ``addopts`` in pyproject.toml) and are slow tests."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)

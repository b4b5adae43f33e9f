"""Shared fixtures: federations are built once per session, with small sites and, where a test
is about logic rather than key size, 1024-bit keys (one end-to-end test keeps 2048 bits)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import pets_widgets as pw
from pets_widgets.site.trust import Floors

SMALL_ROWS = 3_000
TEST_KEY_BITS = 1024
#: What oracle tests of configured federations need: the exact door (a debug enclave the
#: sites accept) and totals by site.
TESTING: dict[str, object] = {
    "debug": True, "floors": Floors(lifetime_epsilon=1e9, allow_site_breakdown=True)}


def make_fed(tmp_path_factory: pytest.TempPathFactory, name: str,
             **kwargs: object) -> pw.Federation:
    ledger = tmp_path_factory.mktemp(name) / "ledger.sqlite"
    kwargs.setdefault("key_bits", TEST_KEY_BITS)
    # Oracle tests need the exact door (a debug enclave) and totals by site, and session
    # federations answer more than a site's default lifetime epsilon.
    kwargs.setdefault("debug", True)
    kwargs.setdefault("floors", TESTING["floors"])
    kwargs.setdefault("rows_per_site", SMALL_ROWS)
    return pw.demo_federation(ledger=ledger, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def fed2(tmp_path_factory: pytest.TempPathFactory) -> pw.Federation:
    """Two small sites (NDRS, NCI), 1024-bit key; use for exact (noiseless) tests."""
    return make_fed(tmp_path_factory, "fed2", seed=7)


@pytest.fixture(scope="session")
def fed5(tmp_path_factory: pytest.TempPathFactory) -> pw.Federation:
    """Five small sites, 1024-bit key."""
    return make_fed(tmp_path_factory, "fed5", seed=11, n_sites=5, rows_per_site=1_500)


@pytest.fixture(scope="session")
def pooled2(fed2: pw.Federation):
    return pw.testing.pooled_rows(fed2)


@pytest.fixture(scope="session")
def pooled5(fed5: pw.Federation):
    return pw.testing.pooled_rows(fed5)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
        ) -> pw.Federation:
    """A federation of the test module's own (seed 5, its own ledger), for modules whose
    tests spend budget and read it back."""
    return make_fed(tmp_path_factory, request.module.__name__.rsplit(".", 1)[-1], seed=5)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_by_the_suite() -> Iterator[None]:
    """After the whole suite: no site service, kernel or gateway it started is running."""
    yield
    from .kernel_helpers import assert_no_kernel_children

    assert_no_kernel_children(timeout=30.0)


@pytest.fixture(scope="module")
def no_leaked_kernels() -> Iterator[None]:
    """Fails the module if a kernel or gateway it started is still running at its end."""
    from .kernel_helpers import assert_no_kernel_children

    yield
    assert_no_kernel_children()


@pytest.fixture
def fresh_fed(tmp_path_factory: pytest.TempPathFactory) -> pw.Federation:
    """A federation with its own new ledger, for tests that spend budget."""
    return make_fed(tmp_path_factory, "fresh", seed=3)

"""The dashboard in a real browser: Voila serves notebooks/dashboard.ipynb on 127.0.0.1 and a
free port, Debian's chromium (through playwright) builds a crosstab, a histogram and a survival
query by clicking only, moves the epsilon explorer's slider and reads the audit log.

Screenshots go to a temporary folder, or to ``$PETS_SCREENSHOT_DIR`` when set (that is how the
README's screenshots are made). Every process the test starts is stopped by it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

import pets_widgets as pw
from tests import voila

pytestmark = [pytest.mark.slow, pytest.mark.browser]

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect
expect.set_options(timeout=60_000)  # a shared, loaded machine: plots can take seconds

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "notebooks" / "dashboard.ipynb"
# Voila scrolls inside the page, so a screenshot shows the viewport: make it tall
VIEWPORT = {"width": 1300, "height": 1500}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("PETS_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(voila.CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    log = tmp_path_factory.mktemp("voila") / "voila.log"
    started: set[int] = set()
    with voila.voila_server(DASHBOARD, log) as (url, proc):
        yield url, proc, started
        started |= voila.descendants(proc.pid)  # Voila's kernels and anything they started
    # Site kernels live in sessions of their own: killed with their dashboard kernel, they
    # notice their parent is gone (ipykernel's parent poller) within a second or two.
    deadline = time.monotonic() + 20
    while (left := voila.alive(started | {proc.pid})) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not left, f"processes left running after Voila stopped: {sorted(left)}"


@pytest.fixture(scope="module")
def page(server, shots):
    url, proc, started = server
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=voila.CHROMIUM, headless=True,
                                    args=voila.CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            pg = context.new_page()
            pg.set_default_timeout(120_000)
            voila.route_loopback_only(pg)
            pg.goto(url, wait_until="domcontentloaded")
            pg.locator(".pw-kind select").wait_for(state="visible")
            started |= voila.descendants(proc.pid)
            yield pg
            started |= voila.descendants(proc.pid)
        finally:
            browser.close()


def run_query(page) -> None:
    page.locator("button.pw-run").click()
    expect(page.locator(".pw-progress-text")).to_have_text(
        re.compile("released|stored release returned|nothing released"))


def expect_plot(page) -> None:
    img = page.locator(".pw-plot-area img")
    expect(img).to_have_count(1)
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_function("() => { const i = document.querySelector('.pw-plot-area img');"
                           " return i && i.complete && i.naturalWidth > 0; }")


def open_filters(page) -> None:
    """Open the filter panel (the page is shared by the tests: it may be open already)."""
    if not page.locator(".pw-filter-tumour-group select").is_visible():
        page.locator(".pw-filters .jupyter-widget-Collapse-header, .pw-filters "
                     ".lm-AccordionPanel-title, .pw-filters .p-Collapse-header").first.click()
    expect(page.locator(".pw-filter-tumour-group select")).to_be_visible()


def test_crosstab_by_clicking(page, shots):
    page.locator(".pw-kind select").select_option(label="Crosstab: two variables, with totals")
    page.locator(".pw-rows select").select_option(label="Rare subtype")
    page.locator(".pw-cols select").select_option(label="Age band")
    # Diagnosed 2020-2022: rare subtypes by age band then have real small cells to hide
    # (impossible combinations, such as a stage for DIPG, are shown as exact zeros instead).
    open_filters(page)
    page.locator(".pw-filter-diagnosis-period select").select_option(label="2020-2022")
    expect(page.locator(".pw-spec")).to_contain_text("2020-2022")
    run_query(page)
    table = page.locator(".pw-table-area table.pw-table")
    expect(table).to_contain_text("Retinoblastoma")
    hidden = table.locator("td.pw-hidden:not(.pw-complementary)")
    assert hidden.count() > 0 and set(hidden.all_inner_texts()) == {"<5"}
    # Cells hidden only to protect another are marked apart: never read as "fewer than 5".
    assert set(table.locator("td.pw-complementary").all_inner_texts()) <= {"c"}
    released = [t for t in table.locator("td:not(.pw-hidden)").all_inner_texts()
                if re.fullmatch(r"\d+", t.strip())]
    assert released and max(int(t) for t in released) >= 5
    card = page.locator(".pw-card-area")
    expect(card).to_contain_text("ε = 1")
    expect(card).to_contain_text("k = 5")
    expect(page.locator(".pw-legend")).to_contain_text("hidden")
    expect(page.locator("a.pw-download-csv")).to_have_attribute(
        "href", re.compile("^data:text/csv"))
    expect(page.locator(".pw-budget").first).to_contain_text("9")
    expect_plot(page)
    page.screenshot(path=str(shots / "dashboard-crosstab.png"), full_page=True)


def test_histogram_with_a_filter_by_clicking(page, shots):
    page.locator(".pw-kind select").select_option(label="Histogram")
    page.locator(".pw-variable select").select_option(label="Age at diagnosis")
    open_filters(page)
    page.locator(".pw-filter-diagnosis-period select").select_option([])  # everyone again
    page.locator(".pw-filter-tumour-group select").select_option(label="V Retinoblastoma")
    expect(page.locator(".pw-spec")).to_contain_text("Retinoblastoma")
    run_query(page)
    table = page.locator(".pw-table-area table.pw-table")
    expect(table).to_contain_text("age_at_diagnosis")
    values = [t for t in table.locator("td").all_inner_texts()]
    assert len(values) == 15 and any(re.fullmatch(r"\d+", v) for v in values)
    expect(page.locator(".pw-card-area")).to_contain_text("k = 5")
    expect_plot(page)
    page.screenshot(path=str(shots / "dashboard-histogram.png"), full_page=True)


def test_survival_by_clicking(page, shots):
    page.locator(".pw-kind select").select_option(label="Survival (Kaplan-Meier)")
    expect(page.locator(".pw-preset select option")).to_have_count(len(pw.presets.names()))
    page.locator(".pw-preset select").select_option(label="By tumour group (ICCC-3)")
    run_query(page)
    table = page.locator(".pw-table-area table.pw-table.dataframe")
    expect(table).to_contain_text("5 years")
    expect(table).to_contain_text("Leukaemia")
    expect(table).to_contain_text("%")  # survival in percent
    expect(page.locator(".pw-medians")).to_contain_text("median survival (months)")
    expect(page.locator(".pw-logrank")).to_contain_text("p = ")
    expect(page.locator(".pw-card-area")).to_contain_text("ε = 1")
    expect_plot(page)
    page.screenshot(path=str(shots / "dashboard-survival.png"), full_page=True)


def test_epsilon_slider_changes_the_interval(page, shots):
    page.get_by_role("tab", name="Epsilon explorer").click()
    summary = page.locator(".pw-explorer-summary .pw-interval").first
    expect(summary).to_contain_text("95% of the noise within ±")
    before = summary.inner_text()
    handle = page.locator(".pw-explorer-epsilon .noUi-handle")
    handle.focus()
    for _ in range(40):
        handle.press("ArrowLeft")
    expect(summary).not_to_have_text(before)
    expect(page.locator(".pw-explorer-summary")).to_contain_text("no budget spent")
    after = int(re.search(r"±(\d+)", summary.inner_text()).group(1))
    assert after > int(re.search(r"±(\d+)", before).group(1))
    shown = page.locator(".pw-explorer-summary b").first.inner_text()  # "At ε = 0.16 and k = 5"
    epsilon = re.search(r"ε = ([0-9.]+)", shown).group(1)
    img = page.locator(".pw-noise-plot img")
    expect(img).to_have_attribute("alt", f"noise distribution at epsilon {float(epsilon):g}")
    page.wait_for_function("() => { const i = document.querySelector('.pw-noise-plot img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    page.screenshot(path=str(shots / "dashboard-explorer.png"), full_page=True)


def test_audit_log_lists_the_queries(page, shots):
    page.get_by_role("tab", name="Audit log").click()
    table = page.locator(".pw-audit-table")
    expect(table).to_contain_text("Number of patients by rare subtype and age band")
    expect(table).to_contain_text("released")
    page.screenshot(path=str(shots / "dashboard-audit.png"), full_page=True)

"""Releases, refusals, budgets, site status and the audit log as HTML for the dashboard.

Headless (no ipywidgets, no IPython): every function takes plain objects and returns an HTML
string, so what a researcher sees is unit-tested without a browser. Hidden cells carry the
CSS class ``pw-hidden`` and read ``<k``; plots are PNG ``<img>`` tags with a ``data:`` URI and
downloads are ``data:`` links, so the page works offline, in Voila and in a saved notebook.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import sys
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.budget import Budget
from pets_widgets.core.card import ParameterCard
from pets_widgets.core.errors import (
    AttestationError,
    BudgetExceeded,
    IntegrityError,
    QueryRefused,
    QueryValidationError,
    SiteError,
)
from pets_widgets.core.query import spec_from_json
from pets_widgets.core.release import (
    COMPLEMENTARY,
    COMPLEMENTARY_WHY,
    TOTAL,
    Release,
    format_number,
    format_percent,
    format_percent_bare,
    hidden_reason,
)
from pets_widgets.core.sentences import question

log = logging.getLogger(__name__)

#: Kinds whose values are estimates best read with their interval next to them.
INTERVAL_KINDS = frozenset({"mean", "survival", "incidence"})

#: Styles of the dashboard's own classes (put once on the page by the widgets).
CSS = """
<style>
.pw-root .widget-html-content { line-height: 1.45; }
.pw-table { border-collapse: collapse; font-size: 13px; margin: 4px 0; }
.pw-table th, .pw-table td { border: 1px solid #ddd; padding: 2px 8px; text-align: right;
                             white-space: nowrap; }
.pw-table th { background: #f6f6f6; }
.pw-table td.pw-hidden { color: #8a6d3b; background: #fcf8e3; font-style: italic; }
.pw-table td.pw-total, .pw-table th.pw-total { font-weight: bold; }
.pw-ci { color: #777; font-size: 11px; }
.pw-legend, .pw-note { color: #555; font-size: 12px; }
.pw-card { border-left: 4px solid #3b73b9; background: #f4f8fd; padding: 6px 10px;
           font-size: 13px; }
.pw-card ul { margin: 4px 0; padding-left: 18px; }
.pw-error { border-left: 4px solid #c0392b; background: #fdf2f1; padding: 6px 10px; }
.pw-warning { border-left: 4px solid #d4a017; background: #fffbea; padding: 6px 10px; }
.pw-info { border-left: 4px solid #3b73b9; background: #f4f8fd; padding: 6px 10px; }
.pw-site { display: inline-block; margin: 2px 8px 2px 0; padding: 3px 8px;
           border: 1px solid #ccc; border-radius: 10px; font-size: 12px; }
.pw-site .pw-live { color: #1e8449; } .pw-site .pw-down { color: #c0392b; }
.pw-download { margin-right: 14px; color: #1a5fb4; text-decoration: underline; }
.pw-plot img { max-width: 100%; }
.pw-years .widget-readout { max-width: none; min-width: 90px; }
</style>
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


#: A released number as text (the one formatting rule of :mod:`pets_widgets.core.release`).
number = format_number


def _label(schema: S.Schema | None, name: object) -> str:
    if schema is not None and isinstance(name, str) and name in schema:
        return schema[name].label
    return "" if name is None else str(name)


# --------------------------------------------------------------------------- tables


def _cell_text(value: object, lo: object, hi: object, with_interval: bool,
               percent: bool = False) -> str:
    if percent:  # a probability: "98.6% (97.1–99.3)"
        text, lo_text, hi_text = (format_percent(value), format_percent_bare(lo),
                                  format_percent_bare(hi))
    else:
        text, lo_text, hi_text = number(value), number(lo), number(hi)
    exact = lo_text == hi_text == text  # e.g. public denominators: no noise
    text = esc(text)
    if with_interval and text and lo_text and hi_text and not exact:
        text += f' <span class="pw-ci">({esc(lo_text)}–{esc(hi_text)})</span>'
    return text


def _is_total(label: object) -> bool:
    if isinstance(label, tuple):
        return TOTAL in label
    return label == TOTAL


def table_html(release: Release, intervals: bool | None = None,
               schema: S.Schema | None = None) -> str:
    """The released table: primary hidden cells as ``<k`` (class ``pw-hidden``),
    complementary ones as ``c`` (classes ``pw-hidden pw-complementary``), totals in bold, and
    95% intervals after each value for estimates (or for every kind with ``intervals=True``).
    """
    if intervals is None:
        intervals = release.spec.kind in INTERVAL_KINDS
    mark = f"&lt;{release.card.k}"
    table = release.table
    hidden = release.suppressed.reindex_like(table).fillna(False).to_numpy(dtype=bool)
    complementary = (release.cell_status.reindex_like(table) == "complementary").to_numpy()
    percent = set(release.percent_columns)
    lower = release.lower.reindex_like(table)
    upper = release.upper.reindex_like(table)
    index_names = [_label(schema, n) for n in table.index.names]
    col_name = _label(schema, table.columns.name) if table.columns.name else ""

    out = ['<table class="pw-table dataframe">', "<thead>"]
    if col_name:
        out.append("<tr>" + "".join(f"<th>{esc(n)}</th>" for n in index_names[:-1])
                   + f"<th>{esc(index_names[-1])} \\ {esc(col_name)}</th>"
                   + "".join(_th(c) for c in table.columns) + "</tr>")
    else:
        out.append("<tr>" + "".join(f"<th>{esc(n)}</th>" for n in index_names)
                   + "".join(_th(c) for c in table.columns) + "</tr>")
    out.append("</thead><tbody>")
    for i, label in enumerate(table.index):
        labels = label if isinstance(label, tuple) else (label,)
        row_total = _is_total(label)
        cells = [f'<th class="{"pw-total" if row_total else ""}">{esc(number(v))}</th>'
                 for v in labels]
        for j, col in enumerate(table.columns):
            classes = []
            if row_total or _is_total(col):
                classes.append("pw-total")
            if hidden[i, j] and complementary[i, j]:
                classes += ["pw-hidden", "pw-complementary"]
                text = COMPLEMENTARY
            elif hidden[i, j]:
                classes.append("pw-hidden")
                text = mark
            else:
                text = _cell_text(table.iat[i, j], lower.iat[i, j], upper.iat[i, j], intervals,
                                  col in percent)
            cells.append(f'<td class="{" ".join(classes)}">{text}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _th(col: object) -> str:
    cls = ' class="pw-total"' if _is_total(col) else ""
    return f"<th{cls}>{esc(number(col) if not isinstance(col, str) else col)}</th>"


def legend_html(release: Release, intervals: bool | None = None) -> str:
    """What ``<k``, bold totals and the bracketed intervals mean."""
    k = release.card.k
    status = release.cell_status.to_numpy()
    n_primary = int((status == "primary").sum())
    n_complementary = int((status == "complementary").sum())
    why = hidden_reason(release.spec.kind, k)
    parts = [f"<b>&lt;{k}</b>: hidden ({n_primary} value{'s' if n_primary != 1 else ''} "
             f"here): {why}"]
    if n_complementary:
        parts.append(f"<b>{COMPLEMENTARY}</b>: {esc(COMPLEMENTARY_WHY)} ({n_complementary} "
                     f"value{'s' if n_complementary != 1 else ''} here)")
    if TOTAL in _all_labels(release.table):
        parts.append("<b>Total</b>: sums of the released noisy cells (no extra budget).")
    if intervals or (intervals is None and release.spec.kind in INTERVAL_KINDS):
        parts.append("(a–b): 95% interval of the released value.")
    return '<div class="pw-legend">' + " ".join(parts) + "</div>"


def _all_labels(table: pd.DataFrame) -> set[object]:
    labels: set[object] = set(table.columns)
    for label in table.index:
        labels.update(label if isinstance(label, tuple) else (label,))
    return labels


# --------------------------------------------------------------------------- the card


def card_html(card: ParameterCard) -> str:
    """The parameter card in plain words: what noise, how much, what is hidden, what it cost."""
    comps = card.components
    noise = "; ".join(
        f"{esc(c.block)}: ε {c.epsilon:g}, sensitivity {c.sensitivity}, noise scale "
        f"{c.noise_scale:.3g}, 95% of the noise within ±{c.noise_interval_95}" for c in comps)
    headline = (f"Released with epsilon <b>ε = {card.epsilon:g}</b> and threshold "
                f"<b>k = {card.k}</b>. Each number carries random noise "
                f"(95% of the time within ±{card.noise_interval_95} of the true total"
                f"{' per cell' if len(comps) <= 1 else ' for the first block'}); "
                f"numbers below {card.k} are hidden.")
    items = [
        f"<li><b>Noise</b>: {esc(card.mechanism)}. {noise}.</li>",
        f"<li><b>Hidden cells</b>: {esc(_sentence(card.suppression_rule))}</li>",
    ]
    if card.margins:
        items.append(f"<li><b>Totals</b>: {esc(_sentence(card.margins))}</li>")
    if card.postprocessing:
        items.append(f"<li><b>After the noise</b>: {esc(_sentence(card.postprocessing))}</li>")
    if card.repeated:
        items.append("<li><b>Asked before</b>: the stored release was returned and nothing "
                     "was spent.</li>")
    if card.analyst:
        items.append(f"<li><b>Budget</b>: analyst {esc(card.analyst)} has spent "
                     f"{card.budget_spent:g} and has {card.budget_left:g} left; the federation "
                     f"has {card.federation_budget_left:g} left.</li>")
    items.append(f"<li><b>Sites</b>: {esc(', '.join(card.sites))}; spec hash "
                 f"<code>{esc(card.spec_hash[:12])}</code>.</li>")
    for note in getattr(card, "notes", ()):
        items.append(f"<li>{esc(note)}</li>")
    details = esc(card.describe())
    return (f'<div class="pw-card"><div>{headline}</div><ul>{"".join(items)}</ul>'
            f"<details><summary>Full parameter card</summary><pre>{details}</pre></details>"
            "</div>")


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def budget_html(budget: Budget, policy: Any | None = None) -> str:
    """Budget left for the analyst and the federation, in plain words."""
    a_total = f" of {policy.analyst_budget:g}" if policy is not None else ""
    f_total = f" of {policy.federation_budget:g}" if policy is not None else ""
    return (f'<div class="pw-budget-text">Privacy budget left for <b>{esc(budget.analyst)}</b>: '
            f"<b>{float(budget.analyst_left):g}</b>{a_total} "
            f"(federation: {float(budget.federation_left):g}{f_total}).</div>")


# --------------------------------------------------------------------------- downloads


def _data_uri(text: str, mime: str) -> str:
    payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
    return f"data:{mime};charset=utf-8;base64,{payload}"


def download_html(release: Release) -> str:
    """Download links: the release as a tidy CSV (numbers as numbers, hidden cells empty with
    their status beside them), and the spec with its parameter card as JSON, enough to
    reproduce and review the release; file names say what the release is."""
    stem = release.file_stem()
    csv_uri = _data_uri(release.to_csv(), "text/csv")
    json_uri = _data_uri(release.to_json(), "application/json")
    nb_uri = _data_uri(release.notebook_json(), "application/x-ipynb+json")
    return (f'<div class="pw-downloads"><a class="pw-download pw-download-csv" '
            f'download="{stem}.csv" href="{csv_uri}">Download table (CSV)</a>'
            f'<a class="pw-download pw-download-json" download="{stem}.json" '
            f'href="{json_uri}">Download spec and card (JSON)</a>'
            f'<a class="pw-download pw-download-notebook" download="{stem}.ipynb" '
            f'href="{nb_uri}">Download a notebook that reruns it (free)</a></div>')


# --------------------------------------------------------------------------- plots


def figure_html(fig: Any, alt: str = "plot", css_class: str = "pw-plot",
                tight: bool = True) -> str:
    """A matplotlib figure as an inline PNG ``<img>``; the figure is closed afterwards so the
    notebook's inline backend does not show it a second time."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight" if tight else None)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<div class="{esc(css_class)}"><img alt="{esc(alt)}" '
            f'src="data:image/png;base64,{data}"/></div>')


def plot_html(release: Release) -> str:
    """The figure matching the release (bars, histogram, KM curves, rate bars) from
    ``pets_widgets.ui.plots.plot``, or "" when the kind has no figure."""
    from pets_widgets.ui import plots  # matplotlib loads on the first figure, not on import

    try:
        fig = plots.plot(release)
    except Exception as exc:  # a figure is a convenience: the table is the result
        log.exception("plot failed for %s", release.spec.kind)
        return (f'<div class="pw-note">No figure for this result '
                f"({esc(type(exc).__name__)}: {esc(exc)}).</div>")
    if fig is None:
        return ""
    return figure_html(fig, alt=f"{release.spec.kind} plot: {question(release.spec)}")


# --------------------------------------------------------------------------- whole result


def release_html(release: Release, schema: S.Schema | None = None,
                 intervals: bool | None = None) -> str:
    """Heading, table and legend of one release (the card and plot are separate pieces)."""
    title = esc(question(release.spec, schema))
    extra = survival_summary_html(release) if release.spec.kind == "survival" else ""
    return (f'<div class="pw-result"><div class="pw-title"><b>{title}</b></div>'
            f"{table_html(release, intervals, schema)}{legend_html(release, intervals)}"
            f"{extra}</div>")


def _months(value: float) -> str:
    if math.isnan(value):
        return ""
    return "not reached" if math.isinf(value) else f"{value:g}"


def survival_summary_html(release: Release) -> str:
    """Median survival per shown stratum with its 95% interval (months, read off the
    released curves: no budget), and the log-rank test from the noisy counts."""
    from pets_widgets.enclave.pipeline.survival import logrank, median_survival

    medians = median_survival(release)
    rows = "".join(
        f"<tr><th>{esc(label)}</th><td>{esc(_months(m['median']))}</td>"
        f"<td>{esc(_months(m['lower']))}–{esc(_months(m['upper']))}</td></tr>"
        for label, m in medians[medians.shown].iterrows())
    out = ('<div class="pw-survival-summary"><table class="pw-table pw-medians"><thead><tr>'
           "<th>stratum</th><th>median survival (months)</th><th>95% interval</th></tr>"
           f"</thead><tbody>{rows}</tbody></table>")
    test = logrank(release)
    if test is not None:
        noisy = " from the noisy counts (the noise is not in its variance: approximate)" \
            if getattr(test, "noisy", True) else ""
        out += (f'<div class="pw-logrank">Log-rank test across {test.degrees_of_freedom + 1} '
                f"shown strata: χ² = {test.test_statistic:.2f} on "
                f"{test.degrees_of_freedom} degree{'s' if test.degrees_of_freedom != 1 else ''} "
                "of freedom, p = "
                f"{_p_value(test.p_value)}{noisy}.</div>")
    return out + "</div>"


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


# --------------------------------------------------------------------------- errors


_ADVICE = {
    "max_epsilon": "Choose a smaller epsilon.",
    "k": "Choose a larger k.",
    "min_subset": "Widen the filters (more years, more categories) so the group is larger.",
    "analyst_budget": "Your budget is spent: ask your data custodian, or re-use earlier "
                      "releases (asking the same question again is free).",
    "federation_budget": "The federation's budget is spent: ask the data custodians.",
    "sites": "Every site must take part in every query.",
}


def error_html(exc: BaseException) -> str:
    """A refusal or failure as a clear message: the rule and what to do, never a traceback."""
    cls = "pw-error"
    if isinstance(exc, BudgetExceeded):
        title = "Not released: the privacy budget does not allow it"
        detail, advice = str(exc), _ADVICE.get(exc.rule, "")
    elif isinstance(exc, QueryRefused):
        title = f"Not released: the enclave's policy refused it (rule: {exc.rule})"
        detail, advice = str(exc), _ADVICE.get(exc.rule, "")
    elif isinstance(exc, SiteError):
        title = f"Not released: site {exc.site} failed"
        detail = exc.cause
        advice = "Nothing was released and no budget was spent. Check the site's status."
    elif isinstance(exc, QueryValidationError):
        title = f"Not a valid query ({exc.field})"
        detail, advice = str(exc), ""
        cls = "pw-warning"
    elif isinstance(exc, AttestationError):
        title = "Not released: attestation failed"
        detail, advice = str(exc), "A site did not accept the enclave; nothing left any site."
    elif isinstance(exc, IntegrityError):
        title = "Not released: an encrypted aggregate failed its integrity check"
        detail, advice = str(exc), "Nothing was released and no budget was spent."
    else:
        title = "Something went wrong"
        detail = f"{type(exc).__name__}: {exc}"
        advice = "Nothing was released. The details are in the server log."
    advice_html = f"<div>{esc(advice)}</div>" if advice else ""
    return (f'<div class="{cls} pw-message"><b>{esc(title)}</b><div>{esc(detail)}</div>'
            f"{advice_html}</div>")


def info_html(text: str, cls: str = "pw-info") -> str:
    return f'<div class="{esc(cls)} pw-message">{esc(text)}</div>'


# --------------------------------------------------------------------------- status, audit


def _present(value: object) -> Any:
    """``value``, or None when it is missing (None, NaN, NA); numpy booleans as bool."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def status_html(status: pd.DataFrame, title: str = "Sites") -> str:
    """One badge per site: name, backend, liveness, rounded size."""
    badges = []
    for site, row in status.iterrows():
        alive = _present(row.get("alive"))
        down = alive is False or _present(row.get("state")) == "down"
        detail = _present(row.get("detail"))
        if down:
            why = f": {esc(detail)}" if detail else ""
            state = f'<span class="pw-down">● offline{why}</span>'
        elif alive is None:
            state = '<span class="pw-unknown">status unknown</span>'
        else:
            state = '<span class="pw-live">● online</span>'
        rows = row.get("rows")
        size = ""
        if rows is not None and not (isinstance(rows, float) and math.isnan(rows)):
            size = f" · about {int(rows):,} patients"
        backend = row.get("backend", "")
        badges.append(f'<span class="pw-site" data-site="{esc(site)}"><b>{esc(site)}</b> · '
                      f"{esc(backend)} · {state}{size}</span>")
    return f'<div class="pw-status"><b>{esc(title)}:</b> {"".join(badges)}</div>'


def _eps(text: object) -> str:
    if text in (None, ""):
        return ""
    try:
        return f"{float(Fraction(str(text))):g}"
    except (ValueError, ZeroDivisionError):
        return str(text)


def _describe_spec(spec_json: object) -> str:
    try:
        return question(spec_from_json(str(spec_json)))
    except (QueryValidationError, TypeError, ValueError):
        return ""


def audit_html(log_rows: pd.DataFrame, limit: int = 200) -> str:
    """The ledger's audit rows, newest first: time, analyst, query, epsilon, outcome, why."""
    if log_rows.empty:
        return '<div class="pw-note">No queries yet.</div>'
    rows = log_rows.sort_values("id", ascending=False).head(limit)
    head = ("<tr><th>#</th><th>time (UTC)</th><th>analyst</th><th>query</th><th>ε asked</th>"
            "<th>ε spent</th><th>outcome</th><th>reason</th></tr>")
    body = []
    for _, r in rows.iterrows():
        why = f"{r['rule']}: {r['reason']}" if r["rule"] else r["reason"]
        outcome = str(r["outcome"])
        body.append(
            f'<tr class="pw-outcome-{esc(outcome)}"><td>{esc(r["id"])}</td>'
            f"<td>{esc(str(r['time'])[:19].replace('T', ' '))}</td><td>{esc(r['analyst'])}</td>"
            f"<td style='text-align:left'>{esc(_describe_spec(r['spec_json']))}</td>"
            f"<td>{esc(_eps(r['epsilon_asked']))}</td><td>{esc(_eps(r['epsilon_spent']))}</td>"
            f"<td>{esc(outcome)}</td><td style='text-align:left'>{esc(why)}</td></tr>")
    return (f'<table class="pw-table pw-audit-table"><thead>{head}</thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def outcome_counts(log_rows: pd.DataFrame) -> Mapping[str, int]:
    """How many queries ended in each outcome (released, repeated, refused...)."""
    if log_rows.empty:
        return {}
    return {str(k): int(v) for k, v in log_rows["outcome"].value_counts().items()}

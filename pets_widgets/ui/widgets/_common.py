"""Small pieces the widgets share: debouncing, styled HTML areas, the progress panel."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as W

from pets_widgets.coordinator.progress import SITE_STEPS, ProgressModel
from pets_widgets.ui import render

log = logging.getLogger("pets_widgets.widgets")


class Debouncer:
    """Call ``fn`` once, ``wait`` seconds after the last of a burst of calls.

    Inside a kernel (an asyncio loop is running) calls are coalesced with ``call_later``, so
    dragging a slider runs a heavy update once, not once per pixel. Without a running loop
    (plain Python, tests) the call happens at once. :meth:`flush` runs a pending call now.
    """

    def __init__(self, fn: Callable[..., Any], wait: float = 0.3):
        self.fn = fn
        self.wait = wait
        self._pending: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._handle: asyncio.TimerHandle | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self._pending = (args, kwargs)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._handle is not None:
            self._handle.cancel()
        self._handle = loop.call_later(self.wait, self.flush)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def cancel(self) -> None:
        """Drop a pending call."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._pending = None

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._pending is None:
            return
        args, kwargs = self._pending
        self._pending = None
        try:
            self.fn(*args, **kwargs)
        except Exception:  # a timer callback has nobody to raise to: log it
            log.exception("debounced update failed")


def html(value: str = "", cls: str = "") -> W.HTML:
    """An HTML widget with our CSS class (stable selectors for browser tests)."""
    widget = W.HTML(value=value)
    if cls:
        widget.add_class(cls)
    return widget


def styles() -> W.HTML:
    """The dashboard's stylesheet, as an (invisible) HTML widget."""
    return W.HTML(value=render.CSS, layout=W.Layout(height="0px", margin="0"))


def show(widget: W.Widget, visible: bool) -> None:
    widget.layout.display = "" if visible else "none"


def classed(widget: W.Widget, *classes: str) -> Any:
    for cls in classes:
        widget.add_class(cls)
    return widget


class ProgressPanel(W.VBox):
    """One bar per site (attest, compute and encrypt, sent) and one overall bar with a
    sentence; :meth:`callback` is what :meth:`Federation.run` calls."""

    def __init__(self, sites: tuple[str, ...]):
        self.model = ProgressModel.for_sites(sites)
        self._lock = threading.Lock()  # parallel backends report from worker threads
        self.overall = classed(W.FloatProgress(value=0.0, min=0.0, max=1.0,
                                               description="Query", bar_style="info"),
                               "pw-progress-overall")
        self.label = html("ready", "pw-progress-text")
        self.site_bars: dict[str, W.IntProgress] = {}
        self.site_labels: dict[str, W.HTML] = {}
        rows = []
        for site in sites:
            bar = classed(W.IntProgress(value=0, min=0, max=len(SITE_STEPS) - 1,
                                        description=site), "pw-progress-site")
            text = html(SITE_STEPS[0], "pw-progress-site-text")
            self.site_bars[site] = bar
            self.site_labels[site] = text
            rows.append(W.HBox([bar, text]))
        super().__init__([W.HBox([self.overall, self.label]), *rows])
        self.add_class("pw-progress")

    def _draw(self) -> None:
        m = self.model
        self.overall.value = m.fraction
        self.overall.bar_style = {"failed": "danger", "done": "success"}.get(m.state, "info")
        self.label.value = render.esc(m.text)
        for site, bar in self.site_bars.items():
            bar.value = m.steps[site]
            self.site_labels[site].value = render.esc(m.site_text(site))

    def start(self) -> None:
        self.model.start()
        self._draw()

    def callback(self, stage: str, site: str | None, fraction: float) -> None:
        with self._lock:
            self.model.update(stage, site, fraction)
            self._draw()

    def finish(self, ok: bool, text: str | None = None) -> None:
        self.model.finish(ok, text)
        self._draw()

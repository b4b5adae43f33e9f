"""Progress of one federated query, per site and per stage, as plain data.

:meth:`Federation.run` reports ``progress(stage, site, fraction)``; this model turns those
calls into what the dashboard draws (one bar per site, one overall bar and a sentence),
without ipywidgets, so the rules are unit-tested headless. Every backend reports
``attest``, ``compute`` and ``encrypt`` per site (``encrypt`` when the site's encrypted
aggregate has arrived: its bar then says "sent"), then ``aggregate`` and ``release`` for the
federation as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: Stages in the order a query goes through them.
STAGES = ("attest", "compute", "encrypt", "aggregate", "release")

#: What a site is doing at each step of its bar (index = step).
SITE_STEPS = ("waiting", "attesting the enclave", "computing + encrypting", "sent")

#: A sentence per stage for the overall bar.
STAGE_TEXT = {
    "attest": "sites check the enclave's attestation",
    "compute": "sites compute and encrypt their counts",
    "encrypt": "sites send their encrypted counts",
    "aggregate": "the coordinator adds the encrypted counts",
    "release": "the enclave decrypts the total, adds noise and hides small cells",
}


@dataclass
class ProgressModel:
    """Per-site steps (0 waiting .. 3 sent), an overall fraction and a status sentence."""

    sites: tuple[str, ...]
    steps: dict[str, int] = field(default_factory=dict)
    fraction: float = 0.0
    stage: str = ""
    text: str = "ready"
    state: str = "idle"  # idle, running, done, failed

    def __post_init__(self) -> None:
        self.reset()

    @classmethod
    def for_sites(cls, sites: Sequence[str]) -> ProgressModel:
        return cls(tuple(sites))

    def reset(self) -> None:
        """Back to the start (before a new query)."""
        self.steps = dict.fromkeys(self.sites, 0)
        self.fraction = 0.0
        self.stage = ""
        self.text = "ready"
        self.state = "idle"

    def start(self) -> None:
        self.reset()
        self.state = "running"
        self.text = "starting"

    def update(self, stage: str, site: str | None, fraction: float) -> None:
        """Take one report from :meth:`Federation.run` (unknown stages only move the bar)."""
        self.state = "running"
        self.fraction = min(1.0, max(self.fraction, float(fraction)))
        self.stage = stage
        if site is not None and site in self.steps:
            step = {"attest": 1, "compute": 2, "encrypt": 3}.get(stage, self.steps[site])
            self.steps[site] = max(self.steps[site], step)
            self.text = f"{site}: {SITE_STEPS[self.steps[site]]}"
        elif stage in ("aggregate", "release"):
            for name in self.steps:
                self.steps[name] = len(SITE_STEPS) - 1
            self.text = STAGE_TEXT[stage]
        else:
            self.text = STAGE_TEXT.get(stage, stage)

    def finish(self, ok: bool, text: str | None = None) -> None:
        """The query ended: released (``ok``) or refused/failed."""
        self.state = "done" if ok else "failed"
        if ok:
            self.fraction = 1.0
        self.text = text or ("released" if ok else "nothing released")

    def site_text(self, site: str) -> str:
        return SITE_STEPS[self.steps[site]]

"""Kaplan-Meier and the log-rank test from noisy counts: ``pw.survival``, re-exported from
:mod:`pets_widgets.enclave.pipeline.survival` (the code runs in the enclave; a user reads its
results)."""

from pets_widgets.enclave.pipeline.survival import *  # noqa: F403

"""Where the time of one query goes: wall time per stage of ``fed.run``, warm and cold.

    python benchmarks/stages.py [--sites 2] [--rows 100000] [--key-bits 2048] [--repeats 10]

Wraps the pipeline's stage functions with timers (nothing else changes) and prints, per
query, the median of each stage's total per query in milliseconds. Stages overlap where the
pipeline runs them in parallel (the sites' threads; the noise, drawn while the totals are
decrypted), so they need not add up to the total.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import POLICY, QUERIES, Epsilons, fill_pools, set_precompute

import pets_widgets as pw
from pets_widgets.core.wire import EncryptedAggregate
from pets_widgets.enclave import decryption, enclave, releaser
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.decryption import Decryptor
from pets_widgets.enclave.releaser import Releaser
from pets_widgets.site import site
from pets_widgets.site.site import Site

#: (owner, attribute, stage): the pipeline's steps, in the order a query meets them. Site
#: stages add up over the sites (which run in parallel threads).
STAGES = (
    (enclave.Enclave, "admit", "admit"),             # policy, stored releases, budget check
    (Site, "_aggregate", "count"),              # each site's one pass over its rows
    (site, "encrypt", "encrypt"),                    # a multiplication warm, a modexp cold
    (EncryptedAggregate, "signed", "sign"),   # Ed25519
    (Decryptor, "verify", "verify"),                 # signatures, nonces, the coordinator's sum
    (decryption, "decrypt", "decrypt"),              # CRT halves on every core
    (releaser, "draw_noise", "noise"),               # OpenDP, while the totals decrypt
    (Releaser, "build", "build"),                    # table, suppression, curves, card
    (audit.Ledger, "reserve", "reserve"),            # SQLite transaction (fsync)
    (audit.Ledger, "commit_release", "commit"),      # release and audit row, one transaction
)


def instrument(spent: dict[str, float]) -> None:
    for owner, name, label in STAGES:
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, _f: Callable[..., Any] = original, _label: str = label,
                  **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - t0

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    spent: dict[str, float] = collections.defaultdict(float)
    instrument(spent)
    fed = pw.demo_federation(seed=7, n_sites=args.sites, rows_per_site=args.rows,
                             key_bits=args.key_bits, policy=POLICY)
    eps = Epsilons()
    table = {}
    for name, spec in QUERIES.items():
        for mode in ("warm", "cold"):
            set_precompute(fed, mode == "warm")
            fed.run(spec, epsilon=eps(), analyst="stages")
            per_stage: dict[str, list[float]] = collections.defaultdict(list)
            for _ in range(args.repeats):
                fill_pools(fed)
                spent.clear()
                t0 = time.perf_counter()
                fed.run(spec, epsilon=eps(), analyst="stages")
                per_stage["fed.run"].append(time.perf_counter() - t0)
                for _, _, label in STAGES:
                    per_stage[label].append(spent[label])
            table[(name, mode)] = {k: statistics.median(v) * 1000 for k, v in per_stage.items()}
    fed.close()
    frame = pd.DataFrame(table).T
    print(f"{args.sites} sites, {args.rows:,} patients each, {args.key_bits}-bit key; "
          f"median ms per query over {args.repeats} runs")
    print(frame.round(1).to_string())


if __name__ == "__main__":
    main()

"""The encrypted pipeline against its floors and against naive Paillier, measured in one run.

    python benchmarks/pipeline.py            # the full matrix (about half an hour)
    python benchmarks/pipeline.py --quick    # 2048-bit keys, 100k patients, 2 and 10 sites

Every row runs one query on the same synthetic sites (local backend) several ways:

``plaintext``
    the floor without cryptography: the pooled rows aggregated from scratch by the same
    one-pass numpy code the sites use (``np.bincount`` over category codes), plus lifelines'
    ``KaplanMeierFitter`` from the pooled counts for survival.
``naive``
    what a user of ``phe`` writes: each site counts, then one ``phe`` ciphertext per cell,
    encrypted on the spot (``public_key.encrypt``), ciphertexts summed with ``+``, each total
    decrypted (``private_key.decrypt``). Its cryptography does not depend on the number of
    patients, so it is measured once per query, number of sites and key size (on every cell,
    or, with ``--naive-cells N``, on N cells per site and scaled linearly by the number of
    cells: ``naive_cells`` says which) and the sites' counting is measured per row.
``cold`` / ``warm``
    ``fed.run`` end to end (attestation, counting, packing, encryption, signatures, the
    homomorphic sum, verification, decryption, noise, suppression, ledger), each repeat at a
    new epsilon so nothing comes from stored releases. Cold: no precomputed obfuscators,
    and the sites' cached cell indices are dropped before each run, so every site searches
    its rows afresh. Warm: the sites' obfuscator pools are refilled between queries, as a
    dashboard's background threads do while the researcher reads the last result, and the
    cell indices of recent layouts are kept.
``modexp floor``
    the measured cost of the fewest modular exponentiations the query needs: one encryption
    (``r^n mod n^2``) per packed ciphertext per site plus one CRT decryption per packed
    ciphertext, each timed here on this machine, added up as if on one core.

``peak_mb`` is the peak of Python-tracked memory (numpy included) allocated during one warm
query; ``data_mb`` the memory of the sites' rows and ``index_mb`` that of the cell indices
the sites keep (one integer per row for each of their last 8 layouts) after the row's runs.
Medians of ``--repeats`` runs; naive runs once.
The service rows run the same queries with every site its own ``site serve`` process on
127.0.0.1 (warm: the benchmark waits between queries while the sites refill their pools;
cold: asked back to back, so with little time to precompute), beside the local backend's
times in the same run, with ``ready_s``: the seconds until the federation answered;
``service`` keeps the enclave in this process, ``service+enclave`` runs it as its own
enclave service (``enclave serve``), as the dashboard does.
Results are printed and saved as CSV (``--csv``, by default under
``benchmarks/results/``, which git ignores).
"""

from __future__ import annotations

import argparse
import functools
import math
import operator
import os
import secrets
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import gmpy2
import numpy as np
import pandas as pd
from phe import paillier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pets_widgets as pw
from pets_widgets.core.packing import Packing
from pets_widgets.core.paillier import foreground
from pets_widgets.site.site import Site

QUERIES: dict[str, pw.QuerySpec] = {
    "count by tumour group": pw.Count(by=["tumour_group"]),
    "crosstab 12x4": pw.Crosstab(rows="tumour_group", cols="age_band"),
    # The schema's largest categorical has 12 levels, so its ~20 x 10 table is three-way.
    "count 12x5x4 (~20x10)": pw.Count(by=["tumour_group", "diagnosis_period", "age_band"]),
    "histogram of age": pw.Histogram(variable="age_at_diagnosis"),
    "survival 5 strata x 120 months": pw.Survival(by="diagnosis_period", horizon_months=120),
}
#: A benchmark's own generous budget: it asks hundreds of questions of synthetic data.
POLICY = pw.Policy(analyst_budget=10_000.0, federation_budget=10_000.0)


def median_ms(fn: Callable[[], object], repeats: int,
              before: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn`` in milliseconds; ``before`` runs untimed before each call."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


class Epsilons:
    """Fresh epsilons, so every run is a new release (never a stored one)."""

    def __init__(self) -> None:
        self._i = 0

    def __call__(self) -> float:
        self._i += 1
        return round(0.5 + self._i * 1e-5, 5)


@functools.cache
def phe_keys(bits: int) -> tuple[paillier.PaillierPublicKey, paillier.PaillierPrivateKey]:
    return paillier.generate_paillier_keypair(n_length=bits)


@functools.cache
def modexp_ms(bits: int) -> tuple[float, float]:
    """Measured milliseconds of one encryption's exponentiation and one CRT decryption."""
    public, private = phe_keys(bits)
    n, nsq = gmpy2.mpz(public.n), gmpy2.mpz(public.nsquare)
    enc = median_ms(lambda: gmpy2.powmod(secrets.randbelow(public.n), n, nsq), 25)
    ciphertext = public.raw_encrypt(12345)
    dec = median_ms(lambda: private.raw_decrypt(ciphertext), 25)
    return enc, dec


def local_sites(fed: pw.Federation) -> list[Site]:
    return [s._site for s in fed._sites]  # the benchmark's view inside the local backend


def fill_pools(fed: pw.Federation) -> None:
    """Let every site's background precomputation finish (what happens between queries)."""
    for site in local_sites(fed):
        for pool in site._pools.values():
            pool.fill()


def set_precompute(fed: pw.Federation, on: bool) -> None:
    for site in local_sites(fed):
        site.precompute = on


def drop_indices(fed: pw.Federation) -> None:
    """Forget every site's cached cell indices (a layout never asked before)."""
    for site in local_sites(fed):
        site._indices.clear()


# --------------------------------------------------------------------------- the floors
def km_from_counts(spec: pw.Survival, counts: np.ndarray) -> None:
    """lifelines' Kaplan-Meier fitted from pooled grid counts, one fit per stratum."""
    from lifelines import KaplanMeierFitter

    w = spec.interval_months
    times = np.repeat(np.arange(1, spec.n_intervals + 2) * w, 2).astype(float)
    times[-2:] = spec.horizon_months  # still followed at the horizon: censored there
    events = np.tile([0, 1], spec.n_intervals + 1)
    events[-2:] = 0
    for stratum in counts.reshape(-1, 2 * (spec.n_intervals + 1)):
        keep = stratum > 0
        if keep.any():
            KaplanMeierFitter().fit(times[keep], events[keep], weights=stratum[keep])


def plaintext_floor(pooled: Site, spec: pw.QuerySpec) -> None:
    counts = pooled._aggregate(spec)
    if isinstance(spec, pw.Survival):
        km_from_counts(spec, counts)


def naive_crypto(vectors: list[np.ndarray], bits: int, cells: int | None) -> float:
    """Milliseconds of naive phe on these per-site vectors (all cells, or ``cells`` per site
    scaled linearly to all of them)."""
    public, private = phe_keys(bits)
    total = len(vectors[0])
    used = total if cells is None else min(cells, total)

    def run() -> None:
        encrypted = [[public.encrypt(int(v)) for v in vec[:used]] for vec in vectors]
        summed = functools.reduce(lambda a, b: list(map(operator.add, a, b)), encrypted)
        [private.decrypt(x) for x in summed]

    return median_ms(run, 1) * total / used


# --------------------------------------------------------------------------- one row
@dataclass
class Row:
    query: str
    backend: str
    key_bits: int
    sites: int
    rows_per_site: int
    cells: int
    ciphertexts_per_site: int
    slot_bits: int
    plaintext_ms: float = math.nan
    naive_ms: float = math.nan
    naive_cells: str = ""
    cold_ms: float = math.nan
    warm_ms: float = math.nan
    modexp_floor_ms: float = math.nan
    peak_mb: float = math.nan
    data_mb: float = math.nan
    index_mb: float = math.nan
    local_warm_ms: float = math.nan
    local_cold_ms: float = math.nan
    ready_s: float = math.nan


def packing_of(fed: pw.Federation, spec: pw.QuerySpec) -> Packing:
    layout = spec.layout(fed.schema)
    return Packing.for_layout(layout.size, layout.max_contribution, len(fed.site_names),
                                     fed.enclave.key_bits, fed.enclave.site_capacity)


def measure_local(fed: pw.Federation, name: str, spec: pw.QuerySpec, *, repeats: int,
                  naive_cache: dict[tuple[str, int, int], tuple[float, str]],
                  naive_cells: int | None, pooled: Site, data_mb: float,
                  rows: int) -> Row:
    eps = Epsilons()
    bits, n_sites = fed.enclave.key_bits, len(fed.site_names)
    packing = packing_of(fed, spec)
    row = Row(name, "local", bits, n_sites, rows, packing.n_cells, packing.n_ciphertexts,
              packing.slot_bits, data_mb=data_mb)
    def run() -> None:
        fed.run(spec, epsilon=eps(), analyst="benchmark")

    set_precompute(fed, True)
    run()  # the first query to this key starts the pools and sets their size
    row.warm_ms = median_ms(run, repeats, before=lambda: fill_pools(fed))
    fill_pools(fed)
    tracemalloc.start()
    run()
    row.peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    fill_pools(fed)  # so no background work runs under the measurements below

    set_precompute(fed, False)
    row.cold_ms = median_ms(run, repeats, before=lambda: drop_indices(fed))
    set_precompute(fed, True)
    run()  # this layout's indices are kept again, as after any query
    row.index_mb = sum(a.nbytes for s in local_sites(fed) for a in s._indices.values()) / 2**20
    fill_pools(fed)

    # From scratch, like a cold query: the pooled rows' cell index is searched afresh.
    row.plaintext_ms = median_ms(lambda: plaintext_floor(pooled, spec), repeats,
                                 before=pooled._indices.clear)
    vectors = [site._aggregate(spec) for site in local_sites(fed)]
    counting_ms = median_ms(lambda: [site._aggregate(spec) for site in local_sites(fed)],
                            repeats)
    key = (name, n_sites, bits)
    if key not in naive_cache:
        naive = naive_crypto(vectors, bits, naive_cells)
        used = packing.n_cells if naive_cells is None else min(naive_cells, packing.n_cells)
        label = "all" if used == packing.n_cells else f"{used} scaled"
        naive_cache[key] = (naive, label)
    naive, row.naive_cells = naive_cache[key]
    row.naive_ms = naive + counting_ms
    enc, dec = modexp_ms(bits)
    row.modexp_floor_ms = packing.n_ciphertexts * (n_sites * enc + dec)
    return row


def measure_services(n_sites: int, rows: int, bits: int, repeats: int,
                     local: dict[str, Row], enclave: str = "local") -> list[Row]:
    """Site services, with the enclave in this process (``service``) or as its own enclave
    service (``service+enclave``: every query then also makes two calls to the enclave)."""
    out = []
    enc, _ = modexp_ms(bits)
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    backend = "service" if enclave == "local" else "service+enclave"
    analyst = "benchmark" if enclave == "local" else None  # a service charges its token
    with pw.demo_federation(seed=7, n_sites=n_sites, rows_per_site=rows, key_bits=bits,
                            policy=POLICY, backend="service", enclave=enclave) as fed:
        ready = time.perf_counter() - t0
        for name, spec in QUERIES.items():
            eps = Epsilons()
            packing = packing_of(fed, spec)
            # Time for every site to refill what a query used, on this machine's cores.
            refill = math.ceil(n_sites / cores) * packing.n_ciphertexts * enc / 1000 * 1.5
            def run(spec: pw.QuerySpec = spec, eps: Epsilons = eps) -> None:
                fed.run(spec, epsilon=eps(), analyst=analyst)

            run()
            row = Row(name, backend, bits, n_sites, rows, packing.n_cells,
                      packing.n_ciphertexts, packing.slot_bits)
            row.cold_ms = median_ms(run, repeats)
            wait = refill + foreground.GRACE + 0.2
            row.warm_ms = median_ms(run, repeats, before=functools.partial(time.sleep, wait))
            base = local.get(name)
            row.local_warm_ms = base.warm_ms if base else math.nan
            row.local_cold_ms = base.cold_ms if base else math.nan
            row.ready_s = ready
            out.append(row)
    return out


# --------------------------------------------------------------------------- reporting
def report(rows: list[Row]) -> pd.DataFrame:
    df = pd.DataFrame([r.__dict__ for r in rows])
    floor = df.modexp_floor_ms + df.plaintext_ms
    df["naive/warm"] = df.naive_ms / df.warm_ms
    df["naive/cold"] = df.naive_ms / df.cold_ms
    df["cold/(modexp+plain)"] = df.cold_ms / floor
    df["warm/plain"] = df.warm_ms / df.plaintext_ms
    df["cold/plain"] = df.cold_ms / df.plaintext_ms
    df["service/local"] = df.warm_ms / df.local_warm_ms
    df["service/local cold"] = df.cold_ms / df.local_cold_ms
    return df


SHOW = {
    "local": ["query", "key_bits", "sites", "rows_per_site", "cells", "ciphertexts_per_site",
              "plaintext_ms", "naive_ms", "cold_ms", "warm_ms", "modexp_floor_ms",
              "naive/warm", "naive/cold", "cold/(modexp+plain)", "cold/plain", "peak_mb"],
    "service": ["query", "key_bits", "sites", "rows_per_site", "warm_ms", "local_warm_ms",
                "service/local", "cold_ms", "local_cold_ms", "service/local cold", "ready_s"],
}
SHOW["service+enclave"] = SHOW["service"]


def print_tables(df: pd.DataFrame) -> None:
    fmt = {c: "{:,.1f}".format for c in df.columns if c.endswith("_ms") or c.endswith("_mb")}
    fmt.update({c: "{:,.2f}".format for c in df.columns if "/" in c})
    for backend, columns in SHOW.items():
        part = df[df.backend == backend]
        if part.empty:
            continue
        print(f"\n== {backend} backend ==")
        print(part[columns].to_string(index=False, formatters=fmt))
    local = df[df.backend == "local"]
    print("\n== scaling: cold cost per ciphertext per site, and memory with the data ==")
    scale = local.assign(
        cold_ms_per_ct_site=local.cold_ms / (local.ciphertexts_per_site * local.sites),
        warm_ms_per_cell=local.warm_ms / local.cells)
    print(scale[["query", "key_bits", "sites", "rows_per_site", "cold_ms_per_ct_site",
                 "warm_ms_per_cell", "data_mb", "index_mb", "peak_mb"]]
          .to_string(index=False, formatters={c: "{:,.3f}".format for c in
                                              ("cold_ms_per_ct_site", "warm_ms_per_cell")}
                     | {c: "{:,.1f}".format for c in ("data_mb", "index_mb", "peak_mb")}))


def markdown(df: pd.DataFrame) -> str:
    """The README's tables from a saved run: every query at 2048 bits and 100k patients, the
    two heaviest queries elsewhere in the matrix, and the service rows."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) and v >= 10_000 else str(v)

    def table(part: pd.DataFrame, columns: dict[str, str]) -> str:
        lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |"
                  for r in part.to_dict("records")]
        return "\n".join(lines)

    local = df[df.backend == "local"]
    base = (local.key_bits == 2048) & (local.rows_per_site == 100_000)
    heavy = local[~base & local["query"].str.match("survival|count 12x5x4")].assign(
        query=lambda d: d["query"].str.replace(r" \(.*\)| 5 strata.*", "", regex=True))
    return "\n\n".join([
        table(local[base], {"query": "query", "sites": "sites", "cells": "cells",
                            "ciphertexts_per_site": "ct/site", "plaintext_ms": "plaintext ms",
                            "naive_ms": "naive ms", "cold_ms": "cold ms", "warm_ms": "warm ms",
                            "modexp_floor_ms": "modexp floor ms", "naive/warm": "naive/warm",
                            "naive/cold": "naive/cold",
                            "cold/(modexp+plain)": "cold/(modexp+plain)"}),
        table(heavy, {"query": "query", "key_bits": "key", "sites": "sites",
                      "rows_per_site": "patients/site", "ciphertexts_per_site": "ct/site",
                      "naive_ms": "naive ms", "cold_ms": "cold ms", "warm_ms": "warm ms",
                      "naive/warm": "naive/warm", "naive/cold": "naive/cold",
                      "data_mb": "data MB", "index_mb": "index MB", "peak_mb": "peak MB"}),
        table(df[df.backend.str.startswith("service")], {"query": "query",
                                            "backend": "backend", "sites": "sites",
                                            "warm_ms": "service warm ms",
                                            "local_warm_ms": "local warm ms",
                                            "service/local": "service/local",
                                            "cold_ms": "service cold ms",
                                            "service/local cold": "service/local cold",
                                            "ready_s": "ready s"}),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2048-bit keys, 100k patients per site, 2 and 10 sites, local "
                             "and as site services, naive on 16 cells per site (a few "
                             "minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per median")
    parser.add_argument("--naive-cells", type=int, default=None,
                        help="measure naive phe on this many cells per site, scaled")
    parser.add_argument("--csv", type=Path, default=None, help="where to save the table")
    parser.add_argument("--markdown", type=Path, default=None, metavar="CSV",
                        help="print the README's tables from a saved run and stop")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown(pd.read_csv(args.markdown)))
        return
    if args.quick:
        grid = [(2048, n, 100_000) for n in (2, 10)]
        service_grid = [(2048, n, 100_000) for n in (2, 10)]
        repeats = args.repeats or 3
        naive_cells = args.naive_cells or 16
    else:
        grid = [(bits, n, rows) for bits in (2048, 3072) for rows in (100_000, 1_000_000)
                for n in (2, 10)]
        service_grid = [(2048, n, 100_000) for n in (2, 10)]
        repeats = args.repeats or 5
        naive_cells = args.naive_cells
    csv = args.csv or (Path(__file__).parent / "results" /
                       f"pipeline-{datetime.now(UTC):%Y%m%dT%H%M%S}.csv")
    started = time.perf_counter()
    print(f"pets_widgets pipeline benchmark: {os.cpu_count()} cores, repeats {repeats}, "
          f"naive cells {naive_cells or 'all'}")
    for bits in sorted({g[0] for g in grid}):
        enc, dec = modexp_ms(bits)
        print(f"  {bits}-bit key: one encryption exponentiation {enc:.2f} ms, "
              f"one CRT decryption {dec:.2f} ms")
    rows: list[Row] = []
    naive_cache: dict[tuple[str, int, int], tuple[float, str]] = {}
    for bits, n_sites, n_rows in grid:
        t0 = time.perf_counter()
        with pw.demo_federation(seed=7, n_sites=n_sites, rows_per_site=n_rows, key_bits=bits,
                                policy=POLICY) as fed:
            pooled_rows = pw.testing.pooled_rows(fed)
            pooled = Site(fed.site_names[0], pooled_rows, fed.schema,
                          capacity=len(pooled_rows))
            data_mb = sum(s._rows.memory_usage(deep=True).sum() for s in local_sites(fed))
            for name, spec in QUERIES.items():
                rows.append(measure_local(fed, name, spec, repeats=repeats,
                                          naive_cache=naive_cache, naive_cells=naive_cells,
                                          pooled=pooled, data_mb=data_mb / 2**20, rows=n_rows))
            del pooled, pooled_rows
        print(f"  measured {bits}-bit, {n_sites} sites, {n_rows:,} patients each "
              f"in {time.perf_counter() - t0:.0f} s")
    for bits, n_sites, n_rows in service_grid:
        local = {r.query: r for r in rows if (r.key_bits, r.sites, r.rows_per_site)
                 == (bits, n_sites, n_rows)}
        for enclave in ("local", "service"):
            rows.extend(measure_services(n_sites, n_rows, bits, repeats, local, enclave))
            print(f"  measured site services ({enclave} enclave): {bits}-bit, {n_sites} sites")
    df = report(rows)
    print_tables(df)
    csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(csv, index=False)
    print(f"\nsaved {csv} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()

"""Start-up time and per-query latency of the local, kernel and gateway site backends.

    python benchmarks/backends.py [--rows 3000] [--key-bits 2048] [--queries 20]

Prints one JSON report. Everything runs on 127.0.0.1: the gateway is started here with a
random token in its own process group and stopped at the end. Latency is the median wall
time of ``fed.run`` (parallel fan-out, noise, suppression: what a user waits for) and of one
bare site call (``challenge``: the transport's round trip), each over fresh epsilons so no
answer comes from the stored releases.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pets_widgets as pw
from tests.kernel_helpers import kernel_gateway

SPEC = pw.Count(by=["tumour_group", "sex"])


def measure(fed: pw.Federation, n: int) -> dict[str, float]:
    fed.run(SPEC, epsilon=0.5)  # warm-up
    runs, calls = [], []
    for i in range(n):
        t0 = time.perf_counter()
        fed.run(SPEC, epsilon=round(0.01 + 0.001 * i, 4))
        runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fed._sites[0].challenge()
        calls.append(time.perf_counter() - t0)
    return {"run_ms_median": round(statistics.median(runs) * 1000, 1),
            "site_call_ms_median": round(statistics.median(calls) * 1000, 2)}


def config(folder: Path, backend: str, n_sites: int, rows: int, url: str = "") -> Path:
    extra = f'url = "{url}"\ntoken_env = "PETS_BENCH_TOKEN"\n' if backend == "gateway" else ""
    text = "".join(
        f'[[sites]]\nname = "S{i}"\nbackend = "{backend}"\n{extra}'
        f'source = {{ kind = "synthetic", seed = {i}, size = {rows} }}\n\n'
        for i in range(n_sites))
    path = folder / f"{backend}-{n_sites}.toml"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    policy = pw.Policy(analyst_budget=1000.0, federation_budget=1000.0)
    report: dict[str, object] = {"rows_per_site": args.rows, "key_bits": args.key_bits,
                                 "spec": SPEC.describe(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for n_sites in (2, 5):
            for backend in ("local", "kernel"):
                t0 = time.perf_counter()
                with pw.Federation.from_config(config(folder, backend, n_sites, args.rows),
                                               key_bits=args.key_bits, policy=policy) as fed:
                    entry: dict[str, object] = {
                        "start_s": round(time.perf_counter() - t0, 2)}
                    if backend == "kernel":
                        entry["kernel_start_s"] = [s.kernel_info["start_seconds"]
                                                   for s in fed._sites]
                    entry.update(measure(fed, args.queries))
                    report[f"{backend}_{n_sites}"] = entry
        with kernel_gateway(folder) as gw:
            os.environ["PETS_BENCH_TOKEN"] = gw.token
            t0 = time.perf_counter()
            with pw.Federation.from_config(config(folder, "gateway", 2, args.rows, gw.url),
                                           key_bits=args.key_bits, policy=policy) as fed:
                entry = {"start_s": round(time.perf_counter() - t0, 2)}
                entry.update(measure(fed, args.queries))
                fed._sites[0].quickack = False
                t0 = time.perf_counter()
                for _ in range(args.queries):
                    fed._sites[0].challenge()
                entry["site_call_ms_mean_without_quickack"] = round(
                    (time.perf_counter() - t0) / args.queries * 1000, 2)
                report["gateway_2"] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

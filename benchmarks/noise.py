"""The enclave's noise for one release: drawn on demand, and taken from the pool drawn ahead.

    python benchmarks/noise.py

Medians of 30 draws of every block's noise for the survival preset's layout (the largest
layout the dashboard asks for) and a 48-cell crosstab, at epsilon 1: ``on demand`` is one
vectorised OpenDP call per block when the release is made; ``pool`` takes the same draws
from a :class:`~pets_widgets.enclave.pipeline.noise.NoisePool` refilled between releases, as
the enclave service does (the draws are the same distribution, each used once).
"""

from __future__ import annotations

import statistics
import time
from fractions import Fraction

import pets_widgets as pw
from pets_widgets.core.schema import default_schema
from pets_widgets.enclave.pipeline.noise import NoisePool, OpenDPDiscreteLaplace
from pets_widgets.enclave.pipeline.release import draw_noise

REPEATS = 30


def median_ms(mechanism: OpenDPDiscreteLaplace, layout: object, pool: NoisePool | None) -> float:
    times = []
    for _ in range(REPEATS):
        if pool is not None:
            pool.wait()  # refilled between releases, as while the researcher reads
        t0 = time.perf_counter()
        draw_noise(mechanism, layout, Fraction(1))  # type: ignore[arg-type]
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    schema = default_schema()
    print(f"{'layout':34} {'cells':>6} {'on demand ms':>13} {'pool ms':>9} {'ratio':>7}")
    for name, spec in (("survival preset by tumour group", pw.presets.survival(
            "by_tumour_group")), ("crosstab 12x4", pw.Crosstab(rows="tumour_group",
                                                               cols="age_band"))):
        layout = spec.layout(schema)
        direct = OpenDPDiscreteLaplace()
        draw_noise(direct, layout, Fraction(1))  # OpenDP's measurement built once
        pool = NoisePool()
        pooled = OpenDPDiscreteLaplace(pool)
        pool.warm([Fraction(1)], 2 * layout.size)
        on_demand, from_pool = median_ms(direct, layout, None), median_ms(pooled, layout, pool)
        print(f"{name:34} {layout.size:>6} {on_demand:>13.2f} {from_pool:>9.3f} "
              f"{on_demand / from_pool:>7.1f}")


if __name__ == "__main__":
    main()

"""Write ``registry_example.csv``: 400 synthetic patients of a made-up registry "NORDIC",
and ``registry_example_population.csv``: its public person-years (for incidence rates).

The files describe no one: they are :func:`pets_widgets.synthetic.registry` with a fixed
seed and :func:`pets_widgets.synthetic.population`, written with pandas. Regenerate them
(byte for byte) with::

    python examples/make_registry_example.py
"""

from __future__ import annotations

from pathlib import Path

from pets_widgets.site import synthetic

SITE, SEED, ROWS, CASES_PER_YEAR = "NORDIC", 2024, 400, 17


def main() -> Path:
    profile = synthetic.SiteProfile(SITE, CASES_PER_YEAR)
    rows = synthetic.registry(profile, SEED, ROWS)
    path = Path(__file__).with_name("registry_example.csv")
    rows.to_csv(path, index=False, lineterminator="\n")
    synthetic.population(profile).drop(columns=["site"]).to_csv(
        path.with_name("registry_example_population.csv"), index=False, lineterminator="\n")
    return path


if __name__ == "__main__":
    print(main())

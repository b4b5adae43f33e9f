"""Write ``registry_example.csv``: 400 synthetic patients of a made-up registry "NORDIC".

The file describes no one: it is :func:`pets_widgets.synthetic.registry` with a fixed seed,
written with pandas. Regenerate it (byte for byte) with::

    python examples/make_registry_example.py
"""

from __future__ import annotations

from pathlib import Path

from pets_widgets import synthetic

SITE, SEED, ROWS, CASES_PER_YEAR = "NORDIC", 2024, 400, 17


def main() -> Path:
    rows = synthetic.registry(synthetic.SiteProfile(SITE, CASES_PER_YEAR), SEED, ROWS)
    path = Path(__file__).with_name("registry_example.csv")
    rows.to_csv(path, index=False, lineterminator="\n")
    return path


if __name__ == "__main__":
    print(main())

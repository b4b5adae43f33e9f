"""Documentation that cannot drift: the README's published policy defaults are the code's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pets_widgets as pw

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    """The README text under a heading, up to the next heading."""
    text = README.read_text().split(title, 1)[1]
    return re.split(r"^#{2,4} ", text, maxsplit=1, flags=re.M)[0]


def test_readme_policy_table_matches_the_code():
    text = section("### The release policy")
    published = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", text, flags=re.M))
    policy = pw.Policy()
    fields = {f.name for f in dataclasses.fields(policy)}
    assert set(published) == fields
    for name in fields:
        assert published[name] == str(getattr(policy, name)), name


def test_readme_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = next(c for c in commands if "test" in c)
    assert test_command in ci


def test_readme_site_configuration_table_names_every_key():
    from pets_widgets.site import config

    text = section("#### The site configuration")
    named = set(re.findall(r"`(?:\[(\w+)\] )?(\w+)`", text))
    published = {key for _, key in named} | {table for table, _ in named if table}
    keys = {*config.TOP_KEYS, *config.TRUST_KEYS, *config.FLOOR_KEYS}
    assert keys <= published, keys - published


def test_readme_enclave_routes_are_the_services_routes():
    import json

    text = section("## The enclave as a service")
    published = set(re.findall(r"^\| `((?:GET|POST) /\w+)` \|", text, flags=re.M))
    notebook = json.loads((README.parent / "pets_widgets" / "enclave" / "service.ipynb")
                          .read_text())
    served = {"".join(c["source"]).splitlines()[0][2:] for c in notebook["cells"]
              if c["cell_type"] == "code" and "".join(c["source"]).startswith(("# GET",
                                                                              "# POST"))}
    assert published == served == {"GET /status", "POST /admit", "POST /release",
                                   "GET /budget", "GET /audit"}

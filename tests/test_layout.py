"""The folders are the trust domains: the import rules between them, read from the source.

``core`` imports nothing else of ours; ``site`` and ``enclave`` import ``core`` (and
themselves) only, never each other; ``coordinator`` never imports ``ui``; nothing imports ``ui``
or the test door ``testing``, except the package's public face (the thin re-export modules
at its top level and the command line).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pets_widgets as pw

PACKAGE = Path(pw.__file__).resolve().parent
DOMAINS = ("core", "site", "enclave", "platform", "coordinator", "ui")
#: What each domain may import, besides itself.
ALLOWED = {
    "core": set(),
    "site": {"core"},
    "enclave": {"core"},
    "platform": {"core"},
    "coordinator": {"core", "site", "enclave", "platform"},
    "ui": {"core", "site", "enclave", "platform", "coordinator"},
    "testing": {"core", "site", "enclave", "platform", "coordinator"},
}
#: Top-level modules that are the public face: they may reach into ``ui`` (re-exports, CLI).
FACE = {"__init__", "__main__", "schema", "presets", "plots", "survival", "widgets", "audit"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, name: str | None = None) -> set[str]:
    """Every pets_widgets module ``path`` (module ``name``) imports, anywhere in the file
    (functions and ``TYPE_CHECKING`` blocks included), relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = (name or module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            # ``from pets_widgets.enclave import ledger`` imports the submodule too
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == "pets_widgets" or m.startswith("pets_widgets.")}


def domain_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in (*DOMAINS, "testing"):
        return parts[1]
    return None


def test_every_module_lives_in_a_domain_or_is_the_public_face():
    loose = [p.name for p in PACKAGE.glob("*.py")
             if p.stem not in FACE and p.stem != "testing"]
    assert loose == []
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} \
        == set(DOMAINS)


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_imports_follow_the_trust_domains(path):
    me = domain_of(module_name(path))
    bad = []
    for target in imported(path):
        other = domain_of(target)
        if target == "pets_widgets" and me is not None:
            bad.append(target)  # the package face imports the coordinator and more
        if other is None or other == me:
            continue
        if other == "testing":
            bad.append(target)
        elif me is None:
            if other == "ui" and path.stem not in FACE:
                bad.append(target)
        elif other not in ALLOWED[me]:
            bad.append(target)
    assert bad == [], f"{module_name(path)} may not import {sorted(bad)}"


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from pets_widgets.enclave import ledger\n"
                      "from ..ui import render\n")
    found = imported(sample, "pets_widgets.site.sample")
    assert {"pets_widgets.enclave.ledger", "pets_widgets.ui.render"} <= found
    assert domain_of("pets_widgets.enclave.ledger") == "enclave"

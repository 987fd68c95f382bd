"""Layers import one way: ir <- {passes, runtime} <- api <- tools/cli (docs/architecture.md).

Every ``import`` of every module under ratel/ is read from its source — at module level and inside
functions alike — and checked against the layer order. A module may import its own layer and the layers
below it; passes and runtime are siblings that never import each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ratel"

# Layer of each module, by longest matching prefix. "ir" is the vocabulary every other layer shares.
LAYERS = {
    "ratel.errors": "ir",
    "ratel.ir": "ir",
    "ratel.models": "ir",          # reference models: plain torch, usable by every layer
    "ratel.trace": "passes",       # capture and unit discovery: the compiler's front end
    "ratel.shape_trace": "passes", # one symbolic capture, a static graph per input shape
    "ratel.passes": "passes",
    "ratel.runtime": "runtime",
    "ratel._adam": "runtime",      # native extensions
    "ratel._swapper": "runtime",
    "ratel.api": "api",
    "ratel.engine": "api",
    "ratel.checkpoint": "api",
    "ratel.data": "api",           # training data: examples, tokenizers, packing, batches
    "ratel.optim": "api",
    "ratel.program_cache": "api",
    "ratel.tools": "tools",
    "ratel.cli": "tools",
    "ratel.__main__": "tools",
    "ratel": "tools",              # the package itself re-exports the public face
}
# What each layer may import (besides itself).
ALLOWED = {
    "ir": set(),
    "passes": {"ir"},
    "runtime": {"ir"},
    "api": {"ir", "passes", "runtime"},
    "tools": {"ir", "passes", "runtime", "api"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return LAYERS[name]
    raise KeyError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str):
    """(imported module, line) for every import statement in the file, wherever it stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "ratel":   # "from ratel import _adam": the names are modules
                for alias in node.names:
                    yield f"ratel.{alias.name}", node.lineno
            else:
                yield target, node.lineno


def violations() -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        mine = layer_of(module)
        for target, line in imports_of(path, module):
            if target != "ratel" and not target.startswith("ratel."):
                continue
            theirs = layer_of(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                out.append(f"{path.relative_to(ROOT.parent)}:{line}: {module} ({mine}) imports {target} ({theirs})")
    return out


def test_every_import_follows_the_layer_order():
    assert violations() == []


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        layer_of(module_name(path))


@pytest.mark.parametrize("source, expected", [
    ("from ratel.runtime import ops\n", "imports ratel.runtime"),
    ("def f():\n    from ratel.tools.summary import plan_summary\n", "imports ratel.tools.summary"),
])
def test_the_walk_sees_module_level_and_function_level_imports(tmp_path, monkeypatch, source, expected):
    # A pass importing the runtime, or the IR importing a tool, is what the test must catch.
    fake_root = tmp_path / "ratel"
    (fake_root / "passes").mkdir(parents=True)
    (fake_root / "__init__.py").write_text("")
    (fake_root / "passes" / "__init__.py").write_text("")
    (fake_root / "passes" / "bad.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    found = violations()
    assert len(found) == 1 and expected in found[0], found


def test_the_meta_keys_table_names_every_module_that_touches_a_key():
    import re

    import ratel.ir as ir
    names = {value: name for name, value in vars(ir).items() if name.startswith("META_") and isinstance(value, str)}
    sources = {path.stem: path.read_text() for path in ROOT.rglob("*.py") if path.name != "__init__.py"}
    for key, (_, writers, readers) in ir.META_KEYS.items():
        users = {stem for stem, text in sources.items() if re.search(rf"\b{names[key]}\b", text)}
        assert sorted(u for u in users if u not in writers + " " + readers) == [], key

"""Imports point one way (issue #14): the package's layers, checked on every import in the source.

Every ``import`` of the package (module-level or inside a function: a lazy import is still a
dependency) is resolved to the unit it names (a top-level module or sub-package of
megatron_twist) and must point to a unit of the same or a lower layer; units of one layer may
use each other, but the unit graph must have no cycle. Tests and benchmarks must not import a
private (underscore) name of the package. A fresh scan, no import of the package itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_twist"

# Lowest first. What each layer is for: docs/ARCHITECTURE.md "Layers".
LAYERS = [
    {"errors", "config", "faults", "outputs", "cpu_shim", "arguments"},  # plain values, no torch model code
    {"model"},  # the Megatron-core GPT
    {"optim", "data"},  # AdamW + the one train step; corpus, tokenizer, datasets, batches
    {"twist"},  # TwIST itself: sampling, slicing, aggregation, the round, the subnet, extraction
    {"distributed"},  # process groups, layouts, sharded state, the watchdog
    {"checkpoint"},  # every file format, atomic publishing, detection, resume checks, vetting
    {"integrations", "hf", "evaluation", "planning"},  # DeepSpeed / Megatron-LM, HF, perplexity, planner
    {"training", "tools"},  # the trainers, launch, setup; one-process tools
    {"cli", "__main__", "__init__"},  # the command line
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path):
    """(line, imported module) of every import of the package in ``path``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "megatron_twist":  # `from megatron_twist import outputs`: the names are units
                for alias in node.names:
                    yield node.lineno, f"megatron_twist.{alias.name}"
            elif target.startswith("megatron_twist."):
                yield node.lineno, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_twist."):
                    yield node.lineno, alias.name


def unit_graph():
    edges, violations = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = unit_of(module_name(path)) if module_name(path) != "megatron_twist" else "__init__"
        for line, target in imports_of(path):
            dst = unit_of(target)
            if dst == src:
                continue
            edges.setdefault(src, set()).add(dst)
            if src not in RANK or dst not in RANK:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src} or {dst} is in no layer")
            elif RANK[dst] > RANK[src]:
                violations.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {src} (layer {RANK[src]}) imports "
                    f"{target} (layer {RANK[dst]})"
                )
    return edges, violations


def find_cycle(edges):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_every_import_points_down_the_layers():
    edges, violations = unit_graph()
    assert violations == []
    assert set(edges) <= set(RANK), "every unit of the package is in a layer"


def test_the_units_form_no_cycle():
    edges, _ = unit_graph()
    assert find_cycle(edges) is None, find_cycle(edges)


def test_every_unit_of_the_package_has_a_layer():
    units = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").is_file())
    }
    assert units <= set(RANK), sorted(units - set(RANK))


def test_the_checks_catch_what_they_forbid(tmp_path):
    """An upward import and a cycle are found (the checks can fail)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    fake = tmp_path / "megatron_twist"
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "model" / "__init__.py").write_text("")
    (fake / "model" / "gpt.py").write_text("def f():\n    from ..training import launch\n")
    globals()["PACKAGE"], saved = fake, PACKAGE
    try:
        _, violations = unit_graph()
    finally:
        globals()["PACKAGE"] = saved
    assert len(violations) == 1 and "model (layer 1) imports megatron_twist.training (layer 7)" in violations[0]


def test_tests_and_tools_use_no_private_name_of_the_package():
    root = PACKAGE.parent
    offenders = []
    for folder in ("tests", "benchmarks", "examples"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_twist"):
                    offenders += [
                        f"{path.relative_to(root)}:{node.lineno}: {a.name}"
                        for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                    ]
    assert offenders == []

"""The package is a one-way house: floors import only downward, and no import cycle anywhere.

Static: every ``import`` and ``from ... import`` in ``hpc_lensiam/`` is parsed with ``ast`` -- module-level
ones, relative ones and the lazy ones inside functions alike (a lazy import only postpones a cycle to
the first call, it does not remove it) -- and resolved to the package's own modules. Imports under
``if TYPE_CHECKING:`` never run and are left out. Three checks on that graph:

- the layers (:data:`LAYERS`): ``core`` < ``shards``, ``evaluation``, ``models`` < the stages < ``cli``
  (with ``__init__``, ``__main__`` and ``launch`` at the top). A module imports its own unit, any unit
  of a lower layer, and a unit of its own layer only along a declared edge (:data:`EDGES`);
- no cycle between modules, and none between units (subpackages): the data's one-way trip
  (simulate -> shards -> train -> checkpoint -> embed/export/finetune) holds in the code too;
- the checker itself fails on a planted upward import in a copy of the real package.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

PACKAGE = "hpc_lensiam"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# Lowest first. A unit is a subpackage, or a top-level module (`cli`, `__init__`, ...).
LAYERS: list[set[str]] = [
    {"core"},  # errors, rng, lock, io, the config machinery, ranks and devices: no stage's knowledge
    {"shards", "evaluation", "models"},  # the data contract; statistics and probes; networks and weights
    {"simulate", "ingest", "data", "train", "embed", "downstream"},  # the stages
    {"cli"},
    {"__init__", "__main__", "launch"},  # entry points
]
# Imports between two units of one layer, each with its reason; any other is an error.
EDGES: dict[tuple[str, str], str] = {
    ("models", "shards"): "a checkpoint's image shape is read from its data's manifest",
    ("data", "simulate"): "--data online renders pairs on the training device",
    ("train", "data"): "training consumes the data sources and loaders",
    ("ingest", "simulate"): "real cutouts land on a simulation preset's grid (INSTRUMENT_PRESETS)",
    ("embed", "ingest"): "`similar --image` embeds a real cutout as ingest prepares it",
    ("embed", "data"): "embed reads its batches through the training loader's worker machinery",
    ("embed", "downstream"): "embed and similar write their --table catalogues with predict's writer",
}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def unit_of(module: str) -> str:
    """The layer unit of a module: its subpackage, or the top-level module's own name."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]  # the package's own __init__, or cli, core, ...


def layer_of(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"unit {unit!r} is in no layer of tests/ops/test_imports.py's LAYERS: place it there")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a unit that is not below a's, not a's own and not a declared edge."""
    bad = []
    for a in sorted(graph):
        ua = unit_of(a)
        for b in sorted(graph[a]):
            ub = unit_of(b)
            if ua == ub or (ua, ub) in EDGES:
                continue
            la, lb = layer_of(ua), layer_of(ub)
            if lb < la:
                continue
            why = "upward" if lb > la else "sideways, not a declared edge"
            bad.append(f"{a} -> {b} ({ua} -> {ub}: {why})")
    return bad


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """unit -> the units it imports (the package-level graph)."""
    units: dict[str, set[str]] = {}
    for a, targets in graph.items():
        ua = unit_of(a)
        units.setdefault(ua, set()).update(unit_of(b) for b in targets)
    return {u: deps - {u} for u, deps in units.items()}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (edges to itself dropped)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start from
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            if node.level:
                base_parts = here.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets.add(base)
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One example cycle (a -> b -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the package is small, recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(graph, set(comp)) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def test_graph_sees_relative_lazy_and_absolute_imports():
    """The parser finds the kinds of import the package uses, so an empty cycle list means something."""
    graph = import_graph(package_modules())
    assert f"{PACKAGE}.core.errors" in graph[f"{PACKAGE}.cli"]  # module-level relative: from .core.errors import
    assert f"{PACKAGE}.simulate.writer" in graph[f"{PACKAGE}.cli"]  # lazy, inside _cmd_simulate
    assert f"{PACKAGE}.cli" in graph[f"{PACKAGE}.__main__"]


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_package_modules():
    cycles = find_cycles(import_graph(package_modules()))
    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_between_units():
    """The package-level graph (subpackages and top-level modules) is acyclic too."""
    modules = package_modules()
    cycles = find_cycles(unit_graph(import_graph(modules)))
    assert not cycles, "unit-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_unit_has_a_layer():
    modules = package_modules()
    for module in modules:
        layer_of(unit_of(module))


def test_imports_only_go_down_the_layers():
    """core < shards, evaluation, models < stages < cli < entry points; stage-to-stage only along EDGES."""
    modules = package_modules()
    bad = layer_violations(import_graph(modules))
    assert not bad, "imports against the layers (lazy ones included):\n" + "\n".join(bad)


def test_layer_check_fails_on_a_planted_upward_import(tmp_path):
    """A copy of the real package with one lazy ``from ..cli import main`` planted in a core module
    (and one sideways stage import) must fail the check, naming both imports; the copy as it is passes."""
    copy = tmp_path / PACKAGE
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    modules = package_modules(copy)
    assert layer_violations(import_graph(modules)) == []

    rng = copy / "core" / "rng.py"
    rng.write_text(rng.read_text() + "\n\ndef _planted():\n    from ..cli import main\n\n    return main\n")
    finetune = copy / "downstream" / "finetune.py"
    finetune.write_text(
        finetune.read_text() + "\n\ndef _planted():\n    from ..train.loop import train\n\n    return train\n"
    )
    modules = package_modules(copy)
    bad = layer_violations(import_graph(modules))
    assert bad == [
        f"{PACKAGE}.core.rng -> {PACKAGE}.cli (core -> cli: upward)",
        f"{PACKAGE}.downstream.finetune -> {PACKAGE}.train.loop (downstream -> train: sideways, not a declared edge)",
    ]
    assert find_cycles(unit_graph(import_graph(modules)))  # core -> cli -> core: a unit cycle too


def test_the_test_process_does_not_see_bench_scripts_as_top_level_modules():
    """bench/ and tests/ hold scripts with plain names; on sys.path they shadow libraries that
    dependencies import optionally (a bench/coverage.py made numba's `import coverage` find it and
    fail, erroring 170 tests). Every test module is imported before this runs (pytest collects all
    first), so a module that puts bench/ on sys.path fails here."""
    bench = ROOT.parent / "bench"
    assert not [p for p in sys.path if p and Path(p).resolve() == bench.resolve()]

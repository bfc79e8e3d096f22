"""The import contract: layers import only downward, runtime rooms only downward, backends and
recurrence families never import each other, and no module imports itself back through others.

Every import counts, those inside functions included (they hide cycles, not remove them). The graph is
read from the source with ``ast``, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP = {"tests", "benchmarks", "build", ".git", ".ci", "docs"}

#: Layers of the package, bottom first: a module may import its own layer or one below.
LAYERS = [
    ("core", "stdlib_patterns"),
    ("spec",),
    ("compiler",),
    ("runtime",),
    ("integrations", "png", "distributed"),
    ("cli",),
    ("",),  # the package root: attnc/__init__.py
]

#: Rooms of the runtime, bottom first (a room may import its own rank or a lower one).
RUNTIME_ROOMS = [
    ("runtime.numerics", "runtime.checks", "runtime.tritonenv", "runtime.kernel_fit", "runtime.runner",
     "runtime.scale_clause", "runtime.compiling"),
    ("runtime.frontends",),
    ("runtime.plan",),
    ("runtime.admission", "runtime.ops"),  # the front door of a call; the custom ops call runners by key
    ("runtime.backends", "runtime.recurrences"),
    ("runtime.parallel",),  # context parallelism: the reference's scores, the recurrence runners
    ("runtime.tuning",),
    ("runtime.auto",),
    ("runtime.registry",),
    ("runtime.pooled_probs",),  # a pooled branch's probabilities (a route by probs(...), a branch after a cache)
    ("runtime.combined_paged",),  # a combined pattern's paged batch, one launch per branch
    ("runtime.combined", "runtime.bucketed"),  # combined (one Attention per branch) and bucketed patterns, in torch
    # the entry points' pattern argument; a module's warm calls; what a call may ask for beside its output
    ("runtime.pattern_arg", "runtime.warm_calls", "runtime.call_requests"),
    ("runtime.simulation",),  # the simulator's entry points
    ("runtime.api",),
    ("runtime.gpu_launches",),  # the offline compile check: a call's launches recorded,
    ("runtime.gpu_compile",),  # each compiled for a target,
    ("runtime.gpu_check", "runtime.gpu_report"),  # a pattern's call driven through both, and its text
    ("runtime.gpu_paged_check",),  # the offline compile check of a paged call
]

#: Rooms of the compiler, bottom first: what a pattern is, how fast it runs, its kernels as source.
COMPILER_ROOMS = [("compiler.analysis",), ("compiler.cost",), ("compiler.codegen",)]

#: Rooms that must not import each other (each one folder, one job).
INDEPENDENT = ["runtime.backends.cpu", "runtime.backends.flex", "runtime.backends.triton",
               "runtime.backends.reference", "runtime.recurrences"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_files() -> dict[str, Path]:
    files = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or any(p.startswith(".") or p.endswith(".egg-info") for p in rel.parts):
            continue
        files[module_name(path)] = path
    return files


def import_graph() -> nx.DiGraph:
    files = package_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join([*base, *([node.module] if node.module else [])])
                elif node.module and (node.module == "attnc" or node.module.startswith("attnc.")):
                    target = node.module[len("attnc."):] if node.module != "attnc" else ""
                else:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    targets.append(sub if sub in files else target)
            elif isinstance(node, ast.Import):
                targets = [a.name[len("attnc."):] for a in node.names if a.name.startswith("attnc.")]
            for t in targets:
                if t != mod and t in files:
                    graph.add_edge(mod, t)
    return graph


def rank(mod: str, table) -> int | None:
    best = None
    for i, names in enumerate(table):
        for name in names:
            if mod == name or (name and mod.startswith(name + ".")) or (name == "" and mod == ""):
                if best is None or len(name) > best[1]:
                    best = (i, len(name))
    return None if best is None else best[0]


GRAPH = import_graph()


def test_the_graph_is_read():
    # a check that finds nothing proves nothing: the package's known imports are seen
    assert GRAPH.number_of_nodes() > 60
    assert GRAPH.has_edge("runtime.api", "runtime.checks")
    assert GRAPH.has_edge("spec.checker", "core.ir")


def test_no_cycles():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])


@pytest.mark.parametrize("table,what", [(LAYERS, "layer"), (RUNTIME_ROOMS, "runtime room"),
                                        (COMPILER_ROOMS, "compiler room")])
def test_imports_flow_down(table, what):
    upward = []
    for a, b in GRAPH.edges:
        ra, rb = rank(a, table), rank(b, table)
        if ra is not None and rb is not None and rb > ra:
            upward.append(f"{a} -> {b}")
    assert not upward, f"upward imports across {what}s: " + ", ".join(sorted(upward))


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if rank(m, LAYERS) is None] == []
    runtime = [m for m in GRAPH if m.startswith("runtime.")]
    assert [m for m in runtime if rank(m, RUNTIME_ROOMS) is None] == []
    compiler = [m for m in GRAPH if m.startswith("compiler.")]
    assert [m for m in compiler if rank(m, COMPILER_ROOMS) is None] == []


def test_rooms_are_independent():
    crossing = []
    for a, b in GRAPH.edges:
        ra = next((r for r in INDEPENDENT if a == r or a.startswith(r + ".")), None)
        rb = next((r for r in INDEPENDENT if b == r or b.startswith(r + ".")), None)
        if ra and rb and ra != rb:
            crossing.append(f"{a} -> {b}")
    assert not crossing, "rooms that must stay independent import each other: " + ", ".join(crossing)


def test_the_contract_fails_on_a_cycle_and_an_upward_import():
    # the checks above on a graph with one planted fault each
    g = GRAPH.copy()
    g.add_edge("core.ir", "compiler.analysis.tiles")
    assert any(rank(a, LAYERS) < rank(b, LAYERS) for a, b in [("core.ir", "compiler.analysis.tiles")])
    g.add_edge("compiler.analysis.tiles", "core.ir")
    assert list(nx.simple_cycles(g))


#: The recurrence families (one folder each) and the library they share (``runtime.recurrences.library``).
RECURRENCES = "runtime.recurrences"
FAMILIES = sorted(p.name for p in (ROOT / "runtime" / "recurrences").iterdir()
                  if p.is_dir() and (p / "__init__.py").exists() and p.name != "library")


def family(mod: str) -> str | None:
    """The recurrence family folder of ``mod`` (``"library"`` for the shared library), or None."""
    parts = mod.split(".")
    if mod.startswith(RECURRENCES + ".") and len(parts) > 3:
        return parts[2]
    return None


def test_recurrence_families_share_only_the_library():
    """Each family (``decay``, ``delta``, ``titans``) imports no other family, the library imports no family, and
    no recurrence module imports a private name (``_x``) of a module outside its own folder."""
    assert set(FAMILIES) >= {"decay", "delta", "titans"}
    crossing = [f"{a} -> {b}" for a, b in GRAPH.edges
                if family(a) and family(b) and family(a) != family(b) and family(b) != "library"]
    assert not crossing, "recurrence families import each other: " + ", ".join(crossing)
    private = []
    for mod, path in package_files().items():
        if not family(mod):
            continue
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
                if family(target + ".x") != family(mod):
                    private += [f"{mod}: {alias.name} from {target}" for alias in node.names
                                if alias.name.startswith("_")]
    assert not private, "private names imported across recurrence folders: " + ", ".join(private)

"""The layer order of the code, read from the source (every import, also those inside
functions; `if TYPE_CHECKING:` blocks are not imports at run time):

    tempflow_core  <  tasks.tracking (the MLflow adapter)  <  tasks  <  flows

and inside tempflow_core, by concept (CORE_LAYERS):

    base modules (config, families, seeding, batches, ...) < data plane (storage, shards)
    < shapes, rewards, prompts < algorithm.schedule, algorithm.sde < algorithm.sharding < policies
    < algorithm, pretrain, memory < run < engines < reports

A module imports only from its own layer or lower ones; tempflow_core imports neither Prefect
nor MLflow, the MLflow adapter no Prefect; Ray is imported only by the Ray engine
(tempflow_core/engines/ray_engine.py) and the Ray head of the flows (flows/ray_head.py); and no group
of project modules imports itself around a cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tempflow_core", "tasks", "flows")
RAY_MODULES = {"tempflow_core.engines.ray_engine", "flows.ray_head"}
CORE_LAYERS = [  # tempflow_core's packages and top-level modules, lowest first; one layer may hold several
    {"tempflow_core", "config", "families", "seeding", "redaction", "failpoints", "executables", "canonical",
     "batches", "presets"},
    {"storage", "shards"},
    {"shapes", "rewards", "prompts"},
    {"algorithm.schedule", "algorithm.sde"},  # the paper's grid and steps, which a policy's schedule builds on
    {"algorithm.sharding"},  # how a sharded transformer's tensors are gathered and cut: a policy's state dicts
    {"policies"},
    {"algorithm", "pretrain", "memory"},
    {"run"},
    {"engines"},
    {"reports"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _runtime_imports(tree: ast.AST):
    """Import nodes outside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names an import refers to (`from X import y`: X.y, which the caller reads as the
    module X.y when there is one, else as X)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{a.name}" if base else a.name for a in node.names]


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> top-level packages it imports)."""
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    outside: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _runtime_imports(tree):
            for target in _targets(name, path.name == "__init__.py", node):
                owner = target
                while owner and owner not in modules and "." in owner:
                    owner = owner.rsplit(".", 1)[0]
                if owner in modules:
                    if owner != name:
                        edges[name].add(owner)
                elif target:
                    outside[name].add(target.split(".")[0])
    return edges, outside


def _layer(module: str) -> int:
    if module.startswith("tempflow_core"):
        return 0
    if module == "tasks.tracking" or module.startswith("tasks.tracking."):
        return 1
    return 2 if module.startswith("tasks") else 3


def _core_layer(module: str) -> int:
    """The CORE_LAYERS index of a tempflow_core module (by its own name, else its top-level package)."""
    parts = module.split(".")[1:] or ["tempflow_core"]
    for name in (".".join(parts[:2]), parts[0]):
        for i, names in enumerate(CORE_LAYERS):
            if name in names:
                return i
    raise AssertionError(f"{module} has no place in CORE_LAYERS")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_module_imports_a_higher_layer():
    edges, _ = _graph()
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if _layer(b) > _layer(a))
    assert upward == []


def test_inside_the_core_no_concept_imports_a_higher_one():
    edges, _ = _graph()
    core = [m for m in _modules() if m.startswith("tempflow_core")]
    assert all(_core_layer(m) >= 0 for m in core)  # every module of the core has its place
    upward = sorted(f"{a} -> {b}" for a in core for b in edges[a]
                    if b.startswith("tempflow_core") and _core_layer(b) > _core_layer(a))
    assert upward == []


def test_orchestration_and_ray_are_imported_only_where_they_belong():
    _, outside = _graph()
    assert sorted(m for m, pk in outside.items() if "prefect" in pk and _layer(m) <= 1) == []
    assert sorted(m for m, pk in outside.items() if "mlflow" in pk and _layer(m) == 0) == []
    assert sorted(m for m, pk in outside.items() if "ray" in pk) == sorted(RAY_MODULES)


def test_no_import_cycles_also_inside_functions():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_the_checks_see_cycles_and_upward_imports():
    """The graph reader finds what it is for (a guard that sees nothing passes vacuously)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    edges, outside = _graph()
    assert "tempflow_core.algorithm.iteration" in edges["tempflow_core.algorithm.train"]
    assert "tasks.tracking" in edges["tasks.tracking_task"] and "tasks.stages" in edges["flows.train"]
    assert "ray" in outside["tempflow_core.engines.ray_engine"] and "mlflow" in outside["tasks.tracking.runs"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flows\ndef f():\n    import tasks\n")
    assert [_targets("x", False, n) for n in _runtime_imports(tree)] == [["typing.TYPE_CHECKING"], ["tasks"]]

"""The package's layers, enforced: imports only point down, no import cycles, a torch-free core and device client.

    cli, bench  ->  simulation  ->  reporting  ->  roles  ->  models, transport  ->  maths, data  ->  core

Every import counts, also one inside a function: a lazy import still decides what a module
needs to run (and a lazy torch import in the device's path would fail on a device).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {"core": 0, "maths": 1, "data": 1, "models": 2, "transport": 2, "roles": 3, "reporting": 4,
          "simulation": 5, "bench": 6, "cli": 6}
HEAVY = ("torch", "lightning", "transformers", "sentence_transformers", "torchmetrics")
# what the torch-free device client may use of fedhlm
DEVICE_MAY_IMPORT = ("fedhlm.core", "fedhlm.transport", "fedhlm.roles")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(module: str) -> list[str]:
    """Every name `module` imports, resolved to the deepest known module (or the external top-level name)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names += [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    resolved = []
    for name in names:
        known = name
        while known and known not in MODULES:
            known = known.rpartition(".")[0]
        resolved.append(known or name.split(".")[0])
    return [n for n in resolved if n != module]


GRAPH = {m: set(_imports(m)) for m in MODULES}


def _layer(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if parts[0] != "fedhlm" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return parts[1], LAYERS[parts[1]]


def test_every_module_lives_in_a_layer() -> None:
    stray = sorted(m for m in MODULES if m.startswith("fedhlm.") and _layer(m) is None and m != "fedhlm.__main__")
    assert stray == [], f"modules outside the layers {sorted(LAYERS)}: {stray}"


def test_imports_only_point_down() -> None:
    wrong = []
    for module, deps in GRAPH.items():
        own = _layer(module)
        if own is None:
            continue
        for dep in deps:
            other = _layer(dep)
            if other is not None and other[0] != own[0] and other[1] >= own[1]:
                wrong.append(f"{module} ({own[0]}) imports {dep} ({other[0]})")
    assert wrong == [], "\n".join(wrong)


def test_no_import_cycle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in MODULES:
        if v not in index:
            visit(v)
    assert cycles == []


def _reach(starts: list[str]) -> set[str]:
    seen, todo = set(starts), list(starts)
    while todo:
        for dep in GRAPH.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


@pytest.mark.parametrize("root", ["fedhlm_device", "fedhlm.core"])
def test_core_and_device_reach_no_torch(root: str) -> None:
    starts = [m for m in MODULES if m == root or m.startswith(root + ".")]
    reached = _reach(starts)
    heavy = sorted(m for m in reached if m.split(".")[0] in HEAVY or any(d.split(".")[0] in HEAVY for d in GRAPH.get(m, ())))
    assert heavy == [], f"{root} reaches torch-side modules: {heavy}"


def test_core_imports_only_core_and_the_device_only_what_a_device_has() -> None:
    core = [f"{m} -> {d}" for m in MODULES if m.startswith("fedhlm.core") for d in GRAPH[m]
            if d.startswith("fedhlm") and not d.startswith("fedhlm.core")]
    assert core == []
    device = [f"{m} -> {d}" for m in MODULES if m.startswith("fedhlm_device") for d in GRAPH[m]
              if d.startswith("fedhlm.") and not d.startswith(DEVICE_MAY_IMPORT)]
    assert device == []


def test_importing_the_device_client_and_the_core_loads_no_torch() -> None:
    """The same as above, at run time: what Python actually loads."""
    core = [m for m in MODULES if m.startswith("fedhlm.core")]
    code = ("import sys, fedhlm_device, fedhlm_device.runtime, fedhlm_device.cli, " + ", ".join(core) + "\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in %r)\n"
            "print(heavy); sys.exit(1 if heavy else 0)" % (HEAVY,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

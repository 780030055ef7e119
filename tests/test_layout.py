"""The package's layers, read from its imports (ARCHITECTURE.md): imports only go down, no circles,
the process-group layer imports no capability, no module over 800 lines.

Every import counts, also those inside functions (a lazy import is still a dependency; it only moves
the cost to the first call).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "moecomm"

# part -> the parts it may import (besides itself). A part is a subpackage or a top-level module.
BASE = {"errors", "_env"}
HELPERS = BASE | {"jit"}
CAPABILITIES = ("routing", "permute", "gemm", "sampling", "attention")
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_env": set(),
    "jit": BASE,
    "distributed": HELPERS,
    "testing": HELPERS | {"distributed"},
    **{c: set(HELPERS) for c in CAPABILITIES},
    "allreduce": HELPERS | {"distributed"},
    "ep": HELPERS | {"distributed", "permute"},
    "layer": HELPERS | {"distributed", "routing", "permute", "gemm", "ep", "allreduce"},
    "apps": HELPERS | {"distributed", "testing", "layer", "ep", "gemm", "routing", "permute"},
    "cli": HELPERS | {"apps"},
    "__init__": set(),
}
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["moecomm", *parts])] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    names = [f"{base}.{a.name}" for a in node.names]
    return [base, *names]


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The moecomm modules ``module`` imports (anywhere in its body)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        cands: list[str] = []
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            cands = _resolve(module, path, node)
        if isinstance(node, ast.ImportFrom) and any(c in known for c in cands[1:]):
            cands = cands[1:]  # "from .. import _env" imports moecomm._env, not moecomm itself
        for c in cands:
            if c in known and c != module:
                found.add(c)
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = _modules()
GRAPH = {m: _imports(m, p, set(MODULES)) for m, p in MODULES.items()}


def test_the_parts_are_known():
    unknown = sorted({_part(m) for m in MODULES} - set(ALLOWED))
    assert not unknown, f"parts without a place in the layer table (add them to ALLOWED and ARCHITECTURE.md): {unknown}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module):
    me = _part(module)
    bad = sorted(d for d in GRAPH[module] if _part(d) != me and _part(d) not in ALLOWED.get(me, set()))
    assert not bad, f"{module} ({me}) imports {bad}; {me} may import only {sorted(ALLOWED.get(me, set()))}"


def test_no_import_circles():
    # Tarjan's strongly connected components over module imports; a package's __init__ re-exporting
    # its own submodules is not a circle of concern, so edges from a package to its own children are
    # skipped.
    def children_edge(a: str, b: str) -> bool:
        return b.startswith(a + ".")

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if children_edge(v, w):
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(GRAPH):
        if m not in index:
            strong(m)
    assert not cycles, f"import circles: {cycles}"


def test_the_process_group_layer_knows_no_capability():
    caps = set(ALLOWED) - HELPERS - {"distributed", "__init__"}
    bad = {m: sorted(d for d in deps if _part(d) in caps)
           for m, deps in GRAPH.items() if _part(m) == "distributed"}
    assert not any(bad.values()), bad


def test_no_module_over_800_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (at most {MAX_LINES} lines): {long}"


def test_no_folder_named_as_tools_skip_them():
    skipped = {"dist", "build", "env"}
    bad = [str(p) for p in PKG.rglob("*") if p.is_dir() and p.name in skipped]
    assert not bad, bad

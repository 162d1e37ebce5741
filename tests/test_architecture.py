"""The shape of the library: no arrow from ``zsdense`` to the CLI, no import cycle.

Every module of the installed ``zsdense`` package (the library; ``zsdense.cli`` is the face) is
parsed with ``ast``; imports inside functions count as much as top-level ones, because a
function-local import is still a dependency that can form a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import zsdense

PKG_DIR = Path(zsdense.__file__).resolve().parent


def _library_modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for path in sorted(PKG_DIR.rglob("*.py")):
        rel = path.relative_to(PKG_DIR).with_suffix("")
        parts = ["zsdense", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1 and parts[1] in ("cli", "prompts"):
            continue  # the face and package data, not the library
        mods[".".join(parts)] = path
    return mods


def _resolve(module: str, name: str | None, mods: dict[str, Path]) -> str | None:
    """The library module an import refers to (``from a.b import c``: a.b.c if a module)."""
    if name and f"{module}.{name}" in mods:
        return f"{module}.{name}"
    return module if module in mods else None


def import_graph() -> dict[str, set[str]]:
    """module -> library modules it imports (any nesting level, relative imports resolved)."""
    mods = _library_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        typing_only = {  # `if TYPE_CHECKING:` imports are annotations, not dependencies
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    targets.append(f"{base}\0{a.name}")
            for t in targets:
                module, _, name = t.partition("\0")
                if module.startswith("zsdense.cli"):
                    graph[mod].add(module)
                    continue
                if not module.startswith("zsdense"):
                    continue
                got = _resolve(module, name or None, mods)
                if got and got != mod:
                    graph[mod].add(got)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_function_local_imports(tmp_path):
    """The parser must see an import inside a function (else the other tests prove nothing)."""
    g = import_graph()
    assert "zsdense.api" in g and len(g) > 20
    # api.py imports the task heads inside its methods
    assert any(m.startswith("zsdense.tasks") for m in g["zsdense.api"])


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_library_never_imports_the_cli():
    g = import_graph()
    bad = {m: sorted(t for t in ts if t.startswith("zsdense.cli")) for m, ts in g.items()}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"library modules importing the CLI: {bad}"


def test_no_import_cycles():
    g = import_graph()
    # a package __init__ re-exporting its modules is not a cycle with them
    g = {m: {t for t in ts if not (m.startswith(t + ".") and t in g)} for m, ts in g.items()}
    cycles = _cycles(g)
    assert not cycles, "import cycles in zsdense/: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("helper", ["dummy"])
def test_test_helpers_are_not_installed(helper):
    assert not (PKG_DIR / "engine" / f"{helper}.py").exists()


def test_readme_method_table_is_the_registry():
    """The README's method tables are what ``zsdense info --methods`` prints (the registries);
    after adding a method, paste that output into README "Registries"."""
    from zsdense.cli.main import method_tables
    from zsdense.dense.methods import methods_table
    from zsdense.tasks.referring import refer_methods_table

    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not next to the tests")
    text = readme.read_text(encoding="utf-8")
    assert methods_table() in method_tables() and refer_methods_table() in method_tables()
    assert method_tables() in text, "README tables differ from `zsdense info --methods`"


# ---- the layers README "Architecture" documents -----------------------------------------------
# A module may import its own layer or any layer below it, never one above; the faces (layer 5)
# import each other only along the arrows listed in FACE_ARROWS.
LAYERS: dict[str, int] = {
    "zsdense": 5,  # the package root hands out the Segmenter (lazily)
    "zsdense.api": 5,
    "zsdense.engine": 5,
    "zsdense.eval": 5,
    "zsdense.train": 5,
    "zsdense.tasks": 4,
    "zsdense.options": 4,
    "zsdense.methods": 4,  # the built-in method declarations (loaded by zsdense.plugins)
    "zsdense.dense": 3,
    "zsdense.text": 3,
    "zsdense.runtime": 2,
    "zsdense.context": 2,
    "zsdense.models": 1,
    "zsdense.io": 1,
    "zsdense.config": 0,
    "zsdense.plugins": 0,  # the registries and the entry-point loader
    "zsdense.errors": 0,
    "zsdense.version": 0,
    "zsdense.safe_pickle": 0,
    "zsdense.metrics": 0,
}
FACE_ARROWS = {
    ("zsdense", "zsdense.api"),
    ("zsdense.api", "zsdense.engine"),  # Segmenter.run through the task specs
    ("zsdense.eval", "zsdense.engine"),  # predictions through the batch engine
    ("zsdense.train", "zsdense.eval"),  # training reads the evaluation datasets
}
# sibling arrows inside a layer that would still be wrong
NEVER_SIBLINGS = {("zsdense.dense", "zsdense.text"), ("zsdense.models", "zsdense.io")}


def unit_of(module: str) -> str:
    """The folder-level unit of a module: ``zsdense.tasks.anomaly`` -> ``zsdense.tasks``."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(graph.items()):
        a = unit_of(mod)
        for t in sorted(targets):
            b = unit_of(t)
            if a == b or b.startswith("zsdense.cli"):
                continue
            la, lb = LAYERS.get(a), LAYERS.get(b)
            if la is None or lb is None:
                bad.append(f"{mod} -> {t}: {a if la is None else b} has no layer in LAYERS")
            elif lb > la:
                bad.append(f"{mod} -> {t}: layer {la} imports layer {lb} (upward)")
            elif la == lb == 5 and (a, b) not in FACE_ARROWS:
                bad.append(f"{mod} -> {t}: face {a} imports face {b}")
            elif (a, b) in NEVER_SIBLINGS:
                bad.append(f"{mod} -> {t}: forbidden")
    return bad


def test_layers_point_down():
    bad = layer_violations(import_graph())
    assert not bad, "imports against the documented layers:\n" + "\n".join(bad)


def test_no_folder_level_cycles():
    g = import_graph()
    folders: dict[str, set[str]] = {}
    for mod, targets in g.items():
        for t in targets:
            a, b = unit_of(mod), unit_of(t)
            if a != b and a != "zsdense":
                folders.setdefault(a, set()).add(b)
    assert not _cycles(folders), _cycles(folders)


def test_layer_check_catches_an_upward_arrow():
    """The checker itself: a task importing the Segmenter and the engine importing the API."""
    fake = {"zsdense.tasks.x": {"zsdense.api"}, "zsdense.engine.y": {"zsdense.api"}}
    bad = layer_violations(fake)
    assert len(bad) == 2
    assert any("zsdense.tasks.x" in b and "upward" in b for b in bad)
    assert any("face zsdense.engine imports face zsdense.api" in b for b in bad)

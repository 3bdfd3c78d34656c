"""The architecture, read from the code's own imports (standard-library `ast`, function-level imports
included): the core (mmprune/) never imports a model tree, its subpackages import only the layers below
them (docs/architecture.md), and no package has an import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmprune", "llava", "videollama2", "bench")

# subpackage of mmprune -> what it may import (itself included); the root package holds only __version__
MAY_IMPORT = {
    "base": {"base"},
    "place": {"base", "place"},
    "prune": {"base", "place", "prune"},
    "tokens": {"base", "prune", "tokens"},
    "skip": {"base", "prune", "skip"},
    "evaluate": {"base", "place", "prune", "evaluate"},
    "run": {"base", "place", "prune", "evaluate", "run"},
    "embedded": {"base", "embedded"},
}


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages under `root`."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported_names(module: str, path: Path, node) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module
    # `from pkg import sub` imports the submodule pkg.sub when there is one
    return [f"{stem}.{alias.name}" for alias in node.names] + [stem]


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file), each resolved to the longest
    existing module name."""
    modules = module_files(root, packages)
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported_names(name, path, node):
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_the_core_imports_no_model_tree(graph):
    offending = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("mmprune")
                       for t in targets if t.split(".")[0] in ("llava", "videollama2", "bench"))
    assert not offending, offending


def test_core_subpackages_import_only_the_layers_below(graph):
    layer = lambda name: name.split(".")[1] if name.count(".") else ""  # noqa: E731  "" = the root package
    assert {layer(m) for m in graph if m.startswith("mmprune.")} == set(MAY_IMPORT), "a subpackage has no rule"
    offending = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("mmprune.")
                       for t in targets if t.startswith("mmprune") and layer(t)
                       and layer(t) not in MAY_IMPORT[layer(m)])
    assert not offending, offending


def test_no_import_circles(graph):
    assert import_circles(graph) == []


def test_a_deliberate_circle_is_found(tmp_path):
    """The same reader on a package whose modules import each other (one of them inside a function)."""
    package = tmp_path / "mmprune"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from mmprune.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (package / "sub" / "c.py").write_text("import mmprune.a\n")
    (package / "d.py").write_text("from mmprune import a\n")
    graph = import_graph(tmp_path, packages=("mmprune",))
    # `from pkg import mod` runs pkg/__init__.py too: both are edges
    assert graph["mmprune.sub.b"] == {"mmprune.sub", "mmprune.sub.c"} and graph["mmprune.d"] == {"mmprune", "mmprune.a"}
    assert import_circles(graph) == [["mmprune.a", "mmprune.sub.b", "mmprune.sub.c"]]
    (package / "sub" / "c.py").write_text("import json\n")
    assert import_circles(import_graph(tmp_path, packages=("mmprune",))) == []


def test_each_subpackage_says_what_it_may_import():
    for name in MAY_IMPORT:
        doc = ast.get_docstring(ast.parse((ROOT / "mmprune" / name / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), name


def test_docs_and_code_cite_nothing_outside_the_repository():
    """A user has the repository only: no text points at a specification folder beside it."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts += [p for package in PACKAGES + ("tests", "scripts", "scripts_videollama2", "datasets")
              for p in sorted((ROOT / package).rglob("*")) if p.suffix in (".py", ".sh", ".md")]
    needle = "shared/" + "docs"  # split so this file does not match itself
    offending = [str(p.relative_to(ROOT)) for p in texts if needle in p.read_text(encoding="utf-8", errors="replace")
                 or "../" + "shared" in p.read_text(encoding="utf-8", errors="replace")]
    assert not offending, offending

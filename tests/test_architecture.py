"""The shape of the code: no module imports another that imports it back, directly or through others.

The layers themselves (nothing lower imports anything higher) are import-linter contracts in pyproject.toml,
checked by `make test` (lint-imports); a circle inside one layer is what those contracts cannot see.
"""

from __future__ import annotations

import importlib

import grimp


def import_circles(package: str) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), imports inside functions included."""
    graph = grimp.build_graph(package, include_external_packages=False)
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in edges[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return circles


def test_no_module_imports_one_that_imports_it_back():
    assert import_circles("dpolab") == []


def test_the_circle_finder_finds_a_circle(tmp_path, monkeypatch):
    package = tmp_path / "circular"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circular import b\n")
    (package / "b.py").write_text("def f():\n    from circular import a\n")
    (package / "c.py").write_text("from circular import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_circles("circular") == [["circular.a", "circular.b"]]


def test_no_module_of_the_training_package_hides_its_run_function():
    """``dpolab.train.run`` is the Python API; a submodule of that name would replace it once imported."""
    import pkgutil

    import dpolab.train

    for module in pkgutil.iter_modules(dpolab.train.__path__):
        importlib.import_module(f"dpolab.train.{module.name}")
    assert callable(dpolab.train.run) and dpolab.train.run.__module__ == "dpolab.train"

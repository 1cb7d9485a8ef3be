"""The package's layout (docs/development.md, "Architecture"): no import cycle, imports inside
functions included (grimp reads those too), and the layers of pyproject.toml's import-linter
contract. `make test` runs `lint-imports` as well; these say which import broke it."""
import os
import sys

import pytest

from conftest import REPO

grimp = pytest.importorskip("grimp", reason="requirements.txt installs it (import-linter's graph)")


def _graph():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return grimp.build_graph("octconv_exp")


def _cycles(graph):
    """Every strongly connected set of more than one module (Tarjan), with its imports."""
    modules = sorted(graph.modules)
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for m in modules:
        if m not in index:
            visit(m)
    return [[f"{a} -> {b}" for a in c for b in sorted(graph.find_modules_directly_imported_by(a))
             if b in c] for c in found]


def test_the_package_has_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b  # inside a function: still an edge\n")
    (pkg / "b.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles(grimp.build_graph("cyclic")) == [["cyclic.a -> cyclic.b", "cyclic.b -> cyclic.a"]]


def test_the_subpackages_have_a_docstring_saying_what_they_may_import():
    folder = os.path.join(REPO, "octconv_exp")
    for name in sorted(os.listdir(folder)):
        init = os.path.join(folder, name, "__init__.py")
        if name == "plugins" or not os.path.isfile(init):
            continue
        with open(init, encoding="utf-8") as f:
            text = f.read()
        assert text.startswith('"""') and "import" in text.split('"""')[1], init

"""The package's structure, as the brief and docs/spec.md state it.

- no import cycle inside fastres (an import inside a function counts: it is a dependency all
  the same, and a cycle through one only waits for the first call to bite);
- no module reaches another through importlib or __import__ (an import the graph cannot see
  hides a dependency, and a cycle with it: this test reads those calls too);
- the reference is an independent oracle: only the parity harness (the dispatcher's
  correctness probe among its users) and the benchmarks import it;
- backends never import each other (the shared C++ interface fastres._ext is not a backend);
- what exists is apart from which runs: only fastres.backends and fastres.dispatch (and the
  bench and tests, which time backends by name) reach a backend module, and the backends
  never import the dispatcher; the dispatcher reaches what exists only through the
  registry of fastres.backends (backends and whole-module programs as objects, by name);
- the library never imports the bench package (only the command line's bench verb does);
- one timer: only fastres/timing.py reads the clock to time candidates.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fastres"
BACKEND_MODULES = {"fastres.backends.eager", "fastres.backends.composite",
                   "fastres.backends.cpp", "fastres.backends.cuda", "fastres.backends.triton",
                   "fastres.backends.onednn"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _dynamic_imports(path: pathlib.Path):
    """(line, text) of every importlib / __import__ use in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] == "importlib" for n in names):
                found.append((node.lineno, "imports importlib"))
        elif isinstance(node, ast.Name) and node.id == "__import__":
            found.append((node.lineno, "calls __import__"))
        elif isinstance(node, ast.Attribute) and node.attr in ("import_module", "__import__"):
            found.append((node.lineno, f"calls {node.attr}"))
    return found


def _imports(name: str, path: pathlib.Path, known):
    """The fastres modules `name` imports (relative imports resolved, `from P import sub`
    counted as importing P.sub when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fastres"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fastres"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & set(known)
            found.update(subs or {target})
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph():
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_no_import_cycle_inside_fastres(graph):
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_is_reached_through_importlib():
    found = {f"{_module_name(path)}:{line}: {what}" for name, path in _modules().items()
             for line, what in _dynamic_imports(path)}
    assert not found, f"dynamic imports: {sorted(found)}"


def test_the_reference_is_imported_only_by_its_users(graph):
    importers = {m for m, deps in graph.items() if "fastres.reference" in deps}
    allowed = {m for m in importers if m == "fastres.parity" or m.startswith("fastres.bench")}
    assert importers == allowed, f"the reference is imported by {sorted(importers - allowed)}"


def test_the_library_never_imports_the_bench_package(graph):
    for name, deps in graph.items():
        if name.startswith("fastres.bench") or name == "fastres.cli":
            continue
        bench = {d for d in deps if d == "fastres.bench" or d.startswith("fastres.bench.")}
        assert not bench, f"{name} imports {sorted(bench)}"


def test_backends_never_import_the_dispatcher(graph):
    for name, deps in graph.items():
        if name.startswith("fastres.backends"):
            chooser = {d for d in deps if d.startswith("fastres.dispatch")}
            assert not chooser, f"{name} (what exists) imports {sorted(chooser)} (which runs)"


def test_the_dispatcher_reaches_what_exists_through_the_registry(graph):
    for name, deps in graph.items():
        if name.startswith("fastres.dispatch"):
            inner = {d for d in deps if d.startswith("fastres.backends.")}
            assert not inner, f"{name} imports {sorted(inner)}: use fastres.backends' registry"


def test_one_timer():
    clocks = {_module_name(p) for p in ROOT.rglob("*.py")
              if "perf_counter" in p.read_text() or "statistics.median" in p.read_text()}
    # runner.py reads the wall clock of whole suites, for the report; it times no candidate.
    assert clocks <= {"fastres.timing", "fastres.bench.runner"}, sorted(clocks)


def test_backends_never_import_each_other(graph):
    for name, deps in graph.items():
        mine = next((b for b in BACKEND_MODULES if name == b or name.startswith(b + ".")), None)
        others = {d for d in deps for b in BACKEND_MODULES - {mine}
                  if d == b or d.startswith(b + ".")}
        assert not (mine and others), f"{name} imports another backend: {sorted(others)}"


def test_only_the_dispatch_point_reaches_a_backend_module(graph):
    # (the bench times backends by name, as a user forcing one would)
    for name, deps in graph.items():
        if name.startswith(("fastres.backends", "fastres.dispatch", "fastres.bench")):
            continue
        reached = {d for d in deps for b in BACKEND_MODULES if d == b or d.startswith(b + ".")}
        assert not reached, f"{name} imports backend modules {sorted(reached)} directly"

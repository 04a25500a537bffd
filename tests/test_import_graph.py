"""The dependency rules of design.md, checked on the source: no import cycle, no forbidden edge.

Every module of `backbones/` and `cameo_bench/` is parsed with `ast` (nothing is imported), and
every import statement counts, wherever it sits: module level, inside a function (a lazy import) or
under `if TYPE_CHECKING:` (a dependency all the same). `importlib.import_module("literal")` counts
too; a module that calls `import_module` on a computed name is assumed to import every project module
named by one of its string constants (over-approximating, e.g. `__main__`'s subcommand table).

How packages are treated: importing `a.b.c` makes Python run `a/__init__` and `a/b/__init__` first;
those implicit parent imports are not edges (otherwise every submodule would "import" the package
that collects it). An explicit import of a package (`from cameo_bench.data import collate`) is an
edge to its `__init__`. A package `__init__` importing its own submodules (re-exports, registration)
is not an edge for the cycle check either: a package collecting its parts is its job. What that
leaves out is a submodule importing its own package's `__init__` while that `__init__` imports it
back, the pattern the backbone registry was moved out of; a separate test
(`test_no_module_imports_a_package_that_imports_it_back`) checks it.

Forbidden edges are direct imports. `data/` and `correspondence/` reach the shared registry helper
through `cameo_bench/registry.py`, which imports `backbones.registry` (stdlib-only) and nothing else;
the run-time check below makes sure that importing `cameo_bench.data` still loads no backbone model.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("backbones", "cameo_bench")


@dataclass(frozen=True)
class Import:
    src: str  # importing module
    target: str  # dotted name as written (resolved if relative)
    line: int
    lazy: bool  # inside a function

    def where(self, modules: dict[str, Path], root: Path) -> str:
        kind = " (lazy)" if self.lazy else ""
        return f"{modules[self.src].relative_to(root)}:{self.line}{kind} imports {self.target}"


def find_modules(root: Path, packages: tuple[str, ...] = ROOTS) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given top-level packages."""
    modules = {}
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve_relative(src: str, module: str | None, level: int, modules: dict[str, Path]) -> str:
    package = src if _is_package(src, modules) else src.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def parse_imports(src: str, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(modules[src].read_text(), filename=str(modules[src]))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    found, computed_dynamic = [], False
    for node in ast.walk(tree):
        lazy = id(node) in in_function
        if isinstance(node, ast.Import):
            found += [Import(src, alias.name, node.lineno, lazy) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(src, node.module, node.level, modules) if node.level else node.module
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                found.append(Import(src, sub if sub in modules else base, node.lineno, lazy))
        elif isinstance(node, ast.Call) and _call_name(node.func) in ("importlib.import_module", "import_module",
                                                                       "__import__"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append(Import(src, arg.value, node.lineno, lazy))
            else:
                computed_dynamic = True
    if computed_dynamic:  # conservative: any string constant that names a project module
        package = src if _is_package(src, modules) else src.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in (node.value, f"{package}.{node.value}"):
                    if name in modules and name != src:
                        found.append(Import(src, name, node.lineno, id(node) in in_function))
    return list(dict.fromkeys(found))  # `from x import a, b` names x once per line


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def project_target(imp: Import, modules: dict[str, Path]) -> str | None:
    """The project module an import loads explicitly (None for third-party and stdlib)."""
    if imp.target.split(".")[0] not in {name.split(".")[0] for name in modules}:
        return None
    return imp.target


def graph(modules: dict[str, Path]) -> dict[str, dict[str, list[Import]]]:
    """src -> dst -> the import statements, over project modules, package-own-submodule edges dropped."""
    edges: dict[str, dict[str, list[Import]]] = {name: {} for name in modules}
    for src in modules:
        for imp in parse_imports(src, modules):
            dst = project_target(imp, modules)
            if dst is None or dst not in modules or dst == src:
                continue
            if _is_package(src, modules) and dst.startswith(src + "."):
                continue  # a package __init__ collecting its own submodules
            edges[src].setdefault(dst, []).append(imp)
    return edges


def cycles(edges: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """One concrete cycle (a list of modules, first = last) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
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
                components.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            strongconnect(v)

    found = []
    for component in components:  # shortest way from the first module back to itself, inside the component
        members, start = set(component), component[0]
        paths = {start: [start]}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(edges[v]):
                if w == start:
                    queue = []
                    found.append(paths[v] + [start])
                    break
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return found


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# (what the rule says, does the edge src -> imported name break it?)
FORBIDDEN = [
    ("backbones/ never imports cameo_bench, gin or mlflow",
     lambda src, dst: _in(src, "backbones") and dst.split(".")[0] in ("cameo_bench", "gin", "mlflow")),
    ("cameo_bench/geometry.py imports nothing of the project",
     lambda src, dst: src == "cameo_bench.geometry" and dst.split(".")[0] in ROOTS),
    ("cameo_bench/objectives/ never imports cameo_bench/tracking/",
     lambda src, dst: _in(src, "cameo_bench.objectives") and _in(dst, "cameo_bench.tracking")),
    ("cameo_bench/data/ never imports backbones/",
     lambda src, dst: _in(src, "cameo_bench.data") and _in(dst, "backbones")),
    ("only cameo_bench/config/gin_root.py imports gin",
     lambda src, dst: _in(dst, "gin") and src != "cameo_bench.config.gin_root"),
    ("only cameo_bench/tracking/ imports mlflow",
     lambda src, dst: _in(dst, "mlflow") and not _in(src, "cameo_bench.tracking")),
]


def forbidden_edges(modules: dict[str, Path], root: Path = REPO) -> list[str]:
    violations = []
    for src in modules:
        for imp in parse_imports(src, modules):
            for rule, breaks in FORBIDDEN:
                if breaks(src, imp.target):
                    violations.append(f"{rule}: {imp.where(modules, root)}")
    return violations


def format_cycle(cycle: list[str], edges, modules) -> str:
    steps = [edges[a][b][0].where(modules, REPO) for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n      " + "\n      ".join(steps)


MODULES = find_modules(REPO)


# ---- the walker itself, on a package written here ---------------------------------------------------------
def test_the_walker_sees_lazy_relative_and_package_imports(tmp_path):
    files = {
        "pkg/__init__.py": "from pkg import a\nfrom pkg.b import thing\n",  # own submodules: not edges
        "pkg/a.py": "import os\nfrom . import b\n",
        "pkg/b.py": "thing = 1\ndef later():\n    from pkg.sub import c\n",  # lazy
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import x\nimport importlib\nimportlib.import_module('pkg.d')\n",
        "pkg/d.py": "from pkg import b\n",  # names a submodule: an edge to pkg.b
        "pkg/e.py": "import pkg\n",  # an explicit import of a package: an edge to its __init__
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = find_modules(tmp_path, ("pkg",))
    edges = graph(modules)
    assert {src: sorted(dst) for src, dst in edges.items()} == {
        "pkg": [], "pkg.a": ["pkg.b"], "pkg.b": ["pkg.sub.c"], "pkg.sub": [],
        "pkg.sub.c": ["pkg.a", "pkg.d"], "pkg.d": ["pkg.b"], "pkg.e": ["pkg"],
    }
    assert edges["pkg.b"]["pkg.sub.c"][0].lazy and not edges["pkg.a"]["pkg.b"][0].lazy
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_each_forbidden_edge_is_caught(tmp_path):
    files = {
        "backbones/__init__.py": "",
        "backbones/m.py": "def f():\n    from cameo_bench.geometry import reproject\n",
        "cameo_bench/__init__.py": "",
        "cameo_bench/geometry.py": "import numpy\nfrom cameo_bench import data\n",
        "cameo_bench/data/__init__.py": "import backbones.m\n",
        "cameo_bench/objectives/__init__.py": "",
        "cameo_bench/objectives/a.py": "from cameo_bench.tracking import keys\n",
        "cameo_bench/tracking/__init__.py": "",
        "cameo_bench/tracking/keys.py": "import mlflow\n",  # allowed
        "cameo_bench/config/__init__.py": "",
        "cameo_bench/config/gin_root.py": "import gin\n",  # allowed
        "cameo_bench/c.py": "import gin.config\nimport mlflow.tracking\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    violations = forbidden_edges(find_modules(tmp_path), tmp_path)
    assert sorted(violations) == sorted([
        f"{FORBIDDEN[0][0]}: backbones/m.py:2 (lazy) imports cameo_bench.geometry",
        f"{FORBIDDEN[1][0]}: cameo_bench/geometry.py:2 imports cameo_bench.data",
        f"{FORBIDDEN[2][0]}: cameo_bench/objectives/a.py:1 imports cameo_bench.tracking.keys",
        f"{FORBIDDEN[3][0]}: cameo_bench/data/__init__.py:1 imports backbones.m",
        f"{FORBIDDEN[4][0]}: cameo_bench/c.py:1 imports gin.config",
        f"{FORBIDDEN[5][0]}: cameo_bench/c.py:2 imports mlflow.tracking",
    ])


# ---- the project ----------------------------------------------------------------------------------------
def test_every_project_import_names_an_existing_module():
    broken = [
        imp.where(MODULES, REPO)
        for src in MODULES for imp in parse_imports(src, MODULES)
        if project_target(imp, MODULES) and imp.target not in MODULES
    ]
    assert not broken, "imports of project modules that do not exist:\n  " + "\n  ".join(broken)


def test_no_import_cycle():
    edges = graph(MODULES)
    found = cycles(edges)
    assert not found, f"{len(found)} import cycle(s):\n  " + "\n  ".join(format_cycle(c, edges, MODULES) for c in found)


def test_no_forbidden_edge():
    violations = forbidden_edges(MODULES)
    assert not violations, f"{len(violations)} forbidden import(s):\n  " + "\n  ".join(violations)


# Known at the time this test was written, to be fixed by moving `ConvertedScene`, the registry and the
# shared parsers out of converters/__init__.py (as backbones/registry.py was). Listed so that a new case
# fails now; an entry that no longer occurs fails too, so the list can only shrink.
PENDING_BACK_IMPORTS: set[str] = set()


def test_no_module_imports_a_package_that_imports_it_back():
    """A submodule importing its own package's __init__, which imports the submodule eagerly, works
    only because of the line order inside that __init__ (the old backbones/__init__ registry)."""
    found = {}
    for src in MODULES:
        for imp in parse_imports(src, MODULES):
            package = imp.target
            if package in MODULES and _is_package(package, MODULES) and src.startswith(package + "."):
                back = [i for i in parse_imports(package, MODULES) if not i.lazy and i.target == src]
                if back:
                    found[src] = f"{imp.where(MODULES, REPO)}, and {back[0].where(MODULES, REPO)}"
    new = [found[src] for src in sorted(set(found) - PENDING_BACK_IMPORTS)]
    assert not new, "submodules importing the package that imports them back:\n  " + "\n  ".join(new)
    assert not PENDING_BACK_IMPORTS - set(found), "fixed: remove from PENDING_BACK_IMPORTS"


def test_the_design_rules_hold_for_the_registry_bridge():
    """cameo_bench/registry.py is how data/ and correspondence/ reach the shared helper: it may import
    backbones.registry and nothing else of backbones (checked at run time below)."""
    targets = {imp.target for imp in parse_imports("cameo_bench.registry", MODULES)} - {"__future__"}
    assert targets == {"backbones.registry"}


def _probe(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True)


def test_importing_cameo_bench_data_loads_no_backbone_model():
    data_modules = sorted(name for name in MODULES if _in(name, "cameo_bench.data"))
    out = _probe(f"""
        import importlib, sys
        for name in {data_modules!r}:
            importlib.import_module(name)
        loaded = [m for m in sys.modules if (m.startswith("backbones.") and m != "backbones.registry")
                  or m.split(".")[0] in ("diffusers", "timm")]
        print(",".join(sorted(loaded)))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"importing cameo_bench.data loads {out.stdout.strip()}"


def test_leaf_modules_import_nothing_of_the_project():
    edges = graph(MODULES)
    assert {leaf: sorted(edges[leaf]) for leaf in ("cameo_bench.geometry", "backbones.selectors")} == {
        "cameo_bench.geometry": [], "backbones.selectors": []}


@pytest.mark.parametrize("module", ["cameo_bench.geometry", "backbones.registry"])
def test_leaf_modules_import_alone(module):
    """At run time too: importing the module loads no other project module than its packages."""
    out = _probe(f"import {module}, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                 f"('cameo_bench', 'backbones') and m != {module!r} and not {module!r}.startswith(m + '.')))")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"

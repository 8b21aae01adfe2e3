"""serve's import graph: no circles among its modules, no serve import hidden inside a function
except those listed here with their reason, and every module importable on its own."""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "serve"

# The serve imports that stay inside a function, (importer, imported) -> why. Each is checked for
# circles like any other import; one not listed here fails test_no_serve_import_inside_a_function.
LATE_IMPORTS = {
    ("serve.gunicorn_conf", "serve.metrics"): (
        "prometheus_client picks its multiprocess mode when first imported, so it must load after this "
        "file sets PROMETHEUS_MULTIPROC_DIR (test_gunicorn_conf_leaves_prometheus_unimported)"
    ),
}
# Modules that run a program when imported: their imports are checked, importing them is not.
ENTRY_POINTS = {"serve.__main__": "python -m serve: importing it runs the command line"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    late: bool  # inside a function: runs when called, not when the module is imported

    def __str__(self) -> str:
        where = f"{module_path(self.source).relative_to(ROOT)}:{self.line}"
        return f"{self.source} -> {self.target} ({where}{', inside a function' if self.late else ''})"


def serve_modules() -> dict[str, Path]:
    """Every module of the serve package by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def module_path(name: str) -> Path:
    return serve_modules()[name]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """The serve modules `name` imports, at any depth of its code: `import a.b`, `from a import b`
    (b a module, or a name in a), relative imports resolved against its package. A submodule's
    import of its own package (which Python runs first anyway) is not an edge."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []

    def visit(node: ast.AST, late: bool) -> None:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            targets = []
        for target in dict.fromkeys(targets):
            while target not in modules and "." in target:  # import serve.x.name: the module serve.x
                target = target.rpartition(".")[0]
            if target in modules and target != name and not name.startswith(f"{target}."):
                edges.append(Edge(name, target, node.lineno, late))
        inside = late or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return edges


def import_graph() -> list[Edge]:
    modules = serve_modules()
    return [edge for name, path in modules.items() for edge in imports_of(name, path, modules)]


def cycles(edges: list[Edge]) -> list[tuple[list[str], list[Edge]]]:
    """Each group of modules that import each other (Tarjan's strongly connected components), and
    one circle through it as its edges in order."""
    out: dict[str, list[Edge]] = {}
    for edge in edges:
        out.setdefault(edge.source, []).append(edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for edge in out.get(node, []):
            if edge.target not in index:
                connect(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted({e.source for e in edges} | {e.target for e in edges}):
        if node not in index:
            connect(node)
    return [(sorted(group), _circle(sorted(group)[0], group, out)) for group in groups]


def _circle(start: str, group: set[str], out: dict[str, list[Edge]]) -> list[Edge]:
    """The shortest circle from start back to it inside group (breadth first)."""
    paths: dict[str, list[Edge]] = {start: []}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for edge in out.get(node, []):
            if edge.target == start:
                return paths[node] + [edge]
            if edge.target in group and edge.target not in paths:
                paths[edge.target] = paths[node] + [edge]
                queue.append(edge.target)
    raise AssertionError(f"no circle through {start}")


def test_the_graph_sees_every_kind_of_import(tmp_path):
    package = tmp_path / "serve"
    (package / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "a.py": "import serve.b\n",
        "b.py": "from serve.sub import c\n",
        "sub/__init__.py": "from serve.sub.c import thing\n",  # the package's own import of its submodule
        "sub/c.py": "from . import d\n",
        "sub/d.py": "def late():\n    from ..a import name\n",
    }
    for file, text in sources.items():
        (package / file).write_text(text)
    modules = {n: package.parent.joinpath(*n.split(".")).with_suffix(".py") for n in ("serve.a", "serve.b", "serve.sub.c", "serve.sub.d")}
    modules |= {"serve": package / "__init__.py", "serve.sub": package / "sub" / "__init__.py"}
    edges = [e for name, path in modules.items() for e in imports_of(name, path, modules)]
    found = {(e.source, e.target, e.late) for e in edges}
    assert found == {("serve.a", "serve.b", False), ("serve.b", "serve.sub.c", False),
                     ("serve.sub", "serve.sub.c", False), ("serve.sub.c", "serve.sub.d", False),
                     ("serve.sub.d", "serve.a", True)}
    [(group, circle)] = cycles(edges)
    assert group == ["serve.a", "serve.b", "serve.sub.c", "serve.sub.d"]
    assert [e.source for e in circle] == ["serve.a", "serve.b", "serve.sub.c", "serve.sub.d"]
    assert circle[-1].target == "serve.a"


def test_no_import_circles_among_serve_modules():
    found = cycles(import_graph())
    assert not found, "import circles among serve's modules (function-level imports count):\n" + "\n".join(
        " -> ".join([c[0].source] + [e.target for e in c]) + "\n    " + "\n    ".join(str(e) for e in c)
        + ("" if len(group) == len(c) else f"\n    (the modules importing each other: {', '.join(group)})")
        for group, c in found
    )


def test_no_serve_import_inside_a_function():
    late = [e for e in import_graph() if e.late and (e.source, e.target) not in LATE_IMPORTS]
    assert not late, ("serve modules imported inside a function (import them at the top; if that is "
                      "impossible, list them in LATE_IMPORTS with the reason):\n" + "\n".join(map(str, late)))


IMPORT_EACH = """
import sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "serve" or m.startswith("serve.")]:
        del sys.modules[loaded]
    try:
        __import__(name)
    except BaseException as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_serve_module_imports_on_its_own():
    """Each module first in a clean serve namespace (one interpreter, serve.* dropped from
    sys.modules between modules): none relies on another having been imported before it."""
    names = [n for n in serve_modules() if n not in ENTRY_POINTS]
    run = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"modules that fail to import on their own:\n{run.stdout}{run.stderr[-3000:]}"


def test_gunicorn_conf_leaves_prometheus_unimported():
    """gunicorn_conf sets PROMETHEUS_MULTIPROC_DIR; nothing it imports may load prometheus_client first."""
    code = "import sys, serve.gunicorn_conf; print('prometheus_client' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "False"

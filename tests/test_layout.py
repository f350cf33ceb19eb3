"""The layout holds (issue 26): stages import shared mechanisms from pipeline/core, never each other in
a circle; stage output folders come from one table (pipeline/core/paths.py); a `pipeline` import
inside a function says why it is not at the top.

Checked on the source (AST), without importing anything.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from tests.conftest import REPO

PKG = REPO / "pipeline"
PATHS_TABLE = PKG / "core" / "paths.py"
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def modules() -> dict[str, Path]:
    """pipeline.a.b -> its file, for every module and package of pipeline/."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def function_level(tree: ast.Module) -> set[int]:
    """id() of every node inside a function body (a lazy import runs when the function does)."""
    inner = set()
    for fn in ast.walk(tree):
        if isinstance(fn, FUNCTIONS):
            inner |= {id(n) for n in ast.walk(fn) if n is not fn}
    return inner


def explicit_imports(path: Path, name: str, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """(module, line) of each `pipeline` module that `path` names in an import statement, at module
    level or inside a function. `import a.b.c` is an edge to a.b.c; `from a.b import c` to a.b.c when
    that is a module, else to a.b (the names come from its __init__). The packages above an imported
    module are not edges of their own: Python runs a parent's __init__ before any child module, and
    that is no circle. An explicit `from <own package> import name` is one: the package's __init__
    must have defined `name` before this module can run."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "pipeline"]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] != "pipeline":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in mods else mod, node.lineno))
    return [(m, line) for m, line in out if m in mods and m != name]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}."""
    mods = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        for m, line in explicit_imports(path, name, mods):
            edges.setdefault(m, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) through each strongly connected component of more than one module."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:   # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
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
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:   # the shortest way from the component's first module back to it
        start, end = min(comp), None
        prev, todo = {start: None}, [start]
        while todo and end is None:
            v = todo.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    end = v
                    break
                if w in comp and w not in prev:
                    prev[w] = v
                    todo.append(w)
        path = [end]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        out.append([*reversed(path), start])
    return sorted(out)


def describe(cycle: list[str], graph: dict[str, dict[str, int]], mods: dict[str, Path]) -> str:
    return " -> ".join(f"{a} ({rel(mods[a])}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_pipeline_imports_without_a_circle():
    graph, mods = import_graph(), modules()
    found = [describe(c, graph, mods) for c in cycles(graph)]
    assert not found, "import cycles in pipeline/ (move the shared name to the module both can import):\n" + \
        "\n".join(found)


def test_the_graph_sees_lazy_imports_and_skips_parent_packages():
    """The checker is not vacuous: a function-level import is an edge; a child's parent package is not."""
    graph = import_graph()
    assert "pipeline.core.order" in graph["pipeline.cli"]            # cmd_batch imports it per command
    assert "pipeline.quantize" not in graph["pipeline.quantize.gptq"]  # only its sibling rtn
    demo = {"a": {"b": 3}, "b": {"c": 4}, "c": {"a": 5}, "d": {"a": 1}}
    assert cycles(demo) == [["a", "b", "c", "a"]]


def path_literals(path: Path) -> list[int]:
    """Lines of `Path("artifacts...")` calls in `path`."""
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and \
                (node.args[0].value == "artifacts" or node.args[0].value.startswith("artifacts/")):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "Path") or (isinstance(f, ast.Attribute) and f.attr == "Path"):
                out.append(node.lineno)
    return out


def test_stage_folders_come_from_the_paths_table():
    found = [f"{rel(p)}:{line}" for p in sorted(PKG.rglob("*.py")) if p != PATHS_TABLE
             for line in sorted(path_literals(p))]
    assert not found, ("Path(\"artifacts...\") outside pipeline/core/paths.py (use OUT[stage], ARTIFACTS, TIMINGS "
                       "or a helper there):\n" + "\n".join(found))
    assert path_literals(PATHS_TABLE)   # the checker finds the table's own


def comment_lines(text: str) -> tuple[set[int], set[int]]:
    """(lines holding a comment, lines that are only a comment)."""
    any_, only = set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            any_.add(tok.start[0])
            if not tok.line[: tok.start[1]].strip():
                only.add(tok.start[0])
    return any_, only


def unexplained_lazy_imports(path: Path) -> list[int]:
    """Lines of function-level `pipeline` imports with no comment on the line (or its continuation)
    nor a comment line right above."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    inner = function_level(tree)
    any_, only = comment_lines(text)
    out = []
    for node in ast.walk(tree):
        if id(node) not in inner:
            continue
        if isinstance(node, ast.Import):
            ours = any(a.name.split(".")[0] == "pipeline" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] == "pipeline"
        else:
            continue
        if ours and not (any_ & set(range(node.lineno, node.end_lineno + 1)) or node.lineno - 1 in only):
            out.append(node.lineno)
    return out


def test_a_function_level_pipeline_import_says_why():
    found = [f"{rel(p)}:{line}" for p in sorted(PKG.rglob("*.py"))
             for line in sorted(unexplained_lazy_imports(p))]
    assert not found, ("function-level `pipeline` imports without a comment saying why they are not at the top "
                       "(move them up, or comment the reason on the line or the line above):\n" + "\n".join(found))

"""Offline text and code that ship with the Python installation itself.

`python-docs`: the pydoc topic pages (pydoc_data.topics) and, per standard-library module, its
docstrings (module, classes, functions) read with `ast` — nothing is imported, so no module's
side effects run. `python-code`: the standard-library source files, test packages excluded.
Both are in sorted path order; the content depends on the Python version, which ingest records.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in EXCLUDED_PARTS or part.startswith("test_") for part in rel.parts):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def python_code() -> list[str]:
    return [t for t in (_read(p) for p in stdlib_files()) if t and t.strip()]


def _docstrings(tree: ast.Module, module: str) -> list[str]:
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and not node.name.startswith("_"):
                parts.append(f"{module}.{node.name}\n\n{d}")
    return parts


def python_docs() -> list[str]:
    import pydoc_data.topics

    docs = [f"{name}\n\n{text.strip()}" for name, text in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in stdlib_files():
        src = _read(p)
        if src is None:
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        module = ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        parts = _docstrings(tree, module)
        if parts:
            docs.append("\n\n".join(parts))
    return docs

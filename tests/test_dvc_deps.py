"""dvc.yaml's deps are the code each stage runs: every `pipeline` module a stage imports, directly
or not, at module level or inside a function, is covered by one of the stage's deps (a file or a
folder above it), so a changed default or helper reruns the stages that use it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

PKG = REPO / "pipeline"


def module_file(name: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py (None: not a module of ours)."""
    parts = name.split(".")
    base = REPO.joinpath(*parts)
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imports_of(path: Path, name: str, top_only: bool = False) -> set[str]:
    """Every `pipeline...` module `path` imports anywhere in it (lazy imports included), or with
    `top_only` the ones it imports at module level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in (tree.body if top_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] != "pipeline":
                continue
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names if module_file(f"{mod}.{a.name}")}
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for m in list(out):
        parts = m.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return {m for m in out if module_file(m)}


def closure(module: str) -> set[Path]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += imports_of(module_file(m), m) - seen
    return {module_file(m).relative_to(REPO) for m in seen}


STAGE_MODULES = {"ingest": "pipeline.ingest", "tokenizer": "pipeline.tokenizer", "tokenize": "pipeline.tokenize",
                 "blend": "pipeline.blend", "pretrain": "pipeline.pretrain", "posttrain": "pipeline.posttrain",
                 "quantize": "pipeline.quantize", "evaluate": "pipeline.evaluate", "release": "pipeline.release"}
# what every `omp <stage>` process runs besides the stage's own module: the command line (its
# module-level imports, not the other stages it imports per command) and, for pretrain, the
# workers' entry point
CLI_OWN = tuple(sorted(imports_of(PKG / "cli.py", "pipeline.cli", top_only=True)))


def stage_code(stage: str) -> set[Path]:
    files = closure(STAGE_MODULES[stage]) | {Path("pipeline/cli.py")}
    for m in CLI_OWN:
        files |= closure(m)
    if stage == "pretrain":
        files |= closure("pipeline.pretrain.worker")
    return files


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def test_every_stage_lists_the_pipeline_modules_it_imports():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for stage in STAGE_MODULES:
        deps = dvc[stage]["deps"]
        for f in sorted(stage_code(stage)):
            if not covered(f, deps):
                missing.setdefault(stage, []).append(str(f))
    assert not missing, ("dvc.yaml: these stages run code their deps do not list (add the file, or a folder "
                         f"above it, under stages.<name>.deps): {missing}")


def test_every_stage_depends_on_the_environment_lock():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    lacking = [s for s, st in dvc.items() if "requirements.lock" not in st["deps"]]
    assert not lacking, f"dvc.yaml: stages {lacking} do not list requirements.lock (the locked environment)"


def test_the_closure_sees_lazy_imports(tmp_path):
    """The collector is not vacuous: a module imported only inside a function is found, and a module
    loaded by a real import of the stage is in the collected set."""
    import subprocess

    found = closure("pipeline.pretrain")
    assert Path("pipeline/core/numerics.py") in found and Path("pipeline/core/ladder.py") in found
    code = ("import sys, pipeline.posttrain as m; print('\\n'.join(sorted(k for k in sys.modules "
            "if k.startswith('pipeline'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    names = set(loaded.stdout.split())
    static = {str(p.with_suffix("")).replace("/", ".").removesuffix(".__init__") for p in closure("pipeline.posttrain")}
    assert names <= static, f"imported at load but not seen by the collector: {names - static}"

#!/usr/bin/env python3
"""Rewrite each stage's `pipeline/` deps in dvc.yaml from the code it imports (run from the repo root).

    python tools/dvc_deps.py          # rewrite dvc.yaml in place
    python tools/dvc_deps.py --check  # exit 1 and name what differs, change nothing

The import closure is tests/test_dvc_deps.py's collector (every `pipeline` module a stage's process can
import, lazily or not); a folder whose every module is in the closure is listed as the folder. Deps
that are not code (the locks, data_manifests, evals, artifacts) stay as they are, after the locks.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_dvc_deps import STAGE_MODULES, stage_code  # noqa: E402


def code_deps(stage: str) -> list[str]:
    files = {p.as_posix() for p in stage_code(stage)}
    out = set(files)
    for d in sorted({str(Path(f).parent) for f in files}, key=len):
        if d == "pipeline":
            continue
        members = {p.relative_to(ROOT).as_posix() for p in (ROOT / d).rglob("*.py")}
        if members and members <= files:
            out = {f for f in out if not f.startswith(d + "/")} | {d}
    # a folder inside a listed folder is covered by it
    return sorted(f for f in out if not any(f.startswith(o + "/") for o in out if o != f))


def rewrite(text: str) -> str:
    lines, out, stage, in_deps = text.splitlines(), [], None, False
    for line in lines:
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        if line.strip() == "deps:":
            in_deps = True
            out.append(line)
            if stage in STAGE_MODULES:
                indent = line[: len(line) - len(line.lstrip())]
                out += [f"{indent}- {d}" for d in ("requirements.lock", "requirements-torch.lock")]
                out += [f"{indent}- {d}" for d in code_deps(stage)]
            continue
        if in_deps and line.lstrip().startswith("- "):
            dep = line.strip()[2:]
            if stage in STAGE_MODULES and (dep.startswith("pipeline/") or dep.startswith("requirements")):
                continue
            out.append(line)
            continue
        in_deps = False
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    path = ROOT / "dvc.yaml"
    old = path.read_text(encoding="utf-8")
    new = rewrite(old)
    if "--check" in argv:
        if new != old:
            print("dvc.yaml: stage deps differ from the code the stages import; run python tools/dvc_deps.py")
            return 1
        return 0
    if new != old:
        path.write_text(new, encoding="utf-8")
        print("dvc.yaml: stage deps rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

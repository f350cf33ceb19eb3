"""`omp recreate <release dir | lineage.json> [--until pretrain|posttrain|quantize]`.

Rebuilds the chain from the lineage alone in a fresh working directory (the resolved recipe and
the data manifests + lock files are written there from lineage.json), refusing anything whose
hash does not match (recipe, manifests, the published indices, the recreated indices and token
files), then compares every tensor of the result with the published weights: how many are
bitwise equal, the max abs difference, and a verdict on the last line. Exit 0 only on a match
(bitwise by default; `--tolerance` for comparisons across platforms).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.config import recipe_sha256, Recipe
from pipeline.errors import DataIntegrityError, PipelineError
from pipeline.io import canonical_json, read_json, sha256_bytes, sha256_file
from pipeline.lineage import git_commit

DATA_STAGES = ["ingest", "tokenizer", "tokenize", "blend"]
UNTIL = {"pretrain": ["pretrain"], "posttrain": ["pretrain", "posttrain"],
         "quantize": ["pretrain", "posttrain", "quantize"]}


def load_lineage(target: Path) -> tuple[dict, Path | None]:
    target = Path(target)
    path = target / "lineage.json" if target.is_dir() else target
    if not path.is_file():
        raise PipelineError(f"{path}: not found")
    return read_json(path), (path.parent if (path.parent / "data").is_dir() else None)


def verify_published(lineage: dict, release: Path | None) -> None:
    """The lineage is self-consistent and the published files are the ones it names."""
    recipe = Recipe.model_validate(lineage["recipe"])
    if recipe_sha256(recipe) != lineage["recipe_sha256"]:
        raise DataIntegrityError("lineage.json: the recipe does not hash to recipe_sha256; refusing to recreate")
    for m in lineage["manifests"]:
        if sha256_bytes(m["text"].encode("utf-8")) != m["sha256"]:
            raise DataIntegrityError(f"lineage.json: manifest {m['path']} does not match its sha256")
    if release is not None:
        for f, key in (("indices.npy", "indices_sha256"), ("blend.json", "blend_json_sha256")):
            p = release / "data" / f
            if p.is_file() and sha256_file(p) != lineage["data"][key]:
                raise DataIntegrityError(f"{p}: sha256 {sha256_file(p)[:16]}… does not match lineage.json "
                                         f"{key} {lineage['data'][key][:16]}…; the published data order was altered")


def place_decontamination_files(lineage: dict, release: Path | None, wd: Path) -> None:
    """The eval files training was decontaminated against, from the release (or this checkout),
    each checked against its sha256 in the lineage: a different file would cut other tokens."""
    files = lineage["data"].get("decontamination", {}).get("files", {})
    for rel_path, want in files.items():
        src = next((p for p in ((release / rel_path) if release else None, Path.cwd() / rel_path)
                    if p is not None and p.is_file()), None)
        if src is None:
            raise DataIntegrityError(f"lineage.json: decontamination file {rel_path} is neither in the release "
                                     "nor in this checkout")
        if sha256_file(src) != want:
            raise DataIntegrityError(f"{src}: sha256 {sha256_file(src)[:16]}… does not match lineage.json "
                                     f"{want[:16]}…; training was decontaminated against another version")
        (wd / rel_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, wd / rel_path)
    if not files and (Path.cwd() / "evals").is_dir() and not (wd / "evals").exists():
        os.symlink(Path.cwd() / "evals", wd / "evals")   # the evaluate stage reads the local tasks


def _run_stage(stage: str, workdir: Path) -> None:
    print(f"== recreate: omp {stage}", flush=True)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "--recipe", "recipe.yaml"],
                          cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        raise PipelineError(f"recreate: stage {stage} failed in {workdir} (exit {proc.returncode})")


def check_data(lineage: dict, workdir: Path) -> None:
    blend = read_json(workdir / "artifacts/blend/blend.json")
    p = workdir / "artifacts/blend/indices.npy"
    if sha256_file(p) != lineage["data"]["indices_sha256"]:
        raise DataIntegrityError(f"{p}: the recreated data order differs from the published one "
                                 f"(indices sha256 {sha256_file(p)[:16]}… vs {lineage['data']['indices_sha256'][:16]}…)")
    for name, digest in lineage["data"]["token_files"].items():
        if blend["token_files"].get(name) != digest:
            raise DataIntegrityError(f"{workdir / 'artifacts/tokenize' / name / 'train.npy'}: recreated tokens "
                                     f"differ from the published sha256 {digest[:16]}…")


def compare_safetensors(published: Path, recreated: Path, tolerance: float = 0.0) -> tuple[bool, list[str]]:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(published)), load_file(str(recreated))
    lines, equal, worst, ok = [], 0, 0.0, set(a) == set(b)
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            lines.append(f"  {name}: only in {'published' if name in a else 'recreated'}")
            continue
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            ok = False
            lines.append(f"  {name}: shape/dtype {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            continue
        # compare the raw bits (so -0.0 vs 0.0 or differing NaN payloads count as different)
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        same = bool(torch.equal(x.contiguous().view(bits), y.contiguous().view(bits)))
        diff = 0.0 if same else float((x.double() - y.double()).abs().max())
        worst = max(worst, diff)
        equal += same
        if not same:
            ok = ok and diff <= tolerance
        lines.append(f"  {name}: {'bitwise equal' if same else f'max abs diff {diff:.3e}'}")
    lines.append(f"{published.parent.name or published}: {equal}/{len(set(a) | set(b))} tensors bitwise equal, "
                 f"max abs diff {worst:.3e}")
    return ok, lines


def targets(lineage: dict, release: Path | None, workdir: Path, until: str) -> list[tuple[str, Path, Path]]:
    """(label, published safetensors, recreated safetensors) to compare for `until`."""
    if release is None:
        raise PipelineError("recreate needs the release directory (its weights) to compare tensors")
    top = lineage.get("released_variant", "posttrain")
    out = []
    if until == "quantize":
        for c in lineage["checkpoints"]:
            if c["stage"] == "quantize":
                pub = release / "quantized" / c["name"] / c["file"]
                rec = next((workdir / "artifacts/quantize").rglob(f"{c['name']}/{c['file']}"), None)
                if pub.is_file() and rec is not None:
                    out.append((f"quantized/{c['name']}", pub, rec))
        until = top
    if until == top:
        out.insert(0, (until, release / "model.safetensors", workdir / f"artifacts/{until}/final/model.safetensors"))
    elif until == "pretrain" and (release / "base/model.safetensors").is_file():
        out.insert(0, ("pretrain (base/)", release / "base/model.safetensors",
                       workdir / "artifacts/pretrain/final/model.safetensors"))
    if not out:
        raise PipelineError(f"the release has no published weights for --until {until}")
    return out


def run(target: Path, until: str | None = None, workdir: Path | None = None, tolerance: float = 0.0) -> int:
    lineage, release = load_lineage(target)
    verify_published(lineage, release)
    until = until or lineage.get("released_variant", "posttrain")
    code = git_commit()
    if lineage["code"].get("commit") and code.get("commit") != lineage["code"]["commit"]:
        print(f"warning: this code is at commit {code.get('commit')}, the release was made at "
              f"{lineage['code']['commit']}; check it out for a bitwise match")
    own_tmp = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="omp-recreate-"))
    wd.mkdir(parents=True, exist_ok=True)
    print(f"recreating {lineage['name']} until {until} in {wd}")
    for m in lineage["manifests"]:
        p = wd / m["path"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(m["text"], encoding="utf-8")
    (wd / "recipe.yaml").write_text(yaml.safe_dump(lineage["recipe"], sort_keys=False), encoding="utf-8")
    place_decontamination_files(lineage, release, wd)
    for stage in DATA_STAGES:
        _run_stage(stage, wd)
    check_data(lineage, wd)
    print("data order recreated: indices and token files match the lineage")
    for stage in UNTIL[until]:
        if stage == "posttrain" and not any(c["stage"] == "posttrain" for c in lineage["checkpoints"]):
            continue
        _run_stage(stage, wd)
    ok = True
    for label, pub, rec in targets(lineage, release, wd, until):
        good, lines = compare_safetensors(pub, rec, tolerance)
        print(f"{label}:")
        print("\n".join(lines))
        ok = ok and good
    verdict = ("MATCH: the recreated weights equal the published ones"
               + (" bitwise" if tolerance == 0 else f" (tolerance {tolerance:g})")) if ok else \
        "MISMATCH: the recreated weights differ from the published ones"
    if own_tmp and ok:
        import shutil
        shutil.rmtree(wd, ignore_errors=True)
    print(verdict)
    return 0 if ok else 1

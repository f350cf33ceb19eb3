"""`omp recreate <release dir | lineage.json> [--until pretrain|posttrain|quantize] [--step N]`.

`--step N` recreates one rung of the checkpoint ladder (`checkpoints/step-NNNNNNN/`): the data
stages, then pretraining only up to step N (`omp pretrain --stop-at N`: the schedule is the whole
run's, so the rung is the same), or for a post-training rung pretraining and post-training; its
cost grows with N, not with the whole run. Then that rung's files are compared as below.

First every file of the release is verified against `lineage.json` (`files`: relative path ->
sha256; a missing, extra or changed file is refused by name, before any work), and the lineage
against itself (the recipe, manifests, data order and checkpoint hashes it names agree with those
files; the checkpoint ladder's records hold): `omp verify`'s check (pipeline/commands/verify.py),
but for the seed's initialization, which the rebuilt chain recomputes anyway. Every path it names is confined to the work folder. Then the chain is rebuilt from the
lineage alone in a fresh working directory (the resolved recipe and the data manifests + lock
files are written there from lineage.json), refusing a recreated data order that differs, and
every release file the chain rebuilds up to `--until` (weights, config, tokenizer, generation
config, quantized variants, GGUF files, the data order, the recipe) is compared with the
published one: tensors one by one for safetensors, bytes for the rest. Exit 0 only on a match
(bitwise by default; `--tolerance` relaxes safetensors tensors only, for other platforms).
Not rebuilt: the model card (evaluation results and timings) and lineage.json itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline.commands.verify import verify_release
from pipeline.core import numerics
from pipeline.core.config import _format_errors, recipe_dict, recipe_sha256, Recipe, safe_load_unique
from pipeline.core.errors import DataIntegrityError, PipelineError, RecipeError
from pipeline.core.io import read_json, sha256_bytes, sha256_file
from pipeline.core.ladder import rung_name
from pipeline.core.lock import output_lock
from pipeline.core.paths import ARTIFACTS, OUT
from pipeline.core.provenance import environment, git_commit, installed_versions
from pipeline.core.integrity import PathError, check_name, check_relpath, verify_file
from pipeline.release import copy_model_dir

DATA_STAGES = ["ingest", "tokenizer", "tokenize", "blend"]
UNTIL = {"pretrain": ["pretrain"], "posttrain": ["pretrain", "posttrain"],
         "quantize": ["pretrain", "posttrain", "quantize"]}


def load_lineage(target: Path) -> tuple[dict, Path]:
    target = Path(target)
    path = target / "lineage.json" if target.is_dir() else target
    if not path.is_file():
        raise PipelineError(f"{path}: not found")
    lineage = read_json(path)
    if not isinstance(lineage, dict):
        raise DataIntegrityError(f"{path}: not a lineage (a JSON object)")
    return lineage, path.parent


def _get(lineage: dict, *keys, kind=None):
    """lineage[k1][k2]...; DataIntegrityError naming the key path when absent or of another type."""
    cur = lineage
    for i, k in enumerate(keys):
        if not isinstance(cur, dict) or k not in cur:
            raise DataIntegrityError(f"lineage.json: {'.'.join(map(str, keys[:i + 1]))}: missing")
        cur = cur[k]
    if kind is not None and not isinstance(cur, kind):
        raise DataIntegrityError(f"lineage.json: {'.'.join(map(str, keys))}: expected {kind.__name__}")
    return cur


def check_paths(lineage: dict, allow_outside: bool = False) -> None:
    """Every name and path the lineage uses to write or read files stays inside the work folder."""
    check_name(_get(lineage, "name", kind=str), "lineage.json: name")
    for i, m in enumerate(_get(lineage, "manifests", kind=list)):
        if not isinstance(m, dict):
            raise DataIntegrityError(f"lineage.json: manifests.{i}: expected an object")
        check_relpath(m.get("path"), f"lineage.json: manifests.{i}.path")
    recipe = _get(lineage, "recipe", kind=dict)
    check_relpath(_get(lineage, "recipe", "data", "manifest", kind=str), "lineage.json: recipe.data.manifest")
    for f in _get(lineage, "data", kind=dict).get("decontamination", {}).get("files", {}):
        check_relpath(f, "lineage.json: data.decontamination.files")
    for i, c in enumerate(_get(lineage, "checkpoints", kind=list)):
        check_name(c.get("name"), f"lineage.json: checkpoints.{i}.name")
        if "file" in c:
            check_name(c["file"], f"lineage.json: checkpoints.{i}.file")
    outside = list(recipe.get("allow_paths") or [])
    for m in lineage["manifests"]:
        if m["path"].endswith((".yaml", ".yml")):
            try:
                outside += list((safe_load_unique(m.get("text", "")) or {}).get("allow_paths") or [])
            except Exception as e:  # noqa: BLE001 - a manifest that does not parse is refused by name
                raise DataIntegrityError(f"lineage.json: manifest {m['path']}: not valid YAML ({e})") from None
    if outside and not allow_outside:
        raise PathError(f"lineage.json: allow_paths {outside} would let the recreated chain read files outside "
                        "its work folder; refusing (pass --allow-outside after checking them)")


def verify_published(lineage: dict, release: Path) -> None:
    """The lineage is self-consistent and the published files are the ones it names."""
    try:
        recipe = Recipe.model_validate(lineage["recipe"])
    except ValidationError as e:
        raise RecipeError("lineage.json", "recipe", _format_errors(e)) from None
    if recipe_sha256(recipe) != lineage.get("recipe_sha256"):
        raise DataIntegrityError("lineage.json: the recipe does not hash to recipe_sha256; refusing to recreate")
    for m in lineage["manifests"]:
        if not isinstance(m.get("text"), str) or sha256_bytes(m["text"].encode("utf-8")) != m.get("sha256"):
            raise DataIntegrityError(f"lineage.json: manifest {m['path']} does not match its sha256")


def place_decontamination_files(lineage: dict, release: Path | None, wd: Path) -> None:
    """The eval files training was decontaminated against, from the release (or this checkout),
    each checked against its sha256 in the lineage: a different file would cut other tokens."""
    files = lineage["data"].get("decontamination", {}).get("files", {})
    for rel_path, want in files.items():
        check_relpath(rel_path, "lineage.json: data.decontamination.files")
        src = release / rel_path
        if not src.is_file():
            raise DataIntegrityError(f"{src}: decontamination file named by lineage.json is not in the release")
        verify_file(src, want, "lineage.json data.decontamination")
        (wd / rel_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, wd / rel_path)
    if not files and (Path.cwd() / "evals").is_dir() and not (wd / "evals").exists():
        os.symlink(Path.cwd() / "evals", wd / "evals")   # the evaluate stage reads the local tasks


def _run_stage(stage: str, workdir: Path, *extra: str) -> None:
    print(f"== recreate: omp {stage} {' '.join(extra)}".rstrip(), flush=True)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "--recipe", "recipe.yaml", *extra],
                          cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        raise PipelineError(f"recreate: stage {stage} failed in {workdir} (exit {proc.returncode})")


def check_data(lineage: dict, workdir: Path) -> None:
    blend = read_json(workdir / OUT["blend"] / "blend.json")
    p = workdir / OUT["blend"] / "indices.npy"
    if sha256_file(p) != lineage["data"]["indices_sha256"]:
        raise DataIntegrityError(f"{p}: the recreated data order differs from the published one "
                                 f"(indices sha256 {sha256_file(p)[:16]}… vs {lineage['data']['indices_sha256'][:16]}…)")
    for name, digest in lineage["data"]["token_files"].items():
        if blend["token_files"].get(name) != digest:
            raise DataIntegrityError(f"{workdir / OUT['tokenize'] / name / 'train.npy'}: recreated tokens "
                                     f"differ from the published sha256 {digest[:16]}…")


def compare_safetensors(published: Path, recreated: Path, tolerance: float = 0.0) -> tuple[bool, list[str]]:
    # torch only after check_environment has put the lineage's numerics in force (pipeline/core/numerics.py)
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


def rung_dir(art: Path, stage: str, step: int) -> Path | None:
    """A rung the recreated chain wrote: in the stage output, or (a run stopped at it) in pretrain's
    working folder checkpoints/ladder/."""
    for d in (art / stage / "ladder" / rung_name(step), art / stage / "checkpoints" / "ladder" / rung_name(step)):
        if (d / "model.safetensors").is_file():
            return d
    return None


def expected_files(lineage: dict, workdir: Path, until: str, step: int | None = None) -> dict[str, Path]:
    """Release path -> the file the recreated chain produced for it, for every release file the
    stages up to `until` rebuild, assembled the way `omp release` assembles them."""
    art, out = workdir / ARTIFACTS, workdir / ".expected-release"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    top = lineage.get("released_variant", "posttrain")
    built = UNTIL[until]
    for r in (lineage.get("ladder") or {}).get("rungs") or []:   # the rungs of every stage rebuilt
        if r.get("stage") in built and (step is None or r["step"] == step):
            src = rung_dir(art, r["stage"], r["step"])
            if src is not None:
                copy_model_dir(src, out / check_relpath(r["path"], "lineage.json: ladder.rungs.path"))
    if step is not None:
        built = []   # only the rung (and the data order below) is rebuilt
    if top in built and (art / top / "final").is_dir():
        copy_model_dir(art / top / "final", out)
    if top == "posttrain" and "pretrain" in built and (art / "pretrain/final").is_dir():
        copy_model_dir(art / "pretrain/final", out / "base")
    if "quantize" in built and (art / "quantize/report.json").is_file():
        for v in read_json(art / "quantize/report.json").get("variants", []):
            src = art / "quantize" / check_relpath(v.get("path", v["name"]), "quantize report: variant path")
            if src.is_dir():
                copy_model_dir(src, out / "quantized" / check_name(v["name"], "quantize report: variant name"))
        for g in sorted((art / "quantize/gguf").glob("*.gguf")):
            (out / "gguf").mkdir(exist_ok=True)
            shutil.copyfile(g, out / "gguf" / g.name)
    (out / "data").mkdir()
    for f in ("indices.npy", "blend.json"):
        shutil.copyfile(art / "blend" / f, out / "data" / f)
    # as `omp release` writes it: the recipe's field order (lineage.json stores its keys sorted)
    recipe = recipe_dict(Recipe.model_validate(lineage["recipe"]))
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*")) if p.is_file()}


def compare_release(lineage: dict, release: Path, workdir: Path, until: str,
                    tolerance: float, step: int | None = None) -> tuple[bool, list[str]]:
    """Every published file the chain rebuilt, compared with the rebuilt one (tensors for safetensors,
    bytes otherwise); then the published files it did not rebuild, and why."""
    files = lineage["files"]
    rebuilt = expected_files(lineage, workdir, until, step)
    ok, lines, equal = True, [], 0
    for rel in sorted(files):
        if rel not in rebuilt:
            continue
        pub, rec = release / rel, rebuilt[rel]
        if rel.endswith(".safetensors"):
            good, tensor_lines = compare_safetensors(pub, rec, tolerance)
            lines.append(f"{rel}:")
            lines += tensor_lines
            same = sha256_file(rec) == files[rel]
            good = good and (same or tolerance > 0)  # bitwise: the file's bytes too (header, metadata)
        else:
            good = same = sha256_file(rec) == files[rel]
            lines.append(f"{rel}: {'bytes equal' if same else 'DIFFERS from the rebuilt file'}")
        equal += same
        ok = ok and good
    missing = sorted(set(rebuilt) - set(files))
    for rel in missing:  # the chain made a file the release does not have
        ok = False
        lines.append(f"{rel}: rebuilt, but not in the release")
    compared = [r for r in files if r in rebuilt]
    if not compared:
        raise PipelineError(f"the release has no file that --until {until} rebuilds")
    rest = sorted(r for r in files if r not in rebuilt)
    deco = set(lineage["data"].get("decontamination", {}).get("files", {}))
    lines.append(f"{equal}/{len(compared)} rebuilt files byte-identical to the published ones")
    for rel in rest:
        why = ("decontamination input, verified against lineage.json" if rel in deco else
               "model card: evaluation results and timings, not rebuilt" if rel == "README.md" else
               f"not rebuilt by --step {step} (verified against lineage.json)" if step is not None else
               f"not rebuilt by --until {until} (verified against lineage.json)")
        lines.append(f"  not rebuilt: {rel} ({why})")
    return ok, lines


def check_environment(lineage: dict) -> tuple[str, list[str]]:
    """Before any work: the numerics and the Python packages the lineage records against this
    machine's. Puts the recorded profile in force here (the stages this starts inherit it) and
    returns (expectation, report lines): "bitwise" when everything that decides the bits is equal,
    else "tolerance" with each difference named."""
    recipe = Recipe.model_validate(lineage["recipe"])
    recorded = lineage.get("numerics") or {}
    profile = recipe.platform.numerics
    numerics.enter_recipe(recipe, None, where="lineage.json: recipe.platform.numerics")
    here = numerics.in_force()
    lines, worst = [], "bitwise"
    rank = {"bitwise": 0, "bitwise-same-cpu": 1, "tolerance": 2}
    for stage in ("pretrain", "posttrain", "quantize"):
        if stage not in recorded:
            continue
        mine = {**here, "threads": numerics.threads_for(recipe, stage) or here["threads"]}
        expect, diffs = numerics.compare(recorded[stage], mine)
        worst = max(worst, expect, key=rank.get)
        lines.append(f"numerics of {stage}: {recorded[stage].get('profile') if recorded[stage] else None} -> "
                     + {"bitwise": "bitwise match expected",
                        "bitwise-same-cpu": "native profile: bitwise only on the same CPU model",
                        "tolerance": "differs here; expect a tolerance match only"}[expect])
        lines += [f"  {d}" for d in diffs]
    if not recorded:
        worst = "tolerance"
        lines.append("numerics: the lineage records none (made before numerics profiles): expect a tolerance match")
    if worst == "tolerance":
        lines.append("  what it means: another ATen kernel ISA, MKL branch, thread count or library version rounds "
                     "differently; " + ("portable pins all of them on Intel CPUs with AVX2, so look at the line above"
                                        if profile != "native" else
                                        "native pins nothing, so another CPU generation takes other code paths")
                     + "; the comparison below prints the largest difference (pass it as --tolerance)")
    env = lineage.get("environment") or {}
    mine = environment()
    if env.get("lock_sha256") and env.get("lock_sha256") != mine.get("lock_sha256"):
        lines.append(f"environment lock: recorded {str(env.get('lock_sha256'))[:16]}…, here "
                     f"{str(mine.get('lock_sha256'))[:16]}… ({mine['lock_file']})")
    recorded_pkgs = env.get("packages") or {}
    installed = installed_versions(recorded_pkgs)
    differ = [f"  {n}: lineage {v}, installed {installed.get(n)}" for n, v in sorted(recorded_pkgs.items())
              if installed.get(n) != v]
    if differ:
        worst = "tolerance"
        lines.append(f"{len(differ)} installed package(s) differ from the lineage's environment (make setup installs "
                     "requirements.lock):")
        lines += differ
    elif recorded_pkgs:
        lines.append(f"environment: all {len(recorded_pkgs)} locked packages at the lineage's versions")
    return worst, lines


def ladder_stage(lineage: dict, step: int) -> str:
    """The stage of rung `step` (`--step`); an error listing the ladder's steps when there is none."""
    rungs = (lineage.get("ladder") or {}).get("rungs") or []
    for r in rungs:
        if r.get("step") == step:
            if r.get("stage") not in UNTIL:
                raise DataIntegrityError(f"lineage.json: ladder rung {step}: unknown stage {r.get('stage')!r}")
            return r["stage"]
    raise PipelineError(f"--step {step}: not a rung of this release's ladder (steps: "
                        f"{', '.join(str(r.get('step')) for r in rungs) or 'none, the release has no ladder'})")


def run(target: Path, until: str | None = None, workdir: Path | None = None, tolerance: float = 0.0,
        allow_outside: bool = False, step: int | None = None) -> int:
    lineage, release = load_lineage(target)
    check_paths(lineage, allow_outside)
    problems = verify_release(release, lineage, check_init=False)   # the seed's initialization: rebuilt below
    if problems:
        raise DataIntegrityError(f"{release}: the release does not match its lineage.json "
                                 f"({len(problems)} mismatch(es)): " + "; ".join(problems))
    verify_published(lineage, release)
    print(f"verified: {len(lineage['files'])} release files match lineage.json")
    if step is not None:
        if until is not None:
            raise PipelineError("--step and --until: give one")
        until = ladder_stage(lineage, step)
    until = until or lineage.get("released_variant", "posttrain")
    expect, env_lines = check_environment(lineage)
    print("\n".join(env_lines))
    code = git_commit()
    if lineage["code"].get("commit") and code.get("commit") != lineage["code"]["commit"]:
        print(f"warning: this code is at commit {code.get('commit')}, the release was made at "
              f"{lineage['code']['commit']}; check it out for a bitwise match")
    own_tmp = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="omp-recreate-"))
    wd.mkdir(parents=True, exist_ok=True)
    with output_lock(wd, command="omp recreate"):
        ok = _recreate(lineage, release, wd, until, tolerance, step)
    if own_tmp and ok:
        shutil.rmtree(wd, ignore_errors=True)
    verdict = ("MATCH: every rebuilt file equals the published one"
               + (" bitwise" if tolerance == 0 else f" (tensors within tolerance {tolerance:g})")) if ok else \
        "MISMATCH: the recreated files differ from the published ones"
    if not ok and expect != "bitwise" and tolerance == 0:
        verdict += " (as the numerics and environment differences above predicted)"
    print(verdict)
    return 0 if ok else 1


def _recreate(lineage: dict, release: Path, wd: Path, until: str, tolerance: float, step: int | None = None) -> bool:
    print(f"recreating {lineage['name']} " + (f"rung step {step} ({until})" if step is not None else f"until {until}")
          + f" in {wd}")
    for m in lineage["manifests"]:
        p = wd / check_relpath(m["path"], "lineage.json: manifests.path")
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
        if stage == "pretrain" and step is not None and until == "pretrain":
            _run_stage(stage, wd, "--stop-at", str(step))   # only up to the rung: cost grows with N
        else:
            _run_stage(stage, wd)
    ok, lines = compare_release(lineage, release, wd, until, tolerance, step)
    ledger_ok, ledger_lines = compare_ledger(lineage, wd)
    print("\n".join(lines + ledger_lines))
    return ok and ledger_ok


def compare_ledger(lineage: dict, wd: Path) -> tuple[bool, list[str]]:
    """The pretrain byte ledger (bytes per worker by collective/tag/part) of the lineage against the
    rebuilt run's metrics.json: a recreation that sent other bytes is named entry by entry."""
    pre = next((c for c in lineage.get("checkpoints", []) if c.get("stage") == "pretrain"), None)
    metrics = wd / OUT["pretrain"] / "metrics.json"
    if pre is None or pre.get("byte_ledger") is None or not metrics.is_file():
        return True, ["byte ledger: not recorded in the lineage (or pretrain not rebuilt), not compared"]
    published, rebuilt = pre["byte_ledger"], read_json(metrics).get("byte_ledger") or {}
    diffs = [f"  {k}: published {published.get(k)}, rebuilt {rebuilt.get(k)}"
             for k in sorted(set(published) | set(rebuilt)) if published.get(k) != rebuilt.get(k)]
    if diffs:
        return False, ["byte ledger DIFFERS from the published one:", *diffs]
    total = sum(v["bytes"] for v in published.values())
    return True, [f"byte ledger: equal ({len(published)} entries, {total} bytes per worker)"]

"""`omp verify <release dir | hub repo id>`, and the release check `omp recreate` runs before any work.

`verify_release` is the one check of a release folder against its `lineage.json`: every file the
lineage lists (`files`: relative path -> sha256) is there unchanged and nothing else is; the hashes
the lineage quotes elsewhere (model_sha256, the data order, the decontamination files, the
checkpoints) agree with that list; and the checkpoint ladder's own records hold (pipeline/core/ladder.py:
each rung descends from the one before, the first from the seed's initialization, no two rungs hold
the same weights, no rung but a stage's last holds final weights). It returns every mismatch, named
by step and file; `omp verify` prints them (exit 1), `omp recreate` refuses the release with them
(exit 2) before it rebuilds anything.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.core.config import ModelCfg
from pipeline.core.errors import PipelineError
from pipeline.core.integrity import HUB_ID, PathError, check_relpath, tree_files
from pipeline.core.io import read_json, sha256_file
from pipeline.core.ladder import NAME, WEIGHTS, rung_name, weights_sha256


def _label(rel: str) -> str:
    """`checkpoints/step-NNNNNNN/f` -> `step-NNNNNNN: f` (a mismatch is named by step and file)."""
    parts = rel.split("/")
    if len(parts) >= 3 and parts[0] == "checkpoints" and NAME.match(parts[1]):
        return f"{parts[1]}: {'/'.join(parts[2:])}"
    return rel


def check_files(release: Path, files: dict) -> list[str]:
    """Every file lineage.json lists is there with its sha256, and nothing else is (all mismatches)."""
    problems = []
    for rel in sorted(files):
        try:
            check_relpath(rel, "lineage.json: files")
        except PathError as e:
            problems.append(str(e))
            continue
        p = release / rel
        if p.is_symlink() or not p.is_file():
            problems.append(f"{_label(rel)}: missing (listed in lineage.json)")
            continue
        got = sha256_file(p)
        if got != files[rel]:
            problems.append(f"{_label(rel)}: sha256 {got[:16]}… does not match lineage.json ({str(files[rel])[:16]}…)")
    for rel in tree_files(release, skip=("lineage.json",), hidden=True):
        if rel not in files:
            problems.append(f"{_label(rel)}: not listed in lineage.json")
    return problems


def init_sha256(recipe: dict, config: dict) -> str:
    """sha256 of the weights the recipe's seed initializes (pipeline.core.model.build_model), as saved."""
    # torch: loaded only when the initialization is rebuilt; `omp recreate` imports this module before it
    # pins the lineage's numerics, which must precede torch (pipeline/core/numerics.py)
    from pipeline.core.model import build_model

    model = build_model(ModelCfg.model_validate(recipe["pretrain"]["model"]), config["vocab_size"],
                        config["max_position_embeddings"],
                        {"bos": config.get("bos_token_id"), "eos": config.get("eos_token_id"),
                         "pad": config.get("pad_token_id")}, seed=recipe["seed"])
    return weights_sha256(model)


def check_ladder(lineage: dict, release: Path | None = None, check_init: bool = True) -> list[str]:
    """The ladder's own records: each rung's files agree with `files`; steps ascend; rows consumed and
    tokens seen are the step's; each rung's parent is the rung before (the first's, the seed's
    initialization, recomputed from the recipe); no two rungs hold the same weights; no rung but the
    last of its stage holds final weights."""
    problems: list[str] = []
    lad = lineage.get("ladder") or {}
    rungs = lad.get("rungs") or []
    files = lineage.get("files") or {}
    if not rungs:
        return problems
    B, seq = lad.get("global_batch_size"), lad.get("seq_len")
    init = lad.get("init_sha256")
    prev, pre_last = None, None
    for r in rungs:
        name = rung_name(r["step"]) if isinstance(r.get("step"), int) else str(r.get("step"))
        if r.get("path") != f"checkpoints/{name}":
            problems.append(f"{name}: path {r.get('path')!r} is not checkpoints/{name}")
        for f, h in sorted((r.get("files") or {}).items()):
            if files.get(f"checkpoints/{name}/{f}") != h:
                problems.append(f"{name}: {f}: the ladder's sha256 {str(h)[:16]}… is not the one lineage.json "
                                f"files lists ({str(files.get(f'checkpoints/{name}/{f}'))[:16]}…)")
        if (r.get("files") or {}).get(WEIGHTS) != r.get("sha256"):
            problems.append(f"{name}: {WEIGHTS}: the rung's sha256 is not its file's")
        if prev is not None and r["step"] <= prev["step"]:
            problems.append(f"{name}: step does not follow {rung_name(prev['step'])}")
        want = prev["sha256"] if prev is not None else init
        what = rung_name(prev["step"]) if prev is not None else f"the initialization of seed {lad.get('seed')}"
        if r.get("parent_sha256") != want:
            problems.append(f"{name}: parent {str(r.get('parent_sha256'))[:16]}… is not {what} ({str(want)[:16]}…): "
                            "the rung does not descend from the one before it")
        if r["step"] == 0 and r.get("sha256") != init:
            problems.append(f"{name}: {WEIGHTS} is not the initialization (init_sha256 {str(init)[:16]}…)")
        if r.get("stage") == "pretrain":
            pre_last = r
            if B and r.get("rows_consumed") != r["step"] * B:
                problems.append(f"{name}: rows_consumed {r.get('rows_consumed')} is not step x global batch "
                                f"({r['step'] * B})")
        elif pre_last is not None and r.get("rows_consumed") != pre_last.get("rows_consumed"):
            problems.append(f"{name}: rows_consumed {r.get('rows_consumed')}: post-training reads no published rows")
        if seq and r.get("tokens_seen") != (r.get("rows_consumed") or 0) * seq:
            problems.append(f"{name}: tokens_seen {r.get('tokens_seen')} is not rows_consumed x seq_len")
        prev = r
    # final weights: each stage's model may sit only in that stage's last rung
    finals = {}
    for c in lineage.get("checkpoints") or []:
        if c.get("stage") in ("pretrain", "posttrain") and c.get("sha256"):
            finals[c["sha256"]] = c["stage"]
    last = {}
    for r in rungs:
        last[r.get("stage")] = r["step"]
    for stage, step in last.items():
        r = next(x for x in rungs if x["step"] == step)
        want = next((s for s, st in finals.items() if st == stage), None)
        if want is not None and r.get("sha256") != want:
            problems.append(f"{rung_name(step)}: {WEIGHTS} is not the {stage} model the release ships "
                            "(the last rung of a stage is its final weights)")
    named = set()
    for r in rungs:
        stage = finals.get(r.get("sha256"))
        if stage is not None and not (r.get("stage") == stage and last.get(stage) == r["step"]):
            named.add(r["step"])
            problems.append(f"{rung_name(r['step'])}: {WEIGHTS} holds the final {stage} weights "
                            f"(sha256 {r['sha256'][:16]}…), not step {r['step']}'s")
    legit = {r["step"] for r in rungs if finals.get(r.get("sha256")) == r.get("stage")
             and last.get(r.get("stage")) == r["step"]}
    groups: dict[str, list[int]] = {}
    for r in rungs:
        groups.setdefault(r.get("sha256"), []).append(r["step"])
    for sha, group in groups.items():
        original = next((s for s in group if s in legit), group[0])   # the final's own rung, else the first
        for s in group:
            if s != original and s not in named:
                problems.append(f"{rung_name(s)}: {WEIGHTS} is identical to {rung_name(original)}'s "
                                f"(sha256 {str(sha)[:16]}…): two rungs hold the same weights")
    if check_init and init and release is not None:
        cfg_file = release / rungs[0]["path"] / "config.json"
        if cfg_file.is_file():
            try:
                got = init_sha256(lineage["recipe"], read_json(cfg_file))
            except Exception as e:  # noqa: BLE001 - a recipe or config that does not build is a finding
                problems.append(f"ladder.init_sha256: cannot rebuild the initialization ({type(e).__name__}: {e})")
            else:
                if got != init:
                    problems.append(f"ladder.init_sha256 {init[:16]}… is not the initialization of seed "
                                    f"{lineage['recipe'].get('seed')} ({got[:16]}…): the ladder does not "
                                    "start from this recipe's seed")
    return problems


def check_quoted(lineage: dict, release: Path) -> list[str]:
    """The hashes the lineage quotes outside `files` (model_sha256, the data order, the decontamination
    files, the checkpoints) are the ones `files` lists for those paths."""
    files = lineage["files"]
    data = lineage.get("data")
    if not isinstance(data, dict):
        return [f"lineage.json: data: {'missing' if 'data' not in lineage else 'expected dict'}"]
    problems = []
    quoted = {"model.safetensors": lineage.get("model_sha256"), "data/indices.npy": data.get("indices_sha256"),
              "data/blend.json": data.get("blend_json_sha256"),
              **data.get("decontamination", {}).get("files", {})}
    top = lineage.get("released_variant", "posttrain")
    for c in lineage.get("checkpoints") or []:
        if c.get("stage") == top:
            quoted["model.safetensors"] = quoted["model.safetensors"] or c.get("sha256")
            if c.get("sha256") != quoted["model.safetensors"]:
                problems.append(f"lineage.json: checkpoints.{c['name']}.sha256 does not match model_sha256")
        elif c.get("stage") == "pretrain" and "base/model.safetensors" in files:
            quoted["base/model.safetensors"] = c.get("sha256")
        elif c.get("stage") == "quantize" and f"quantized/{c['name']}/{c.get('file')}" in files:
            quoted[f"quantized/{c['name']}/{c['file']}"] = c.get("sha256")
    for rel, digest in sorted(quoted.items()):
        if rel in files and files[rel] != digest:
            problems.append(f"{release / rel}: lineage.json records two different sha256 for it "
                            f"(files: {str(files[rel])[:16]}…, elsewhere: {str(digest)[:16]}…)")
        if rel not in files:
            problems.append(f"{release / rel}: named by lineage.json but not in its file list")
    return problems


def verify_release(release: Path, lineage: dict, check_init: bool = True) -> list[str]:
    """Every mismatch of a release folder against its lineage (empty: it verifies): the files
    (`check_files`), the hashes quoted elsewhere (`check_quoted`), the ladder (`check_ladder`; with
    `check_init`, its first parent against the seed's initialization rebuilt here)."""
    files = lineage.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{release / 'lineage.json'}: lists no release files (`files`); "
                "cannot verify this release (made by an older version?)"]
    return check_files(release, files) + check_quoted(lineage, release) + check_ladder(lineage, release, check_init)


def verify(target: str, check_init: bool = True) -> int:
    """`omp verify <release dir | hub repo id>`: prints every mismatch, named by step and file;
    0 when the release verifies, 1 otherwise."""
    path = Path(target)
    notes: list[str] = []
    if path.is_dir():
        release = path
    elif HUB_ID.match(str(target)) and not path.exists():
        release, notes = fetch_hub(str(target))
    else:
        raise PipelineError(f"{target}: neither a release directory nor a hub repo id (org/name)")
    lin_file = release / "lineage.json"
    if not lin_file.is_file():
        raise PipelineError(f"{lin_file}: not found; is {target} a release made by `omp release`?")
    lineage = read_json(lin_file)
    if not isinstance(lineage, dict):
        raise PipelineError(f"{lin_file}: not a lineage (a JSON object)")
    problems = verify_release(release, lineage, check_init)
    rungs = (lineage.get("ladder") or {}).get("rungs") or []
    for n in notes:
        print(f"note: {n}")
    for p in problems:
        print(f"MISMATCH {p}")
    files = lineage.get("files") or {}
    if problems:
        print(f"FAILED: {len(problems)} mismatch(es) in {target} ({len(files)} files, {len(rungs)} rungs)")
        return 1
    print(f"OK: {len(files)} files match lineage.json; {len(rungs)} rungs, each descending from the one before"
          + (", the first from the seed's initialization" if rungs else " (no ladder in this release)"))
    return 0


def fetch_hub(repo_id: str) -> tuple[Path, list[str]]:
    """A published repository as a local release folder to verify: `main` holds the release but
    `checkpoints/`; branch `step-NNNNNNN` holds that rung's files at its root (pipeline/commands/publish.py).
    Files come through huggingface_hub (its cache; HF_HUB_OFFLINE=1 reads only the cache). Returns the
    folder and notes on what could not be looked at."""
    from huggingface_hub import HfApi, hf_hub_download   # the hub client: only for a hub repo id

    def get(filename: str, revision: str) -> str | None:
        try:
            return hf_hub_download(repo_id, filename, revision=revision)
        except Exception as e:  # noqa: BLE001 - not on the hub (or not cached offline): reported as missing
            if filename == "lineage.json":
                raise PipelineError(f"{repo_id}: cannot read lineage.json from the hub ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200]})") from None
            return None

    out = Path(tempfile.mkdtemp(prefix="omp-verify-"))
    lineage_file = get("lineage.json", "main")
    shutil.copyfile(lineage_file, out / "lineage.json")
    lineage = read_json(out / "lineage.json")
    files = lineage.get("files") if isinstance(lineage, dict) else None
    notes: list[str] = []

    def where(rel: str) -> tuple[str, str]:
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == "checkpoints" and NAME.match(parts[1]):
            return parts[1], parts[2]          # branch step-NNNNNNN, file at its root
        return "main", rel

    for rel in sorted(files or {}):
        check_relpath(rel, "lineage.json: files")
        src = get(*reversed(where(rel)))
        if src is not None:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / rel)
    try:   # files on the hub that the lineage does not list
        api = HfApi()
        listed = set(files or {})
        main = set(api.list_repo_files(repo_id))
        for f in sorted(main - listed - {"lineage.json", ".gitattributes"}):
            (out / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(get(f, "main"), out / f)
        for r in (lineage.get("ladder") or {}).get("rungs") or []:
            branch = rung_name(r["step"])
            for f in sorted(set(api.list_repo_files(repo_id, revision=branch)) - main - set(r.get("files") or {})):
                dest = out / "checkpoints" / branch / f
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(get(f, branch), dest)
    except Exception as e:  # noqa: BLE001 - offline: what the lineage lists is still checked
        notes.append(f"could not list the files of {repo_id} on the hub ({type(e).__name__}); files the "
                     "lineage does not list were not looked for")
    return out, notes

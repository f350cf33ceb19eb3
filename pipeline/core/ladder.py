"""The checkpoint ladder: the weights of chosen steps, published, hash-listed, verifiable, recreatable.

Resume checkpoints (pipeline/core/checkpoint.py) are pruned to `keep_last`; a *rung* is kept for good.
`pretrain.ladder` chooses the steps (`steps()`: step 0, powers of two, every K, the listed ones and
the last, as the open suites publish them). The trainer writes each rung while it trains, as a
Hugging Face model folder (config, weights, generation config, tokenizer), atomically, under
`artifacts/pretrain/checkpoints/ladder/step-NNNNNNN/` (kept across a resume like the checkpoints),
and at the end links them into the stage output `artifacts/pretrain/ladder/`, where the stage's
provenance records their sha256 like every other output. Post-training adds its first and last step
(`artifacts/posttrain/ladder/`), numbered on after the last pretraining step, so one chain of
`step-NNNNNNN` runs from the initialization to the released model.

Each rung folder holds `rung.json`: step, stage, stage_step, tokens_seen and rows_consumed (rows
`0 : rows_consumed` of the published order `indices.npy`, i.e. `omp batch --step 0 .. step-1`),
the sha256 of its weights and of its parent rung's weights (the first rung's parent is the seed's
initialization, `init_sha256`). The release copies rungs to `checkpoints/step-NNNNNNN/` and lists
them in `lineage.json` (`ladder`); `omp verify` checks all of it (`verify_release`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from pipeline.core.io import atomic_dir, read_json, sha256_file, write_json

NAME = re.compile(r"^step-(\d{7})$")
RUNG = "rung.json"
SUMMARY = "ladder.json"
INIT = "init.json"
WEIGHTS = "model.safetensors"


def rung_name(step: int) -> str:
    return f"step-{step:07d}"


def steps(cfg, total: int) -> list[int]:
    """The rung steps of a run of `total` steps (pretrain.ladder)."""
    if not cfg.enabled or total <= 0:
        return []
    out = {total}
    if cfg.initial:
        out.add(0)
    if cfg.powers_of_two:   # below the first multiple of `every` (Pythia: 1 .. 512, then every 1000)
        p, below = 1, min(total, cfg.every or total)
        while p < below:
            out.add(p)
            p *= 2
    if cfg.every:
        out.update(range(cfg.every, total, cfg.every))
    out.update(s for s in cfg.steps if s <= total)
    return sorted(out)


def save_hf(model, dest: Path, tokenizer_dir: Path | None = None, tokenizer=None) -> None:
    """A Hugging Face model folder: config, safetensors weights, generation config, tokenizer files."""
    from transformers import GenerationConfig

    from pipeline.pretrain.outputs import TOKENIZER_FILES

    model.save_pretrained(str(dest), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
    else:
        c = model.config
        GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                         pad_token_id=c.pad_token_id).save_pretrained(str(dest))
        for name in TOKENIZER_FILES:
            if tokenizer_dir is not None and (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, dest / name)


def weights_sha256(model) -> str:
    """sha256 of the weights file `save_pretrained` writes for `model` (e.g. the initialization)."""
    with tempfile.TemporaryDirectory(prefix="omp-init-") as d:
        model.save_pretrained(d, safe_serialization=True)
        return sha256_file(Path(d) / WEIGHTS)


def write_rung(model, root: Path, info: dict, tokenizer_dir: Path | None = None, tokenizer=None) -> dict:
    """root/step-NNNNNNN/ written atomically; `info` holds step, stage, tokens_seen, rows_consumed,
    parent_sha256. Returns the rung record (also in the folder's rung.json)."""
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(root / rung_name(info["step"])) as tmp:
        save_hf(model, tmp, tokenizer_dir, tokenizer)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        rec = {**info, "sha256": files[WEIGHTS], "files": files}
        write_json(tmp / RUNG, rec)
    return rec


def read_rungs(root: Path) -> list[dict]:
    """The rung records under root, by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if NAME.match(p.name) and (p / RUNG).is_file():
            out.append(read_json(p / RUNG))
    return sorted(out, key=lambda r: r["step"])


def drop_after(root: Path, step: int) -> None:
    """Rungs past `step` (left by a run that went on after the checkpoint being resumed) are removed."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            m = NAME.match(p.name)
            if m and int(m.group(1)) > step:
                shutil.rmtree(p, ignore_errors=True)


def link_into(src_root: Path, dst_root: Path) -> list[dict]:
    """The rungs of `src_root` (a run's work folder) hard-linked into the stage output `dst_root`, with
    the summary `ladder.json` (init sha256 + rungs). Returns the rungs."""
    from pipeline.core.io import _link_tree

    rungs = read_rungs(src_root)
    dst_root.mkdir(parents=True, exist_ok=True)
    for r in rungs:
        _link_tree(src_root / rung_name(r["step"]), dst_root / rung_name(r["step"]))
    init = read_json(src_root / INIT) if (src_root / INIT).is_file() else {}
    write_json(dst_root / SUMMARY, {**init, "rungs": [{k: v for k, v in r.items() if k != "files"} for r in rungs]})
    return rungs


# --------------------------------------------------------------------------- omp verify


def _label(rel: str) -> str:
    """`checkpoints/step-NNNNNNN/f` -> `step-NNNNNNN: f` (a mismatch is named by step and file)."""
    parts = rel.split("/")
    if len(parts) >= 3 and parts[0] == "checkpoints" and NAME.match(parts[1]):
        return f"{parts[1]}: {'/'.join(parts[2:])}"
    return rel


def check_files(release: Path, files: dict) -> list[str]:
    """Every file lineage.json lists is there with its sha256, and nothing else is (all mismatches)."""
    from pipeline.core.integrity import PathError, check_relpath, tree_files

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
    from pipeline.core.config import ModelCfg
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


def verify_release(release: Path, lineage: dict, check_init: bool = True) -> list[str]:
    """Every mismatch of a release folder against its lineage (empty: it verifies)."""
    files = lineage.get("files")
    if not isinstance(files, dict) or not files:
        return ["lineage.json: lists no release files (`files`)"]
    return check_files(release, files) + check_ladder(lineage, release, check_init)


def verify(target: str, check_init: bool = True) -> int:
    """`omp verify <release dir | hub repo id>`: prints every mismatch, named by step and file;
    0 when the release verifies, 1 otherwise."""
    from pipeline.core.errors import PipelineError
    from pipeline.core.integrity import HUB_ID

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
    from huggingface_hub import HfApi, hf_hub_download

    from pipeline.core.errors import PipelineError
    from pipeline.core.integrity import check_relpath

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

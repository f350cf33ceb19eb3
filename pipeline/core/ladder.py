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
them in `lineage.json` (`ladder`); `omp verify` checks all of it (pipeline/commands/verify.py).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from pipeline.core.io import _link_tree, atomic_dir, read_json, sha256_file, write_json

NAME = re.compile(r"^step-(\d{7})$")
RUNG = "rung.json"
SUMMARY = "ladder.json"
INIT = "init.json"
WEIGHTS = "model.safetensors"
# the tokenizer files a model folder carries (copied from the tokenizer stage's output)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


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
    from transformers import GenerationConfig   # heavy: `omp release`/`verify`/`recreate` import this module too

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
    rungs = read_rungs(src_root)
    dst_root.mkdir(parents=True, exist_ok=True)
    for r in rungs:
        _link_tree(src_root / rung_name(r["step"]), dst_root / rung_name(r["step"]))
    init = read_json(src_root / INIT) if (src_root / INIT).is_file() else {}
    write_json(dst_root / SUMMARY, {**init, "rungs": [{k: v for k, v in r.items() if k != "files"} for r in rungs]})
    return rungs

"""blend: the published indices — the whole training data order as a numpy array.

`artifacts/blend/indices.npy` has shape (instances, 2), int64: row i is instance i of the run,
`[source_id, token_offset]`, i.e. tokens `offset : offset + seq_len` of that source's
`train.npy`. Global batch N is rows `N*B : (N+1)*B`. Sources are counted in whole instances by
largest remainder (realized share within 1/instances of the target); a source with fewer
sequences than its share is upsampled — each extra epoch is a fresh seeded permutation — and
reported with epochs > 1, never truncated. `blend.json` holds the realized mixture and the sha256
of the indices and of every token file; `blend.png` charts the mixture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.config import Recipe, config_sha256, load_manifest, recipe_path
from pipeline.core.errors import DataIntegrityError, RecipeError
from pipeline.core.io import atomic_dir, read_json, sha256_file, write_json
from pipeline.core.provenance import STAGE_KEYS, provenance
from pipeline.core.log import status
from pipeline.core.paths import OUT as STAGE_OUT
from pipeline.core.integrity import seal, verify_stage

OUT = STAGE_OUT["blend"]
LOGIC_VERSION = 1  # bump when the way indices are built changes; recorded in blend.json


def allocate(shares: list[float], total: int) -> np.ndarray:
    """Largest-remainder apportionment of `total` instances to `shares` (which sum to 1)."""
    exact = np.asarray(shares, dtype=np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def epoch_order(n_chunks: int, need: int, rng: np.random.Generator) -> np.ndarray:
    """`need` chunk ids: whole seeded permutations of range(n_chunks), then a partial one."""
    full, rem = divmod(need, n_chunks)
    parts = [rng.permutation(n_chunks) for _ in range(full)]
    if rem:
        parts.append(rng.permutation(n_chunks)[:rem])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def build_indices(chunks: list[int], shares: list[float], instances: int, seq_len: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (instances, 2) int64 order and the per-source instance counts.

    Memory: the output (16 bytes an instance) plus one permutation (8 bytes an instance) plus the
    largest source's offsets — linear in the budget.
    """
    counts = allocate(shares, instances)
    out = np.empty((instances, 2), dtype=np.int64)
    slots = np.random.default_rng([seed, 0]).permutation(instances)  # interleave sources
    start = 0
    for sid, (n_chunks, need) in enumerate(zip(chunks, counts)):
        rng = np.random.default_rng([seed, 1 + sid])
        pos = slots[start:start + need]
        out[pos, 0] = sid
        out[pos, 1] = epoch_order(n_chunks, int(need), rng) * seq_len
        start += need
    return out, counts


def run(recipe: Recipe, tokenize_dir: Path = STAGE_OUT["tokenize"], out_dir: Path = OUT) -> dict:
    cfg = recipe.blend
    rfile = recipe_path(recipe)
    manifest = load_manifest(recipe.data.manifest)
    verify_stage(tokenize_dir)
    tok_report = read_json(tokenize_dir / "tokenize.json")
    steps = cfg.tokens // (cfg.global_batch_size * cfg.seq_len)
    if steps < 1:
        raise RecipeError(rfile, "blend.tokens", f"{cfg.tokens} tokens is less than one global batch "
                          f"({cfg.global_batch_size} x {cfg.seq_len})")
    instances = steps * cfg.global_batch_size
    names = [s.name for s in manifest.sources]
    shares = [manifest.target_shares[n] for n in names]
    chunks = []
    for n in names:
        avail = tok_report["sources"][n]["train"]["tokens"]
        if avail < cfg.seq_len:
            raise DataIntegrityError(f"{tokenize_dir / n / 'train.npy'}: source {n!r} has {avail} training "
                                     f"tokens, fewer than one sequence of blend.seq_len={cfg.seq_len}")
        chunks.append(avail // cfg.seq_len)
    indices, counts = build_indices(chunks, shares, instances, cfg.seq_len, recipe.blend_seed)
    sources = []
    for sid, n in enumerate(names):
        sources.append({
            "id": sid, "name": n, "target_share": shares[sid],
            "realized_share": float(counts[sid]) / instances,
            "instances": int(counts[sid]), "tokens": int(counts[sid]) * cfg.seq_len,
            "available_tokens": int(tok_report["sources"][n]["train"]["tokens"]),
            "sequences_available": chunks[sid], "epochs": float(counts[sid]) / chunks[sid],
            "upsampled": bool(counts[sid] > chunks[sid]),
        })
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "indices.npy", indices)
        report = {
            "logic_version": LOGIC_VERSION, "seed": recipe.blend_seed, "seq_len": cfg.seq_len,
            "global_batch_size": cfg.global_batch_size, "steps": steps, "instances": instances,
            "tokens": instances * cfg.seq_len, "dtype": tok_report["dtype"],
            "eos_id": tok_report["eos_id"], "vocab_size": tok_report["vocab_size"],
            "tokenizer_sha256": tok_report["tokenizer_sha256"],
            "sources": sources,
            "indices_sha256": sha256_file(tmp / "indices.npy"),
            "token_files": {n: tok_report["sources"][n]["train"]["sha256"] for n in names},
            "token_paths": {n: tok_report["sources"][n]["train"]["file"] for n in names},
            "val_files": {n: tok_report["sources"][n]["val"]["sha256"] for n in names},
            "val_paths": {n: tok_report["sources"][n]["val"]["file"] for n in names},
            # the recipe keys blend reads (not the whole recipe: a later stage's edit leaves this file alone)
            "config_sha256": config_sha256(recipe, STAGE_KEYS["blend"]),
        }
        write_json(tmp / "blend.json", report)
        plot_mixture(report, tmp / "blend.png")
        seal(tmp, provenance(
            "blend", recipe, {"tokenize": sha256_file(tokenize_dir / "tokenize.json")}))
    for s in sources:
        if s["upsampled"]:
            status(f"note: source {s['name']!r} is upsampled: {s['epochs']:.2f} epochs "
                   f"({s['sequences_available']} sequences available, {s['instances']} used)")
    return report


def mixture_table(report: dict) -> str:
    rows = ["| source | target | realized | tokens | epochs |", "|---|---:|---:|---:|---:|"]
    for s in report["sources"]:
        flag = " (upsampled)" if s["upsampled"] else ""
        rows.append(f"| {s['name']} | {s['target_share']:.4f} | {s['realized_share']:.4f} | "
                    f"{s['tokens']:,} | {s['epochs']:.3f}{flag} |")
    rows.append(f"\n{report['steps']} steps x {report['global_batch_size']} sequences x "
                f"{report['seq_len']} tokens = {report['tokens']:,} tokens; seed {report['seed']}; "
                f"indices sha256 {report['indices_sha256'][:16]}…")
    return "\n".join(rows)


def plot_mixture(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in report["sources"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 3.6), dpi=100)
    ax.bar(x - 0.2, [s["target_share"] for s in report["sources"]], 0.4, label="target")
    ax.bar(x + 0.2, [s["realized_share"] for s in report["sources"]], 0.4, label="realized")
    for i, s in enumerate(report["sources"]):
        ax.annotate(f"{s['epochs']:.2f} ep", (i + 0.2, s["realized_share"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("share of training tokens")
    ax.set_title(f"mixture: {report['tokens']:,} tokens, seed {report['seed']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version/date stamp: byte-identical reruns
    plt.close(fig)

"""Training decontamination (tokenize) and the contamination report (evaluate) agree: held-out is held out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tests.conftest import omp

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
HELDOUT_ITEMS = {"omp_ppl_python_docs": 17, "omp_ppl_python_code": 40, "omp_ppl_arithmetic": 200,
                 "omp_arith_mc": 200, "omp_code_mc": 120, "omp_arith_gen": 200, "omp_arith_gen_chat": 200}


def contamination_in(work: Path, monkeypatch) -> dict:
    from pipeline.evaluate import contamination

    monkeypatch.chdir(work)  # the report reads artifacts/ and evals/ of the workdir
    return contamination.report(Path("artifacts"), Path("evals/data"), 13, tasks_dir=Path("evals/tasks"))


def test_micro_chain_shows_zero_overlap_for_every_heldout_task(micro_data, monkeypatch):
    rep = contamination_in(micro_data, monkeypatch)
    assert rep["training_decontamination"]["enabled"] and rep["training_decontamination"]["ngram"] == 13
    assert {t: v["items"] for t, v in rep["tasks"].items()} == HELDOUT_ITEMS
    assert {t: v["overlapping"] for t, v in rep["tasks"].items()} == {t: 0 for t in HELDOUT_ITEMS}
    meta = json.loads((micro_data / "artifacts/tokenize/tokenize.json").read_text())
    removed = {s: e["train"]["decontaminated"]["tokens_removed"] for s, e in meta["sources"].items()}
    # measured: python-docs 790, python-code 1,703 of ~256k training tokens; arithmetic 0
    assert removed["python-docs"] > 0 and removed["python-code"] > 0 and removed["arithmetic"] == 0
    assert sum(removed.values()) < 0.02 * sum(e["train"]["tokens"] for e in meta["sources"].values())
    assert "decontaminated" not in meta["sources"]["python-docs"]["val"]  # the held-out split stays whole


def test_without_decontamination_the_python_tasks_overlap(micro_data, tmp_path, monkeypatch):
    """The control: the same chain with decontamination off shows the boilerplate overlap the fix removes."""
    work = tmp_path / "w"
    shutil.copytree(micro_data, work, symlinks=True)
    (work / "tests/recipes/nodecon.yaml").write_text("base: micro.yaml\ntokenize:\n  decontaminate_tasks: null\n")
    for stage in ("tokenize", "blend"):
        omp(stage, "--recipe", "tests/recipes/nodecon.yaml", cwd=work, env=OFFLINE)
    rep = contamination_in(work, monkeypatch)
    assert rep["training_decontamination"] == {"enabled": False}
    over = {t: v["overlapping"] for t, v in rep["tasks"].items()}
    # measured: code_mc 10/120, ppl_python_code 16/40, ppl_python_docs 5/17; arithmetic 0
    assert over["omp_code_mc"] > 0 and over["omp_ppl_python_code"] > 0 and over["omp_ppl_python_docs"] > 0
    assert over["omp_arith_mc"] == 0


def test_cut_removes_every_banned_window_and_splits_the_document():
    from pipeline.core.ngrams import ngram_hashes
    from pipeline.tokenize import cut_pieces, keep_masks

    n, eos = 4, 0
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, size=40), rng.integers(1, 50, size=30), np.arange(1, 3)]
    banned = np.unique(ngram_hashes(np.stack([docs[0][10:14], docs[0][12:16], docs[1][26:30]])))
    masks = keep_masks(docs, banned, n, eos)
    assert masks[2] is None  # untouched documents stay whole
    assert (~masks[0]).sum() == 6 and not masks[0][10:16].any() and masks[0][:10].all()
    pieces = cut_pieces(docs[0], masks[0])
    assert [len(p) for p in pieces] == [10, 24]
    assert [len(p) for p in cut_pieces(docs[1], masks[1])] == [26]
    # no window of the written stream (pieces joined by EOS) is banned
    stream = np.concatenate([a for d, m in zip(docs, masks) for p in cut_pieces(d, m) for a in (p, [eos])])
    hashes = ngram_hashes(np.lib.stride_tricks.sliding_window_view(stream, n))
    assert not np.isin(hashes, banned).any()


def test_missing_decontamination_dir_is_a_recipe_error(micro_data, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(micro_data, work, symlinks=True)
    (work / "tests/recipes/bad.yaml").write_text("base: micro.yaml\ntokenize:\n  decontaminate_tasks: no/such/dir\n")
    proc = omp("tokenize", "--recipe", "tests/recipes/bad.yaml", cwd=work, check=False, env=OFFLINE)
    assert proc.returncode == 2, proc.stderr
    assert "bad.yaml: tokenize.decontaminate_tasks: no/such/dir is not a directory" in proc.stderr

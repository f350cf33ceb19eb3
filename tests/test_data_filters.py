"""Manifest filter steps: language and quality steps, exact and MinHash near-dedup, removed counts."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from pipeline.core.config import Filters, LanguageStep, LocalSource, NearDedup, QualityStep
from pipeline.core.io import read_json
from pipeline.sources.filters import (filter_unit, finish, language_step, near_duplicate_clusters,
                                      quality_failures, step_names)
from tests.conftest import omp

EN = ("The committee met on Tuesday to discuss the budget for the coming year, and most of the members "
      "agreed that the plan was sound, although some of them asked for more time to read it.")
FR = ("Le comité s'est réuni mardi pour discuter du budget de l'année prochaine, et la plupart des membres "
      "ont convenu que le plan était solide, même si certains ont demandé plus de temps pour le lire.")
DE = ("Der Ausschuss traf sich am Dienstag, um den Haushalt für das kommende Jahr zu besprechen, und die "
      "meisten Mitglieder waren sich einig, dass der Plan solide war.")


def prose(seed: int, words: int = 120) -> str:
    """English-looking prose, different for each seed (a few hundred distinct shingles)."""
    rng = random.Random(seed)
    vocab = ("the of and to in that it with as for was on be by at this have from or one had not but what "
             "all were when we there can an your which their said if do will each about how up out them "
             "then she many some so these would other into has more her two like him see time could no "
             "make than first been its who now people my made over did down only way find use may water "
             "long little very after words called just where most know river garden window market letter").split()
    return " ".join(rng.choice(vocab) for _ in range(words)).capitalize() + "."


def near_copy(text: str, changes: int) -> str:
    words = text.split()
    for i in range(changes):
        words[7 + 11 * i] = "zebra"
    return " ".join(words)


def test_language_step_keeps_the_named_languages():
    keep_en = language_step(LanguageStep(kind="language", languages=["en"], min_score=0.5))
    assert [keep_en(t) for t in (EN, FR, DE, "def f(x):\n    return x + 1\n")] == [True, False, False, False]
    keep_fr_de = language_step(LanguageStep(kind="language", languages=["fr", "de"], min_score=0.9))
    assert [keep_fr_de(t) for t in (EN, FR, DE)] == [False, True, True]


def test_quality_rules_name_what_fails():
    cfg = QualityStep(kind="quality")
    assert quality_failures(cfg, EN * 2) == []
    assert quality_failures(cfg, EN) == ["min_words"]  # 33 words < 50
    assert "max_symbol_word_ratio" in quality_failures(cfg, (EN + " # # # # # ") * 3)
    assert quality_failures(cfg, "\n".join(["- " + EN] * 3)) == ["max_bullet_line_ratio"]
    assert quality_failures(cfg, "\n".join([EN + " and so on..."] * 3)) == ["max_ellipsis_line_ratio"]
    numbers = " ".join(str(i) for i in range(200))
    assert {"min_alpha_word_ratio", "min_stopwords"} <= set(quality_failures(cfg, numbers))
    # a rule set to null is off
    assert quality_failures(QualityStep(kind="quality", min_words=None), EN) == []


def test_near_dedup_survivor_is_the_smallest_hash_whatever_the_order():
    base = [prose(i) for i in range(6)]
    copies = [near_copy(base[0], 2), near_copy(base[0], 4), near_copy(base[3], 1)]
    docs = base + copies + [base[5]]  # and one exact duplicate
    cfg = Filters(near_dedup=NearDedup(threshold=0.5))
    src = LocalSource(name="s", kind="local", paths=["x"], license="CC0-1.0", weight=1, filters=cfg)
    expected_a = min([base[0]] + copies[:2], key=lambda t: hashlib.sha256(t.encode()).digest())
    expected_b = min([base[3], copies[2]], key=lambda t: hashlib.sha256(t.encode()).digest())
    survivors = None
    for seed in range(4):  # any order of the documents, any cut into units
        order = docs[:]
        random.Random(seed).shuffle(order)
        cut = 1 + seed * 3
        kept, report = finish(src, [filter_unit(cfg, order[:cut]), filter_unit(cfg, order[cut:])])
        assert report["raw_documents"] == 10
        assert report["removed"] == {"length": 0, "exact_dedup": 1, "near_dedup": 3, "limits": 0}
        assert expected_a in kept and expected_b in kept and len(kept) == 6
        survivors = survivors or set(kept)
        assert set(kept) == survivors


def test_near_duplicate_clusters_join_chains():
    cfg = NearDedup(threshold=0.5, num_perm=64)
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**63, size=(5, 64), dtype=np.uint64)
    sigs[1, :40] = sigs[0, :40]   # 1 ~ 0 (62% equal)
    sigs[2, 24:] = sigs[1, 24:]   # 2 ~ 1 (62%), 2 !~ 0 (25%): one cluster by the chain
    assert near_duplicate_clusters(sigs, cfg) == [[0, 1, 2]]
    assert near_duplicate_clusters(sigs[[4, 3]], cfg) == []


def test_removed_counts_per_step_in_ingest_json(tmp_path):
    docs = ([EN * 3] + [FR * 3, DE * 3] + [EN] + [prose(i, 150) for i in range(8)]
            + [near_copy(prose(0, 150), 2), prose(1, 150), "tiny"])
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "m.yaml").write_text(
        "name: m\nsources:\n"
        "  - name: notes\n    kind: local\n    paths: [notes.jsonl]\n    format: jsonl\n"
        "    license: CC0-1.0\n    weight: 1\n    max_docs: 8\n    seed: 3\n"
        "    filters:\n      min_chars: 10\n"
        "      steps: [{kind: language, languages: [en]}, {kind: quality}]\n"
        "      near_dedup: {threshold: 0.7, seed: 5}\n")
    (tmp_path / "r.yaml").write_text("name: r\ndata: {manifest: m.yaml, lock: false, unit_docs: 4}\n")
    omp("ingest", "--recipe", "r.yaml", cwd=tmp_path)
    meta = read_json(tmp_path / "artifacts/ingest/ingest.json")["sources"]["notes"]
    assert meta["raw_documents"] == len(docs) == 15
    assert meta["removed"] == {"length": 1, "language": 2, "quality": 1, "exact_dedup": 1,
                               "near_dedup": 1, "limits": 1}
    assert meta["documents"] == 8 == 15 - sum(meta["removed"].values())
    assert step_names(Filters(steps=[QualityStep(kind="quality")], near_dedup=NearDedup())) == [
        "length", "quality", "exact_dedup", "near_dedup", "limits"]
    assert not (tmp_path / "artifacts/.ingest.work").exists()


@pytest.mark.parametrize("filters, key", [
    ("{steps: [{kind: language}, {kind: language}]}", "sources.0.filters.steps"),
    ("{steps: [{kind: perplexity}]}", "sources.0.filters.steps.0"),
    ("{steps: [{kind: quality, min_words: -1}]}", "sources.0.filters.steps.0.min_words"),
    ("{near_dedup: {threshold: 1.5}}", "sources.0.filters.near_dedup.threshold"),
])
def test_bad_filter_steps_name_the_key(tmp_path, monkeypatch, filters, key):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.yaml").write_text(
        "name: m\nsources:\n  - {name: a, kind: builtin, builtin: synthetic-arithmetic, license: CC0-1.0, "
        f"weight: 1, filters: {filters}}}\n")
    (tmp_path / "r.yaml").write_text("name: r\ndata: {manifest: m.yaml}\n")
    from pipeline.core.config import load_recipe
    from pipeline.core.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        load_recipe("r.yaml")
    assert str(err.value).startswith(f"m.yaml: {key}: ")


def hub_repo(root, shards: int, rows: int) -> list[str]:
    """A local dataset in hub layout with `shards` parquet files; returns every row's text in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    texts = []
    for s in range(shards):
        part = [f"shard {s} row {r}: " + "lorem ipsum " * (r % 5 + 2) for r in range(rows)]
        part[-1] = texts[0] if texts else part[-1]  # one exact duplicate of row 0 per later shard
        pq.write_table(pa.table({"content": part}), root / "data" / f"train-{s:05d}-of-{shards:05d}.parquet")
        texts += part
    return texts


HF_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_hf_ingest_streams_shards_and_resumes_after_a_kill(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    texts = hub_repo(tmp_path / "org__web", shards=4, rows=30)
    (tmp_path / "m.yaml").write_text(
        "name: m\nsources:\n"
        f"  - {{name: web, kind: hf, repo_id: '{tmp_path / 'org__web'}', revision: main, text_field: content,"
        " license: CC-BY-4.0, weight: 1}\n")
    (tmp_path / "r.yaml").write_text("name: r\ndata: {manifest: m.yaml, lock: false}\n")
    env = {**os.environ, **HF_ENV, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    reached = tmp_path / "reached"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/ingest_kill_worker.py"), "r.yaml", "2",
                             str(reached)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not reached.exists():  # ordered by the file the worker writes after its 2nd unit
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the ingest worker never committed 2 units"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert reached.read_text() == "web 1 4\n"
    work = tmp_path / "artifacts/.ingest.work/web"
    assert sorted(p.name for p in work.iterdir()) == ["unit-00000.json", "unit-00001.json"]
    assert not (tmp_path / "artifacts/ingest").exists()

    out = omp("ingest", "--recipe", "r.yaml", cwd=tmp_path, env={**HF_ENV, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert "web: resumed 2 of 4 units" in out.stderr  # status lines go to stderr
    rows = [json.loads(line)["text"] for line in
            (tmp_path / "artifacts/ingest/web/shard-00000.jsonl").read_text().splitlines()]
    expected = list(dict.fromkeys(texts))  # every row once, in shard order, exact duplicates dropped
    assert rows == expected and len(rows) == 120 - 3
    meta = read_json(tmp_path / "artifacts/ingest/ingest.json")["sources"]["web"]
    assert meta["raw_documents"] == 120 and meta["removed"]["exact_dedup"] == 3
    assert not (tmp_path / "artifacts/.ingest.work").exists()

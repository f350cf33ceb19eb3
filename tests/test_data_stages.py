"""The data stages: deterministic artifacts, realized mixture, upsampling, the published order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.blend import allocate, build_indices
from pipeline.core.io import read_json, sha256_file, sha256_tree
from pipeline.sources.arithmetic import heldout_problems, is_heldout, training_documents
from pipeline.core.config import ArithmeticOptions
from tests.conftest import MICRO, make_workdir, omp, run_data_stages


def independent_batch(workdir: Path, step: int) -> np.ndarray:
    """Global batch `step` computed from indices.npy + token files with numpy only."""
    meta = json.loads((workdir / "artifacts/blend/blend.json").read_text())
    idx = np.load(workdir / "artifacts/blend/indices.npy")
    names = [s["name"] for s in meta["sources"]]
    toks = {n: np.load(workdir / "artifacts/tokenize" / n / "train.npy") for n in names}
    b, l = meta["global_batch_size"], meta["seq_len"]
    return np.array([toks[names[s]][o:o + l] for s, o in idx[step * b:(step + 1) * b]], dtype=np.int64)


def test_data_stages_are_byte_identical_when_rerun(micro_data, tmp_path):
    again = run_data_stages(make_workdir(tmp_path / "again"))
    first, second = sha256_tree(micro_data / "artifacts"), sha256_tree(again / "artifacts")
    assert first == second
    assert {"blend/indices.npy", "blend/blend.json", "blend/blend.png", "tokenizer/tokenizer.json",
            "tokenize/tokenize.json", "ingest/ingest.json"} <= set(first)


def test_blend_report_contract_and_shares(micro_data):
    meta = read_json(micro_data / "artifacts/blend/blend.json")
    assert meta["indices_sha256"] == sha256_file(micro_data / "artifacts/blend/indices.npy")
    for name, digest in meta["token_files"].items():
        assert digest == sha256_file(micro_data / "artifacts/tokenize" / name / "train.npy")
    assert len(meta["config_sha256"]) == 64 and "recipe_sha256" not in meta
    idx = np.load(micro_data / "artifacts/blend/indices.npy")
    assert idx.shape == (meta["steps"] * meta["global_batch_size"], 2) and idx.dtype == np.int64
    counts = np.bincount(idx[:, 0], minlength=len(meta["sources"]))
    for s in meta["sources"]:
        assert {"name", "target_share", "realized_share", "tokens", "epochs"} <= set(s)
        assert abs(s["realized_share"] - s["target_share"]) <= 0.01
        assert counts[s["id"]] == s["instances"] and s["tokens"] == s["instances"] * meta["seq_len"]
    assert sum(s["tokens"] for s in meta["sources"]) == meta["tokens"]
    # every offset leaves room for a whole sequence
    avail = {s["id"]: s["available_tokens"] for s in meta["sources"]}
    assert all(o + meta["seq_len"] <= avail[s] for s, o in idx)


def test_small_source_is_upsampled_and_reported(micro_data, copy_workdir):
    wd = copy_workdir(micro_data)
    (wd / "big.yaml").write_text(f"base: {MICRO}\nname: big\nblend:\n  tokens: 409600\n")
    proc = omp("blend", "--recipe", "big.yaml", cwd=wd)
    assert "upsampled" in proc.stdout
    meta = read_json(wd / "artifacts/blend/blend.json")
    idx = np.load(wd / "artifacts/blend/indices.npy")
    up = [s for s in meta["sources"] if s["upsampled"]]
    assert up, "a 10x budget must upsample at least one micro source"
    for s in up:
        assert s["epochs"] > 1 and s["instances"] > s["sequences_available"]
        offs = idx[idx[:, 0] == s["id"], 1]
        # whole epochs: every available sequence is used at least floor(epochs) times
        uniq, reps = np.unique(offs, return_counts=True)
        assert len(uniq) == s["sequences_available"] and reps.min() == int(s["epochs"])
        assert abs(s["realized_share"] - s["target_share"]) <= 0.01
    report = omp("blend-report", cwd=wd).stdout
    assert "upsampled" in report and "realized" in report


def test_omp_batch_matches_an_independent_reader(micro_data):
    meta = read_json(micro_data / "artifacts/blend/blend.json")
    for step in (0, 17, meta["steps"] - 1):
        out = json.loads(omp("batch", "--step", str(step), "--json", cwd=micro_data).stdout)
        assert out["step"] == step
        np.testing.assert_array_equal(np.array(out["input_ids"]), independent_batch(micro_data, step))
    first = omp("batch", "--step", "5", "--json", cwd=micro_data).stdout
    assert first == omp("batch", "--step", "5", "--json", cwd=micro_data).stdout
    bad = omp("batch", "--step", str(meta["steps"]), cwd=micro_data, check=False)
    assert bad.returncode == 2 and "out of range" in bad.stderr
    decoded = json.loads(omp("batch", "--step", "0", "--json", "--decode", cwd=micro_data).stdout)["text"]
    assert len(decoded) == meta["global_batch_size"] and all(isinstance(t, str) and t for t in decoded)


def test_another_seed_gives_another_order(micro_data, copy_workdir):
    wd = copy_workdir(micro_data)
    (wd / "seed.yaml").write_text(f"base: {MICRO}\nname: seed\nblend:\n  seed: 99\n")
    omp("blend", "--recipe", "seed.yaml", cwd=wd)
    a = np.load(micro_data / "artifacts/blend/indices.npy")
    b = np.load(wd / "artifacts/blend/indices.npy")
    assert a.shape == b.shape and not np.array_equal(a, b)
    # same multiset of sources per run (same shares), different order
    np.testing.assert_array_equal(np.bincount(a[:, 0]), np.bincount(b[:, 0]))


def test_batch_refuses_tampered_token_file(micro_data, copy_workdir):
    wd = copy_workdir(micro_data)
    f = wd / "artifacts/tokenize/arithmetic/train.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    proc = omp("batch", "--step", "0", cwd=wd, check=False)
    assert proc.returncode == 2 and "arithmetic/train.npy" in proc.stderr and "does not match" in proc.stderr


def test_locked_source_that_changes_is_refused(micro_data, copy_workdir):
    wd = copy_workdir(micro_data)
    lock = wd / "tests/recipes/micro_manifest.lock.json"
    data = json.loads(lock.read_text())
    data["sources"]["python-code"]["sha256"] = "0" * 64
    lock.write_text(json.dumps(data))
    before = sha256_tree(wd / "artifacts/ingest")
    proc = omp("ingest", "--recipe", MICRO, cwd=wd, check=False)
    assert proc.returncode == 2 and "'python-code' changed" in proc.stderr and "--update-lock" in proc.stderr
    assert sha256_tree(wd / "artifacts/ingest") == before  # the old ingest output is intact


def test_data_lock_is_keyed_to_the_python_minor(micro_data, copy_workdir):
    """A lock made on another 3.11.x: the stdlib sources differ a little and ingest goes on (saying so);
    any other source that changed is still refused."""
    import platform

    wd = copy_workdir(micro_data)
    lock = wd / "tests/recipes/micro_manifest.lock.json"
    data = json.loads(lock.read_text())
    other_patch = ".".join(platform.python_version().split(".")[:2]) + ".99"
    data["sources"]["python-code"].update(sha256="0" * 64, python=other_patch)
    lock.write_text(json.dumps(data))
    proc = omp("ingest", "--recipe", MICRO, cwd=wd)
    assert "warning" in proc.stderr and "'python-code'" in proc.stderr and other_patch in proc.stderr
    entry = json.loads((wd / "artifacts/ingest/ingest.json").read_text())["sources"]["python-code"]
    assert entry["lock"]["locked_python"] == other_patch and entry["lock"]["locked_sha256"] == "0" * 64
    data["sources"]["arithmetic"].update(sha256="0" * 64, python=other_patch)  # not read from the stdlib
    lock.write_text(json.dumps(data))
    proc = omp("ingest", "--recipe", MICRO, cwd=wd, check=False)
    assert proc.returncode == 2 and "'arithmetic' changed" in proc.stderr


def test_failing_source_leaves_previous_output_intact(micro_data, copy_workdir):
    wd = copy_workdir(micro_data)
    (wd / "notes.jsonl").write_text('{"text": "a fine document of some length"}\n{"body": "no text field"}\n')
    (wd / "m.yaml").write_text(
        "name: m\nsources:\n"
        "  - {name: arith, kind: builtin, builtin: synthetic-arithmetic, license: CC0-1.0, weight: 1}\n"
        "  - {name: notes, kind: local, paths: [notes.jsonl], format: jsonl, license: CC-BY-4.0, weight: 1}\n")
    (wd / "r.yaml").write_text("name: r\ndata:\n  manifest: m.yaml\n")
    before = sha256_tree(wd / "artifacts/ingest")
    proc = omp("ingest", "--recipe", "r.yaml", cwd=wd, check=False)
    assert proc.returncode == 2 and "notes.jsonl: line 2" in proc.stderr
    assert sha256_tree(wd / "artifacts/ingest") == before
    assert not [p.name for p in (wd / "artifacts").iterdir() if p.name.startswith(".")]


def test_hf_source_from_local_parquet_in_hub_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    repo = tmp_path / "org__dataset"
    (repo / "data").mkdir(parents=True)
    texts = [f"document number {i}: " + "lorem ipsum " * (i % 7 + 3) for i in range(40)]
    pq.write_table(pa.table({"content": texts, "id": list(range(40))}),
                   repo / "data" / "train-00000-of-00001.parquet")
    (tmp_path / "m.yaml").write_text(
        "name: m\nsources:\n"
        f"  - {{name: web, kind: hf, repo_id: '{repo}', revision: main, split: train, text_field: content,"
        " license: CC-BY-4.0, weight: 1, filters: {min_chars: 1}}\n")
    (tmp_path / "r.yaml").write_text("name: r\ndata:\n  manifest: m.yaml\n  lock: false\n")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    omp("ingest", "--recipe", "r.yaml", cwd=tmp_path, env=env)
    rows = [json.loads(l)["text"] for l in (tmp_path / "artifacts/ingest/web/shard-00000.jsonl").read_text().splitlines()]
    assert rows == texts
    meta = read_json(tmp_path / "artifacts/ingest/ingest.json")["sources"]["web"]
    assert meta["kind"] == "hf" and meta["documents"] == 40 and meta["license"] == "CC-BY-4.0"
    # a wrong text field names the manifest key
    (tmp_path / "m.yaml").write_text((tmp_path / "m.yaml").read_text().replace("text_field: content", "text_field: body"))
    proc = omp("ingest", "--recipe", "r.yaml", cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2 and "sources.web.text_field" in proc.stderr


def test_arithmetic_heldout_never_trains():
    opts = ArithmeticOptions(docs=400, max_operand=20)
    held = set(heldout_problems(opts, 10_000))
    assert held and all(is_heldout(a, op, b, opts.heldout_per_mille) for a, op, b in held)
    train_text = "".join(training_documents(opts, seed=5))
    for a, op, b in held:
        assert f"What is {a} {op} {b}?" not in train_text
    assert training_documents(opts, seed=5) == training_documents(opts, seed=5)
    assert training_documents(opts, seed=5) != training_documents(opts, seed=6)


def test_allocation_and_indices_are_exact():
    counts = allocate([0.5, 0.3, 0.2], 1001)
    assert counts.sum() == 1001 and np.all(np.abs(counts / 1001 - [0.5, 0.3, 0.2]) <= 1 / 1001)
    idx, counts = build_indices([10, 1000, 3], [0.2, 0.7, 0.1], 200, seq_len=8, seed=1)
    assert np.array_equal(np.bincount(idx[:, 0]), counts)
    assert np.all(idx[idx[:, 0] == 2, 1] < 3 * 8) and np.all(idx[:, 1] % 8 == 0)
    again, _ = build_indices([10, 1000, 3], [0.2, 0.7, 0.1], 200, seq_len=8, seed=1)
    assert np.array_equal(idx, again)


def test_tokenizer_loads_in_transformers_with_chat_template(micro_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(micro_data / "artifacts/tokenizer"))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    text = "def add(a, b):\n    return a + b  # é ünïcode"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE round-trips any text
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    meta = read_json(micro_data / "artifacts/tokenize/tokenize.json")
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_token_id
    # every source has a held-out split and documents end with eos
    for name, entry in meta["sources"].items():
        assert entry["val"]["documents"] >= 1, name
        toks = np.load(micro_data / "artifacts/tokenize" / entry["train"]["file"])
        starts = np.load(micro_data / "artifacts/tokenize" / entry["train"]["docs_file"])
        assert starts[-1] == len(toks) and np.all(toks[starts[1:] - 1] == meta["eos_id"])

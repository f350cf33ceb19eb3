"""Release, publish and recreate on the micro chain (pretrain → posttrain → quantize → release)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.io import read_json, sha256_file
from tests.conftest import MICRO, REPO, omp

FAKE_TOKEN = "hf_PLANTEDfakeTOKENdoNOTleak0123456789"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def released(micro_data, tmp_path_factory):
    """The micro chain through release, every stage run with a (fake) hub token in the environment."""
    wd = tmp_path_factory.mktemp("release") / "work"
    shutil.copytree(micro_data, wd, symlinks=True)
    env = {"HF_TOKEN": FAKE_TOKEN, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    logs = []
    for stage in ("pretrain", "posttrain", "quantize", "release"):
        p = omp(stage, "--recipe", MICRO, cwd=wd, env=env)
        logs.append(p.stdout + p.stderr)
    pub = omp("publish", "artifacts/release/micro", "--repo-id", "org/micro", cwd=wd,
              env={"HF_TOKEN": FAKE_TOKEN})  # not offline: the hub is unreachable here, so a dry run
    logs.append(pub.stdout + pub.stderr)
    return wd, wd / "artifacts/release/micro", "\n".join(logs), pub


def test_release_layout_and_lineage(released):
    wd, rel, _, _ = released
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "README.md", "lineage.json", "recipe.yaml", "data/indices.npy",
              "data/blend.json", "base/model.safetensors"):
        assert (rel / f).is_file(), f
    assert any((rel / "quantized").iterdir()) and any((rel / "gguf").glob("*.gguf"))
    lin = read_json(rel / "lineage.json")
    assert lin["data"]["indices_sha256"] == sha256_file(rel / "data/indices.npy")
    # training was decontaminated against the local eval files: they ship with the release, hashed
    deco = lin["data"]["decontamination"]
    assert deco["enabled"] and "evals/data/code_mc.jsonl" in deco["files"]
    assert all(sha256_file(rel / f) == h for f, h in deco["files"].items())
    assert lin["model_sha256"] == sha256_file(rel / "model.safetensors")
    chk = {c["name"]: c for c in lin["checkpoints"]}
    assert chk["posttrain"]["parent"] == chk["pretrain"]["sha256"] == sha256_file(rel / "base/model.safetensors")
    assert chk["posttrain"]["sha256"] == lin["model_sha256"]
    assert any(c["stage"] == "quantize" and c["parent"] == lin["model_sha256"] for c in lin["checkpoints"])
    assert {m["path"] for m in lin["manifests"]} == {"tests/recipes/micro_manifest.yaml",
                                                      "tests/recipes/micro_manifest.lock.json"}
    assert lin["recipe"]["name"] == "micro" and len(lin["recipe_sha256"]) == 64
    card = (rel / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and "open-model-pipeline" in front["tags"]
    assert front["language"] == ["en"] and front["pipeline_tag"] == "text-generation"
    assert front["datasets"] == ["python-docs", "python-code", "arithmetic"]  # the manifest's sources
    assert front["base_model"] == "org/micro-base" and front["base_model_relation"] == "finetune"
    # nothing a reader cannot follow: no placeholder link, no package that is not on PyPI
    assert "https://github.com/)" not in card and "pip install open-model-pipeline" not in card
    assert "<this pipeline>" not in card
    commit = lin["code"]["commit"]  # None here: the test's work folder is not a git checkout
    assert (f"git checkout {commit}" in card) if commit else ("`code.commit` in lineage.json" in card)
    for section in ("## Training data", "## Training procedure", "## Evaluation", "## Quantization",
                    "## How to recreate"):
        assert section in card
    # transformers 4.x compatible fields beside the 5.x ones; a real context limit (not 1e6)
    assert read_json(rel / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    for d in (rel, rel / "base"):
        positions = read_json(d / "config.json")["max_position_embeddings"]
        assert read_json(d / "tokenizer_config.json")["model_max_length"] == positions < 10_000
    # a chat model stops at the end of its turn: <|im_end|> first, <|endoftext|> kept
    gen = read_json(rel / "generation_config.json")
    tok = json.loads((rel / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert gen["pad_token_id"] == ids["<|pad|>"]
    assert "chat_template" in read_json(rel / "tokenizer_config.json")


def test_release_loads_in_transformers_and_generates(released):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, rel, _, _ = released
    tok = AutoTokenizer.from_pretrained(str(rel))
    model = AutoModelForCausalLM.from_pretrained(str(rel))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # with nothing but the release's own generation_config, generation ends at <|im_end|>
    assert out[0, -1].item() == tok.convert_tokens_to_ids("<|im_end|>") and out.shape[1] - ids["input_ids"].shape[1] < 8
    base = AutoModelForCausalLM.from_pretrained(str(rel / "base"))
    assert sum(p.numel() for p in base.parameters()) == sum(p.numel() for p in model.parameters())


def test_transformers_pipeline_chat_stops_at_im_end(released):
    """What a user runs first: `pipeline("text-generation")` with chat messages, default settings."""
    from transformers import pipeline

    _, rel, _, _ = released
    chat = pipeline("text-generation", model=str(rel), device="cpu")
    out = chat([{"role": "user", "content": "What is 12 + 30?"}], max_new_tokens=40, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    # one short answer, not a turn that runs on to max_new_tokens ("10\n10\n10...")
    ids = chat.tokenizer(reply["content"], add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) < 12 and "\n" not in reply["content"].strip() and "<|im" not in reply["content"]
    assert reply["content"].strip().lstrip("-").isdigit(), reply


def test_token_never_leaks(released):
    wd, rel, logs, _ = released
    assert FAKE_TOKEN not in logs
    leaks = [p for p in wd.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_publish_without_network_is_a_dry_run(released):
    _, rel, _, pub = released
    assert pub.returncode == 0 and "dry run" in pub.stdout and "org/micro" in pub.stdout
    assert "lineage.json" in pub.stdout and "model.safetensors" in pub.stdout
    bad = omp("publish", str(rel), "--repo-id", "no-slash", cwd=rel, check=False)
    assert bad.returncode == 2 and "--repo-id" in bad.stderr


def test_recreate_refuses_a_flipped_byte_in_the_published_indices(released, tmp_path):
    _, rel, _, _ = released
    copy = tmp_path / "rel"
    shutil.copytree(rel, copy)
    data = bytearray((copy / "data/indices.npy").read_bytes())
    data[-3] ^= 0x01
    (copy / "data/indices.npy").write_bytes(bytes(data))
    p = omp("recreate", str(copy), "--workdir", str(tmp_path / "wd"), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "data/indices.npy" in p.stderr and "does not match lineage" in p.stderr
    assert not (tmp_path / "wd" / "artifacts").exists()  # refused before any work


def test_recreate_after_deleting_artifacts_matches_bitwise(released, tmp_path):
    wd, rel, _, _ = released
    published = tmp_path / "published"
    shutil.copytree(rel, published)
    hidden = tmp_path / "original-artifacts"
    os.replace(wd / "artifacts", hidden)  # nothing of the original run is reachable, only the published folder
    try:
        p = omp("recreate", str(published), "--until", "quantize", "--workdir", str(tmp_path / "again"),
                cwd=tmp_path, check=False)
    finally:
        os.replace(hidden, wd / "artifacts")
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert lines[-1].startswith("MATCH") and "bitwise" in lines[-1]
    assert "tensors bitwise equal, max abs diff 0.000e+00" in p.stdout
    # the pretrain byte ledger (carried by the lineage) equals the rebuilt run's
    ledger = next(c for c in read_json(published / "lineage.json")["checkpoints"] if c["stage"] == "pretrain")
    assert set(ledger["byte_ledger"]) == {"all_reduce/grad/payload"}
    assert f"byte ledger: equal (1 entries, {ledger['byte_ledger']['all_reduce/grad/payload']['bytes']} bytes" in p.stdout
    # every file the chain rebuilds is compared, not only tensors: config, tokenizer, GGUF, quantized, data
    files = read_json(published / "lineage.json")["files"]
    not_rebuilt = {ln.split("not rebuilt: ")[1].split(" (")[0] for ln in lines if "not rebuilt: " in ln}
    assert "README.md" in not_rebuilt and all(f.startswith("evals/") or f == "README.md" for f in not_rebuilt)
    compared = [f for f in files if f not in not_rebuilt]
    assert f"{len(compared)}/{len(compared)} rebuilt files byte-identical" in p.stdout
    for f in ("config.json", "tokenizer.json", "generation_config.json", "base/config.json", "recipe.yaml",
              "data/indices.npy", "data/blend.json"):
        assert f"{f}: bytes equal" in p.stdout, f
    assert any(f.startswith("gguf/") and f"{f}: bytes equal" in p.stdout for f in files)
    assert any(f.startswith("quantized/") and f.endswith("config.json") and f"{f}: bytes equal" in p.stdout
               for f in files)


def test_lm_eval_runs_on_the_release(released, tmp_path):
    _, rel, _, _ = released
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "lm_eval_out"
    p = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
                        f"pretrained={rel},dtype=float32", "--tasks", "omp_arith_mc",
                        "--include_path", str(REPO / "evals/tasks"), "--limit", "8", "--device", "cpu",
                        # not from the repo root: the task YAMLs find their data relative to themselves
                        "--output_path", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(f.read_text()) for f in out.rglob("results_*.json")]
    assert results and "omp_arith_mc" in results[0]["results"]


def _lm_eval_results(chat_em: float, bpb: float) -> dict:
    """lm-eval's results layout for the two tasks the comparison reads (n = 200 items)."""
    se = (chat_em * (1 - chat_em) / 199) ** 0.5
    return {"results": {"omp_arith_gen_chat": {"exact_match,none": chat_em, "exact_match_stderr,none": se},
                        "omp_ppl_arithmetic": {"bits_per_byte,none": bpb, "bits_per_byte_stderr,none": 0.02}},
            "n-samples": {"omp_arith_gen_chat": {"effective": 200}, "omp_ppl_arithmetic": {"effective": 200}}}


@pytest.mark.parametrize("post_em,post_bpb,expect", [
    (0.40, 0.92, []),                                             # better on chat, bpb within noise
    (0.28, 0.90, ["omp_arith_gen_chat"]),                         # loses on the chat task: warned
    (0.33, 0.90, ["omp_arith_gen_chat"]),                         # not better beyond noise: warned too
    (0.40, 2.40, ["omp_ppl_arithmetic"]),                         # worse beyond noise elsewhere: warned
])
def test_release_compares_the_released_variant_with_its_base(tmp_path, monkeypatch, post_em, post_bpb, expect):
    from pipeline import release

    res = tmp_path / "artifacts/evaluate/results"
    res.mkdir(parents=True)
    (res / "pretrain.json").write_text(json.dumps(_lm_eval_results(0.30, 0.91)))
    (res / "posttrain.json").write_text(json.dumps(_lm_eval_results(post_em, post_bpb)))
    monkeypatch.chdir(tmp_path)
    rows = release.versus_base("posttrain")
    by = {r["task"]: r for r in rows}
    assert by["omp_arith_gen_chat"]["n"] == 200 and by["omp_arith_gen_chat"]["base"] == 0.30
    warned = release.warnings_vs_base(rows, "posttrain")
    assert [w.split(" on ")[1].split(" ")[0] for w in warned] == expect
    table = "\n".join(release.comparison_lines(rows, "posttrain"))
    assert f"| omp_arith_gen_chat (exact_match) | 200 | 0.300 ± 0.032 | {post_em:.3f} ± " in table


# --------------------------------------------------------------------------- tampered releases (issue 17)

TAMPER_KINDS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "model.safetensors", "base/model.safetensors", "base/config.json", "quantized/*/model.safetensors",
                "quantized/*/config.json", "gguf/*.gguf", "data/indices.npy", "data/blend.json", "recipe.yaml",
                "README.md", "evals/data/*.jsonl"]


def _recreate_in_process(target: Path, wd: Path, capsys, *extra: str) -> tuple[int, str]:
    from pipeline.cli import main

    capsys.readouterr()
    code = main(["recreate", str(target), "--workdir", str(wd), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("how", ["flip", "delete"])
@pytest.mark.parametrize("kind", TAMPER_KINDS)
def test_recreate_refuses_a_tampered_release_file(released, tmp_path, capsys, kind, how):
    _, rel, _, _ = released
    copy = tmp_path / "rel"
    shutil.copytree(rel, copy)
    target = sorted(copy.glob(kind))[0]
    if how == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    code, err = _recreate_in_process(copy, tmp_path / "wd", capsys)
    name = target.relative_to(copy).as_posix()
    assert code == 2 and name in err and "Traceback" not in err, err
    assert ("does not match" if how == "flip" else "missing") in err
    assert not (tmp_path / "wd" / "artifacts").exists()  # refused before any work


@pytest.mark.parametrize("change", ["extra-file", "truncated-gguf", "zeroed-hashes", "manifest-traversal",
                                    "manifest-absolute", "allow-paths", "not-json", "no-file-list"])
def test_recreate_refuses_a_forged_lineage_or_release(released, tmp_path, capsys, change):
    _, rel, _, _ = released
    copy = tmp_path / "rel"
    shutil.copytree(rel, copy)
    lin_path = copy / "lineage.json"
    lin = read_json(lin_path)
    needle = {"extra-file": "payload.bin", "truncated-gguf": "gguf/", "zeroed-hashes": "does not match",
              "manifest-traversal": "manifests.0.path", "manifest-absolute": "manifests.0.path",
              "allow-paths": "allow_paths", "not-json": "lineage.json: line 1", "no-file-list": "lists no release files"}[change]
    if change == "extra-file":
        (copy / "data" / "payload.bin").write_bytes(b"x")
    elif change == "truncated-gguf":
        g = sorted(copy.glob("gguf/*.gguf"))[0]
        g.write_bytes(g.read_bytes()[:1000])
    elif change == "zeroed-hashes":
        text = lin_path.read_text()
        for h in set(__import__("re").findall(r"[0-9a-f]{64}", text)):
            text = text.replace(h, "0" * 64)
        lin_path.write_text(text)
    elif change in ("manifest-traversal", "manifest-absolute"):
        lin["manifests"][0]["path"] = "../../../escaped.yaml" if change == "manifest-traversal" else "/tmp/escaped.yaml"
        lin_path.write_text(json.dumps(lin))
    elif change == "allow-paths":
        lin["recipe"]["allow_paths"] = ["/"]
        lin_path.write_text(json.dumps(lin))
    elif change == "not-json":
        lin_path.write_text("{not json")
    elif change == "no-file-list":
        lin.pop("files")
        lin_path.write_text(json.dumps(lin))
    code, err = _recreate_in_process(copy, tmp_path / "wd", capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "wd" / "artifacts").exists()
    assert not (tmp_path / "escaped.yaml").exists() and not Path("/tmp/escaped.yaml").exists()


def test_recreate_names_a_byte_ledger_that_differs(tmp_path):
    from pipeline.core.io import write_json
    from pipeline.commands.recreate import compare_ledger

    pub = {"all_gather/pseudo_grad/payload": {"bytes": 100, "calls": 2},
           "all_gather/pseudo_grad/scales": {"bytes": 16, "calls": 2}}
    lineage = {"checkpoints": [{"stage": "pretrain", "byte_ledger": pub}]}
    (tmp_path / "artifacts/pretrain").mkdir(parents=True)
    write_json(tmp_path / "artifacts/pretrain/metrics.json", {"byte_ledger": pub})
    assert compare_ledger(lineage, tmp_path) == (True, ["byte ledger: equal (2 entries, 116 bytes per worker)"])
    write_json(tmp_path / "artifacts/pretrain/metrics.json", {"byte_ledger": {
        **pub, "all_gather/pseudo_grad/scales": {"bytes": 32, "calls": 2}}})
    ok, lines = compare_ledger(lineage, tmp_path)
    assert not ok and lines == ["byte ledger DIFFERS from the published one:",
                                "  all_gather/pseudo_grad/scales: published {'bytes': 16, 'calls': 2}, "
                                "rebuilt {'bytes': 32, 'calls': 2}"]


# --------------------------------------------------------------------------- the checkpoint ladder (issue 16)


def test_release_ships_the_ladder_with_its_lineage(released):
    from transformers import AutoModelForCausalLM

    _, rel, _, _ = released
    lin = read_json(rel / "lineage.json")
    lad = lin["ladder"]
    rungs = lad["rungs"]
    # micro: pretrain rungs 0, 8, 40, 80; post-training's first and last step numbered on (81, 80 + 60 + 10)
    assert [(r["step"], r["stage"], r["stage_step"]) for r in rungs] == [
        (0, "pretrain", 0), (8, "pretrain", 8), (40, "pretrain", 40), (80, "pretrain", 80),
        (81, "posttrain", 1), (150, "posttrain", 70)]
    assert sorted(p.name for p in (rel / "checkpoints").iterdir()) == [f"step-{r['step']:07d}" for r in rungs]
    assert [r["rows_consumed"] for r in rungs] == [0, 64, 320, 640, 640, 640]
    assert [r["tokens_seen"] for r in rungs] == [n * 64 for n in (0, 64, 320, 640, 640, 640)]
    assert rungs[0]["parent_sha256"] == lad["init_sha256"] == rungs[0]["sha256"]
    assert [r["parent_sha256"] for r in rungs[1:]] == [r["sha256"] for r in rungs[:-1]]
    chk = {c["name"]: c["sha256"] for c in lin["checkpoints"]}
    assert rungs[3]["sha256"] == chk["pretrain"] and rungs[-1]["sha256"] == chk["posttrain"] == lin["model_sha256"]
    for r in rungs:   # every file of every rung is hash-listed, in the rung and in `files`
        for f, h in r["files"].items():
            assert lin["files"][f"{r['path']}/{f}"] == h == sha256_file(rel / r["path"] / f)
    # rows consumed bound a rung exactly: rung 8 saw `omp batch --step 0..7`, i.e. indices rows 0:64
    import numpy as np

    idx = np.load(rel / "data/indices.npy")
    assert len(idx) >= rungs[-1]["rows_consumed"] and rungs[1]["rows_consumed"] == 8 * 8
    card = (rel / "README.md").read_text()
    assert "## Checkpoint ladder" in card and 'revision="step-' in card
    assert f"| 40 | pretrain (step 40) | 20,480 | 320 | `{rungs[2]['sha256'][:16]}` | `{rungs[1]['sha256'][:16]}` |" in card
    model = AutoModelForCausalLM.from_pretrained(str(rel / "checkpoints/step-0000040"), use_safetensors=True)
    assert model.config.num_hidden_layers == 2
    # publish (a dry run here) pushes each rung as the hub branch step-NNNNNNN
    _, _, _, pub = released
    for r in rungs:
        assert f"branch step-{r['step']:07d}" in pub.stdout


def _verify(target: Path, capsys) -> tuple[int, str]:
    from pipeline.cli import main

    capsys.readouterr()
    try:
        code = main(["verify", str(target)])
    except SystemExit as e:   # a mismatch: exit 1 (errors are exit 2, returned by main)
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def _plant(copy: Path, failure: str) -> str:
    """One failure seen in published suites, planted consistently (lineage.json rewritten to match),
    so only the ladder's own checks can catch it. Returns what `omp verify` must say."""
    lin = read_json(copy / "lineage.json")
    rungs = {r["step"]: r for r in lin["ladder"]["rungs"]}

    def put(step: int, weights: Path) -> None:
        rel = f"checkpoints/step-{step:07d}/model.safetensors"
        shutil.copyfile(weights, copy / rel)
        sha = sha256_file(copy / rel)
        lin["files"][rel] = rungs[step]["files"]["model.safetensors"] = rungs[step]["sha256"] = sha

    if failure == "identical-rungs":      # step branches 0-6300 of one suite were byte-identical
        put(40, copy / "checkpoints/step-0000008/model.safetensors")
        expect = "step-0000040: model.safetensors is identical to step-0000008's"
    elif failure == "final-weights":      # step branches serving final-era weights
        put(8, copy / "model.safetensors")
        expect = "step-0000008: model.safetensors holds the final posttrain weights"
    elif failure == "wrong-parent":       # a rung that does not descend from the one before it
        rungs[40]["parent_sha256"] = rungs[0]["sha256"]
        expect = "step-0000040: parent"
    elif failure == "other-seed":         # a ladder that starts from another seed's initialization
        from pipeline.core.config import ModelCfg
        from pipeline.commands.verify import init_sha256
        from pipeline.core.model import build_model

        cfg = read_json(copy / "config.json")
        other = build_model(ModelCfg.model_validate(lin["recipe"]["pretrain"]["model"]), cfg["vocab_size"],
                            cfg["max_position_embeddings"], {}, seed=lin["recipe"]["seed"] + 1)
        other.config.bos_token_id, other.config.eos_token_id, other.config.pad_token_id = \
            cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]
        other.save_pretrained(str(copy / "other"), safe_serialization=True)
        put(0, copy / "other/model.safetensors")
        shutil.rmtree(copy / "other")
        lin["ladder"]["init_sha256"] = rungs[0]["parent_sha256"] = rungs[8]["parent_sha256"] = rungs[0]["sha256"]
        assert init_sha256(lin["recipe"], cfg) != rungs[0]["sha256"]
        expect = "ladder.init_sha256"
    (copy / "lineage.json").write_text(json.dumps(lin))
    return expect


def test_verify_passes_the_release_and_names_a_changed_rung_file(released, tmp_path, capsys):
    _, rel, _, _ = released
    code, out = _verify(rel, capsys)
    assert code == 0 and "OK: " in out and "6 rungs" in out, out
    copy = tmp_path / "rel"
    shutil.copytree(rel, copy)
    f = copy / "checkpoints/step-0000040/config.json"
    f.write_text(f.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    (copy / "checkpoints/step-0000081/tokenizer.json").unlink()
    code, out = _verify(copy, capsys)
    assert code == 1, out
    assert "MISMATCH step-0000040: config.json: sha256" in out and "does not match lineage.json" in out
    assert "MISMATCH step-0000081: tokenizer.json: missing" in out and "FAILED: 2 mismatch(es)" in out


@pytest.mark.parametrize("failure", ["identical-rungs", "final-weights", "wrong-parent", "other-seed"])
def test_verify_names_each_planted_ladder_failure(released, tmp_path, capsys, failure):
    _, rel, _, _ = released
    copy = tmp_path / "rel"
    shutil.copytree(rel, copy)
    expect = _plant(copy, failure)
    code, out = _verify(copy, capsys)
    assert code == 1 and f"MISMATCH {expect}" in out, out
    assert "does not match lineage.json" not in out   # planted consistently: every file matches its hash


def _hub_cache(rel: Path, cache: Path, repo_id: str) -> Path:
    """The release as `omp publish` lays it out on the hub (main without checkpoints/, a branch
    step-NNNNNNN per rung with its files at the root), in huggingface_hub's cache format."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    main_files = [p for p in rel.rglob("*") if p.is_file() and not p.relative_to(rel).as_posix().startswith("checkpoints/")]

    def snapshot(ref: str, extra: Path | None) -> None:
        commit = __import__("hashlib").sha1(ref.encode()).hexdigest()
        snap = repo / "snapshots" / commit
        for p in main_files:
            (snap / p.relative_to(rel)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, snap / p.relative_to(rel))
        for p in sorted(extra.iterdir()) if extra else []:
            shutil.copyfile(p, snap / p.name)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)

    snapshot("main", None)
    for d in sorted((rel / "checkpoints").iterdir()):
        snapshot(d.name, d)
    return repo


def test_verify_a_hub_repo_reads_each_rung_from_its_branch(released, tmp_path):
    _, rel, _, _ = released
    repo = _hub_cache(rel, tmp_path / "hub", "org/micro")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    ok = omp("verify", "org/micro", cwd=tmp_path, env=env, check=False)
    assert ok.returncode == 0 and "OK: " in ok.stdout and "6 rungs" in ok.stdout, ok.stdout + ok.stderr
    # branch step-0000040 serves the final weights: named by step and file
    commit = (repo / "refs/step-0000040").read_text()
    shutil.copyfile(rel / "model.safetensors", repo / "snapshots" / commit / "model.safetensors")
    bad = omp("verify", "org/micro", cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 1 and "MISMATCH step-0000040: model.safetensors: sha256" in bad.stdout, bad.stdout


def test_recreate_one_rung_by_step_trains_only_up_to_it(released, tmp_path):
    _, rel, _, _ = released
    wd = tmp_path / "again"
    p = omp("recreate", str(rel), "--step", "8", "--workdir", str(wd), cwd=tmp_path, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1].startswith("MATCH")
    assert "checkpoints/step-0000008/model.safetensors:" in p.stdout and "20/20 tensors bitwise equal" in p.stdout
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        assert f"checkpoints/step-0000008/{f}: bytes equal" in p.stdout
    assert "not rebuilt: checkpoints/step-0000040/model.safetensors" in p.stdout
    # trained 8 steps, not 80: no final model, no checkpoint past step 8, rungs 0 and 8 only
    art = wd / "artifacts/pretrain"
    assert not (art / "final").exists() and not (art / "checkpoints/step-0000010").exists()
    assert sorted(d.name for d in (art / "checkpoints/ladder").glob("step-*")) == ["step-0000000", "step-0000008"]
    bad = omp("recreate", str(rel), "--step", "9", "--workdir", str(tmp_path / "no"), cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "--step 9: not a rung" in bad.stderr and "0, 8, 40, 80, 81, 150" in bad.stderr


def test_release_made_again_is_byte_identical_whatever_the_timings(released, tmp_path):
    """Wall-clock figures live in artifacts/timings/ only: no stage output and no release file holds
    or hashes one, so a release made again (other timings) has every file's sha256 equal."""
    wd, rel, _, _ = released
    assert (wd / "artifacts/timings/pretrain.json").is_file()
    timing_keys = {"tokens_per_s", "train_seconds", "warmup_seconds", "eval_seconds", "date", "speeds"}

    def keys(obj) -> set:
        if isinstance(obj, dict):
            return set(obj) | set().union(*(keys(v) for v in obj.values()))
        return set().union(*(keys(v) for v in obj)) if isinstance(obj, list) else set()
    for stage in ("pretrain", "posttrain", "quantize", "release"):
        for f in (wd / "artifacts" / stage).rglob("*.json"):
            if "/checkpoints/step-" not in f.as_posix():
                assert not keys(read_json(f)) & timing_keys, f
    copy = tmp_path / "work"
    shutil.copytree(wd, copy, symlinks=True)
    for f in (copy / "artifacts/timings").rglob("*.json"):
        f.write_text('{"tokens_per_s": 1.0, "train_seconds": 99999.0}\n')
    shutil.rmtree(copy / "artifacts/release")
    omp("release", "--recipe", MICRO, cwd=copy)
    again = copy / "artifacts/release/micro"
    from pipeline.core.integrity import tree_files

    files = tree_files(rel, hidden=True)
    assert "lineage.json" in files and "README.md" in files and tree_files(again, hidden=True) == files
    assert {f: sha256_file(again / f) for f in files} == {f: sha256_file(rel / f) for f in files}

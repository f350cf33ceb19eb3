"""The pretrain stage on the micro recipe: outputs, published batches, determinism, resume, bad checkpoints.

The reference run trains the whole micro order once; every other run (rerun, stopped by SIGTERM,
killed with -9, two torchrun workers, resumed from a damaged checkpoint) is compared to it bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.errors import TrainingDiverged, TrainingStopped
from pipeline.core.io import read_json, sha256_file
from tests.conftest import MICRO, omp

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WS2 = "tests/recipes/micro_ws2.yaml"


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    shutil.rmtree(dst / "artifacts/pretrain", ignore_errors=True)
    (dst / WS2).write_text("base: micro.yaml\npretrain:\n  distributed: {world_size: 2}\n")
    return dst


def final_sha(work: Path) -> str:
    return sha256_file(work / "artifacts/pretrain/final/model.safetensors")


def ckpt_steps(work: Path) -> list[int]:
    root = work / "artifacts/pretrain/checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "manifest.json").is_file())


def start_omp(work: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", **ENV}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_checkpoint(work: Path, step: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    manifest = work / f"artifacts/pretrain/checkpoints/step-{step:07d}/manifest.json"
    deadline = time.monotonic() + timeout_s
    while not manifest.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before checkpoint {step}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint {step} after {timeout_s}s")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(micro_data, tmp_path_factory) -> Path:
    work = fresh_copy(micro_data, tmp_path_factory.mktemp("pretrain_ref") / "work")
    omp("pretrain", "--recipe", MICRO, cwd=work, env=ENV)
    return work


def test_outputs_metrics_and_loss_falls(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = reference / "artifacts/pretrain"
    m = read_json(out / "metrics.json")
    assert m["steps"] == 80 and m["tokens"] == 80 * 8 * 64
    assert m["val_loss_final"] <= 0.7 * m["val_loss_initial"], m
    assert set(m["val_loss_per_source"]) == {"python-docs", "python-code", "arithmetic"}
    # steady-state speed: the first step is timed apart, evaluations and checkpoints not at all; every
    # wall-clock figure lives in artifacts/timings/, outside the stage output DVC hashes
    t = read_json(reference / "artifacts/timings/pretrain.json")
    assert t["tokens_per_s"] > 0 and m["warmup_steps"] == 1 and 0 < t["warmup_seconds"] < t["train_seconds"]
    assert not {"tokens_per_s", "train_seconds", "warmup_seconds"} & set(m)
    speeds = read_json(reference / "artifacts/timings/pretrain/step-0000080.json")
    assert [r["step"] for r in speeds] == list(range(5, 81, 5))   # every log step after the warm-up
    assert speeds == t["speeds"] and not (out / "checkpoints/step-0000080/timings.json").exists()
    # ddp baseline: one fp32 all-reduce of every gradient per step
    assert m["bytes_sent_per_worker"] == m["params"] * 4 * 80
    # keep_last 3 of checkpoints every 10 steps; each names its parent and the data it read
    assert ckpt_steps(reference) == [60, 70, 80]
    man = read_json(out / "checkpoints/step-0000080/manifest.json")
    blend = read_json(reference / "artifacts/blend/blend.json")
    assert man["lineage"]["indices_sha256"] == blend["indices_sha256"]
    assert man["lineage"]["parent"] == "step-0000070" and len(man["lineage"]["recipe_sha256"]) == 64
    assert {"model.safetensors", "state-rank0.pt"} <= set(man["files"])
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"), use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
    assert (out / "final/generation_config.json").is_file()
    assert (out / "loss_curve.png").stat().st_size > 1000
    # the ladder (micro: 0, 8, every 40, last): HF folders kept apart from the pruned checkpoints,
    # each rung's parent the one before, the first descending from the seed's initialization
    lad = read_json(out / "ladder/ladder.json")
    rungs = lad["rungs"]
    assert [r["step"] for r in rungs] == [0, 8, 40, 80]
    assert [r["rows_consumed"] for r in rungs] == [0, 64, 320, 640]      # global batch 8: omp batch rows
    assert [r["tokens_seen"] for r in rungs] == [0, 64 * 64, 320 * 64, 640 * 64]
    assert rungs[0]["sha256"] == rungs[0]["parent_sha256"] == lad["init_sha256"]
    assert [r["parent_sha256"] for r in rungs[1:]] == [r["sha256"] for r in rungs[:-1]]
    assert len({r["sha256"] for r in rungs}) == 4 and rungs[-1]["sha256"] == m["model_sha256"]
    for r in rungs:
        d = out / "ladder" / f"step-{r['step']:07d}"
        assert sha256_file(d / "model.safetensors") == r["sha256"] and (d / "tokenizer.json").is_file()
    rung8 = AutoModelForCausalLM.from_pretrained(str(out / "ladder/step-0000008"), use_safetensors=True)
    assert rung8.config.num_hidden_layers == 2
    prov = read_json(out / "provenance.json")["outputs"]   # sealed like every other output of the stage
    assert prov["ladder/step-0000040/model.safetensors"] == rungs[2]["sha256"]
    live = read_json(out / "dvclive/metrics.json")
    assert live["step"] == 80 and abs(live["val"]["loss"] - m["val_loss_final"]) < 1e-9


def test_trainer_batches_are_the_published_batches(micro_data, tmp_path, monkeypatch):
    """Global batch N that the trainer feeds the model == `omp batch --step N`."""
    from pipeline import pretrain
    from pipeline.core.config import load_recipe
    from pipeline.lowcomm import strategy

    work = fresh_copy(micro_data, tmp_path / "work")
    monkeypatch.chdir(work)
    seen = []
    shard = strategy.DDPStrategy.shard
    monkeypatch.setattr(strategy.DDPStrategy, "shard", lambda self, b: seen.append(b.copy()) or shard(self, b))
    pretrain.run(load_recipe(MICRO, overrides={"pretrain": {"steps": 3, "ladder": {"steps": []}}}))
    assert len(seen) == 3
    for step in (0, 2):
        printed = json.loads(omp("batch", "--step", str(step), "--json", cwd=work).stdout)
        assert seen[step].tolist() == printed["input_ids"]


def test_rerun_is_bitwise_identical(reference, tmp_path):
    work = fresh_copy(reference, tmp_path / "work")
    omp("pretrain", "--recipe", MICRO, cwd=work, env=ENV)
    assert final_sha(work) == final_sha(reference)
    a, b = (read_json(w / "artifacts/pretrain/checkpoints/step-0000070/manifest.json")["files"]
            for w in (work, reference))
    assert a == b  # weights, optimizer, RNG and cursor of an intermediate checkpoint too
    # every output file of the stage (metrics, dvclive, ladder rungs, plot, final), the whole folder
    # DVC hashes: timings live apart (artifacts/timings/), so a rerun is byte-identical
    from pipeline.core.integrity import tree_files

    files = tree_files(reference / "artifacts/pretrain")
    assert [f for f in files if f.startswith("ladder/step-")] and files == tree_files(work / "artifacts/pretrain")
    assert {f: sha256_file(work / "artifacts/pretrain" / f) for f in files} == \
        {f: sha256_file(reference / "artifacts/pretrain" / f) for f in files}


def test_sigterm_then_resume_is_bitwise_identical(reference, tmp_path, monkeypatch):
    from pipeline import pretrain
    from pipeline.core.config import load_recipe
    from pipeline.pretrain import engines, trainer

    work = fresh_copy(reference, tmp_path / "work")
    monkeypatch.chdir(work)
    calls = {"n": 0}
    update = engines.PlainEngine.update

    # SIGTERM arrives in the middle of step 25 (0-based 24), after this step's stop agreement:
    # the next step reads it, finishes its update, writes a checkpoint and stops
    def update_then_signal(self, step):
        calls["n"] += 1
        if calls["n"] == 25:
            os.kill(os.getpid(), signal.SIGTERM)
        return update(self, step)

    monkeypatch.setattr(engines.PlainEngine, "update", update_then_signal)
    with pytest.raises(TrainingStopped, match=r"SIGTERM after step 26 of 80.*--resume latest"):
        pretrain.run(load_recipe(MICRO))
    assert ckpt_steps(work) == [10, 20, 26]
    assert not (work / "artifacts/pretrain/final").exists()
    monkeypatch.setattr(engines.PlainEngine, "update", update)
    pretrain.run(load_recipe(MICRO), resume="latest")
    assert final_sha(work) == final_sha(reference)
    m, ref = read_json(work / "artifacts/pretrain/metrics.json"), read_json(reference / "artifacts/pretrain/metrics.json")
    assert m["val_loss_per_source"] == ref["val_loss_per_source"]
    assert m["bytes_sent_per_worker"] == ref["bytes_sent_per_worker"]
    # the rungs written before the stop and after the resume are the uninterrupted run's
    lad = "artifacts/pretrain/ladder/ladder.json"
    assert read_json(work / lad) == read_json(reference / lad) and len(read_json(work / lad)["rungs"]) == 4


def test_kill9_after_checkpoint_then_resume_is_bitwise_identical(reference, tmp_path):
    work = fresh_copy(reference, tmp_path / "work")
    proc = start_omp(work, "pretrain", "--recipe", MICRO)
    wait_for_checkpoint(work, 20, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(ckpt_steps(work)) < 80
    omp("pretrain", "--recipe", MICRO, "--resume", "latest", cwd=work, env=ENV)
    assert final_sha(work) == final_sha(reference)


def test_damaged_checkpoint_is_refused_and_latest_valid_falls_back(reference, tmp_path):
    work = fresh_copy(reference, tmp_path / "work")
    shutil.copytree(reference / "artifacts/pretrain/checkpoints", work / "artifacts/pretrain/checkpoints")
    weights = work / "artifacts/pretrain/checkpoints/step-0000080/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    p = omp("pretrain", "--recipe", MICRO, "--resume", "latest", cwd=work, env=ENV, check=False)
    assert p.returncode == 2
    assert "step-0000080/model.safetensors" in p.stderr and "truncated" in p.stderr
    p = omp("pretrain", "--recipe", MICRO, "--resume", "latest-valid", cwd=work, env=ENV)
    assert "skipping damaged checkpoint" in p.stdout and "resumed from" in p.stdout
    assert "step-0000070" in p.stdout
    assert final_sha(work) == final_sha(reference)


def test_non_finite_loss_is_caught_at_the_next_sync_point_and_names_its_step(micro_data, tmp_path, monkeypatch):
    """Losses stay on the device between sync points (log every 5, checkpoint every 10): step 13's
    NaN is read at step 15, named, and nothing after it (no checkpoint 20, no final/) is written."""
    from pipeline import pretrain
    from pipeline.core.config import load_recipe
    from pipeline.pretrain import engines, trainer

    work = fresh_copy(micro_data, tmp_path / "work")
    monkeypatch.chdir(work)
    forward_backward, seen = engines.PlainEngine.forward_backward, []

    def poisoned(self, rows):  # step 13's loss is NaN, as a diverging run's would be
        seen.append(rows)
        loss = forward_backward(self, rows)
        return loss * float("nan") if len(seen) == 14 else loss

    monkeypatch.setattr(engines.PlainEngine, "forward_backward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 13;.*step-0000010"):
        pretrain.run(load_recipe(MICRO))
    assert len(seen) == 15   # read back at the log step 15, the first sync point after it
    assert ckpt_steps(work) == [10]
    assert not (work / "artifacts/pretrain/final").exists()


DIVERGE = "base: micro.yaml\npretrain:\n  lr: 1.0e+10\n  steps: 12\n  checkpoint_every_steps: 1\n  keep_last: 2\n"


def diverge(work: Path, extra: str = "") -> subprocess.CompletedProcess:
    """A learning rate of 1e10: a real divergence (weights blow up, the forward overflows)."""
    (work / "tests/recipes/micro_nan.yaml").write_text(DIVERGE + extra)
    return omp("pretrain", "--recipe", "tests/recipes/micro_nan.yaml", cwd=work, env=ENV, check=False)


def assert_stopped_at_divergence(work: Path, p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 2, p.stderr[-3000:]
    import re
    m = re.search(r"error: non-finite loss \((nan|inf|-inf)\) at step (\d+); nothing after it was kept; "
                  r"last good checkpoint: \S*step-(\d{7})", p.stderr)
    assert m, p.stderr[-3000:]
    step = int(m.group(2))
    # every step is a checkpoint step here: the last one is the last finite step, nothing after it
    assert 0 < step < 12 and int(m.group(3)) == step and max(ckpt_steps(work)) == step
    assert not (work / "artifacts/pretrain/final").exists()


def test_real_divergence_stops_with_exit_2(micro_data, tmp_path):
    work = fresh_copy(micro_data, tmp_path / "work")
    assert_stopped_at_divergence(work, diverge(work))


def test_two_torchrun_workers_sigterm_resume_bitwise(reference, tmp_path):
    ref2 = fresh_copy(reference, tmp_path / "ref2")
    omp("pretrain", "--recipe", WS2, cwd=ref2, env=ENV)
    m2, m1 = (read_json(w / "artifacts/pretrain/metrics.json") for w in (ref2, reference))
    assert m2["world_size"] == 2 and m2["engine"] == "torchrun"
    # same data, same updates up to float summation order: the curves agree closely
    assert abs(m2["val_loss_final"] - m1["val_loss_final"]) < 0.05, (m1["val_loss_final"], m2["val_loss_final"])

    work = fresh_copy(reference, tmp_path / "work")
    proc = start_omp(work, "pretrain", "--recipe", WS2)
    wait_for_checkpoint(work, 10, proc)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "stopped by SIGTERM" in err
    stopped_at = max(ckpt_steps(work))
    assert 10 < stopped_at < 80
    man = read_json(work / f"artifacts/pretrain/checkpoints/step-{stopped_at:07d}/manifest.json")
    assert {"state-rank0.pt", "state-rank1.pt"} <= set(man["files"])
    omp("pretrain", "--recipe", WS2, "--resume", "latest", cwd=work, env=ENV)
    assert final_sha(work) == final_sha(ref2)


@pytest.mark.e2e
@pytest.mark.timeout(900)   # three DeepSpeed starts (~40 s each on an idle 2-core machine, minutes on a busy one)
def test_deepspeed_zero2_two_cpu_workers_matches_ddp_and_resumes_bitwise(reference, tmp_path):
    """ZeRO-2 over 2 gloo workers (DS_ACCELERATOR=cpu) follows the plain data-parallel curve, and
    resuming it from a checkpoint gives the same weights bit for bit.

    Same batches, same torch AdamW and schedule: the curves differ only by float summation order
    (DeepSpeed averages gradients in its own buckets), so we hold them to 2% per logged step.
    Both runs stop at 30 of the 80 published steps (`pretrain.steps`, which also sets the schedule's
    length): a DeepSpeed step on CPU costs ~20x a plain one, and 30 steps show the same agreement.
    """
    ddp = fresh_copy(reference, tmp_path / "ddp")
    (ddp / "tests/recipes/micro_30.yaml").write_text("base: micro.yaml\npretrain:\n  steps: 30\n")
    omp("pretrain", "--recipe", "tests/recipes/micro_30.yaml", cwd=ddp, env=ENV)
    work = fresh_copy(reference, tmp_path / "work")
    (work / "tests/recipes/micro_ds.yaml").write_text(
        "base: micro.yaml\npretrain:\n  steps: 30\n  distributed: {world_size: 2, engine: deepspeed, zero_stage: 2}\n")
    omp("pretrain", "--recipe", "tests/recipes/micro_ds.yaml", cwd=work, env=ENV)
    m = read_json(work / "artifacts/pretrain/metrics.json")
    assert m["engine"] == "deepspeed-zero2" and m["world_size"] == 2 and m["steps"] == 30
    ds, ref = (read_json(w / "artifacts/pretrain/history.json") for w in (work, ddp))
    ddp_loss = {r["step"]: r["loss"] for r in ref if "loss" in r}
    ds_loss = {r["step"]: r["loss"] for r in ds if "loss" in r}
    assert ds_loss.keys() == ddp_loss.keys() and len(ds_loss) == 6
    for step, loss in ddp_loss.items():
        assert abs(ds_loss[step] - loss) <= 0.02 * loss, (step, ds_loss[step], loss)
    ref_m = read_json(ddp / "artifacts/pretrain/metrics.json")
    assert abs(m["val_loss_final"] - ref_m["val_loss_final"]) < 0.05
    assert m["val_loss_final"] < m["val_loss_initial"] - 0.5
    assert ckpt_steps(work) == [10, 20, 30]
    assert (work / "artifacts/pretrain/final/model.safetensors").is_file()
    # the same loop's resume with the DeepSpeed engine: from the checkpoint at step 20, bit for bit
    final = final_sha(work)
    omp("pretrain", "--recipe", "tests/recipes/micro_ds.yaml", "--resume",
        str(work / "artifacts/pretrain/checkpoints/step-0000020"), cwd=work, env=ENV)
    assert final_sha(work) == final


@pytest.mark.e2e
@pytest.mark.slow
def test_deepspeed_real_divergence_stops_with_exit_2(micro_data, tmp_path):
    work = fresh_copy(micro_data, tmp_path / "work")
    assert_stopped_at_divergence(work, diverge(work, "  distributed: {world_size: 2, engine: deepspeed, zero_stage: 2}\n"))

"""Trust under bad input, tampering and concurrent runs (issue 17).

A table of bad inputs, each run through the real command line (`pipeline.cli.main`, in-process to
stay fast) in one copied micro workdir that holds every data stage and a short pretrain run: each
must exit 2 with one line naming the file or key at fault, and leave artifacts/ byte-identical
(a sha256 snapshot of every file, dot-files included, before and after). Then two runs at once
(ordered by a pipe, no sleeps), a kill between pretrain's outputs, and resume checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.core.io import read_json, sha256_file, sha256_tree
from tests.conftest import MICRO, REPO

SHORT = {"pretrain": {"steps": 4, "checkpoint_every_steps": 2, "eval_every_steps": 4, "log_every_steps": 2,
                      "eval_tokens": 256}}
SHORT_YAML = ("base: micro.yaml\npretrain:\n  steps: 4\n  checkpoint_every_steps: 2\n  eval_every_steps: 4\n"
              "  log_every_steps: 2\n  eval_tokens: 256\n  ladder: {steps: []}\n")


@contextlib.contextmanager
def cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def cli(wd: Path, *argv: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with cwd(wd):
        code = main(list(argv))
    out = capsys.readouterr()
    return code, out.err


@pytest.fixture(scope="module")
def wd(micro_data, tmp_path_factory) -> Path:
    """The micro data stages plus a 4-step pretrain run (checkpoints, final/, metrics, provenance)."""
    work = tmp_path_factory.mktemp("trust") / "work"
    shutil.copytree(micro_data, work, symlinks=True)
    (work / "tests/recipes/short.yaml").write_text(SHORT_YAML)
    with cwd(work):
        assert main(["pretrain", "--recipe", "tests/recipes/short.yaml"]) == 0
    return work


def snapshot(wd: Path) -> dict:
    return {p.relative_to(wd).as_posix(): sha256_file(p) for p in sorted((wd / "artifacts").rglob("*"))
            if p.is_file()}


@contextlib.contextmanager
def tampered(path: Path, how: str):
    """Change one file for the duration of a case, then put the original bytes back."""
    original = path.read_bytes()
    if how == "flip":
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(original[: len(original) // 2])
    elif how == "delete":
        path.unlink()
    elif how.startswith("append:"):
        path.write_bytes(original + how[len("append:"):].encode())
    try:
        yield
    finally:
        path.write_bytes(original)


@contextlib.contextmanager
def added(path: Path, text: str = "x"):
    path.write_text(text)
    try:
        yield
    finally:
        path.unlink()


# --------------------------------------------------------------------------- the table

R = "tests/recipes/bad.yaml"


def recipe(body: str, base: bool = True):
    """A case: this recipe (over micro.yaml unless base=False), then `omp blend` (validation fails first)."""
    return {"files": {R: ("base: micro.yaml\n" if base else "") + body}, "argv": ["blend", "--recipe", R]}


def manifest(sources: str, extra_files: dict | None = None, top: str = ""):
    """A case: a data manifest read by `omp ingest` (a recipe pointing at it, lock off)."""
    files = {"tests/recipes/bad_manifest.yaml": f"name: bad\n{top}sources:\n{sources}",
             R: "base: micro.yaml\ndata:\n  manifest: tests/recipes/bad_manifest.yaml\n  lock: false\n"}
    files.update(extra_files or {})
    return {"files": files, "argv": ["ingest", "--recipe", R]}


def local(path: str, fmt: str = "text") -> str:
    return (f"  - {{name: loc, kind: local, license: mit, weight: 1, format: {fmt}, paths: ['{path}'], "
            "filters: {min_chars: 1}}\n")


CASES = {
    # recipe types and values
    "seq_len-bool": (recipe("blend:\n  seq_len: true\n"), "blend.seq_len"),
    "layers-bool": (recipe("pretrain:\n  model: {layers: false}\n"), "pretrain.model.layers"),
    "layers-float": (recipe("pretrain:\n  model: {layers: 2.5}\n"), "pretrain.model.layers"),
    "layers-string": (recipe("pretrain:\n  model: {layers: '2'}\n"), "pretrain.model.layers"),
    "tokens-string": (recipe("blend:\n  tokens: 1e9\n"), "blend.tokens"),
    "seed-bool": (recipe("seed: true\n"), "seed"),
    "tie-string": (recipe("pretrain:\n  model: {tie_embeddings: 'yes'}\n"), "pretrain.model.tie_embeddings"),
    "lr-inf": (recipe("pretrain:\n  lr: .inf\n"), "pretrain.lr"),
    "lr-nan": (recipe("pretrain:\n  lr: .nan\n"), "pretrain.lr"),
    "lr-bool": (recipe("pretrain:\n  lr: true\n"), "pretrain.lr"),
    "lr-negative": (recipe("pretrain:\n  lr: -0.1\n"), "pretrain.lr"),
    "weight-decay-inf": (recipe("pretrain:\n  weight_decay: .inf\n"), "pretrain.weight_decay"),
    "beta-one": (recipe("pretrain:\n  betas: [0.9, 1.0]\n"), "pretrain.betas"),
    "beta-negative": (recipe("pretrain:\n  betas: [-0.1, 0.95]\n"), "pretrain.betas"),
    "beta-three": (recipe("pretrain:\n  betas: [0.9, 0.95, 0.99]\n"), "pretrain.betas"),
    "momentum-one": (recipe("pretrain:\n  distributed: {diloco: {outer_momentum: 1.0}}\n"), "outer_momentum"),
    "gptq-damp-nan": (recipe("quantize:\n  gptq_damp: .nan\n"), "quantize.gptq_damp"),
    "dpo-lr-zero": (recipe("posttrain:\n  dpo: {lr: 0}\n"), "posttrain.dpo.lr"),
    "warmup-negative": (recipe("pretrain:\n  warmup_steps: -1\n"), "pretrain.warmup_steps"),
    "keep-last-zero": (recipe("pretrain:\n  keep_last: 0\n"), "pretrain.keep_last"),
    "unknown-key": (recipe("pretrain:\n  learning_rate: 0.1\n"), "pretrain.learning_rate: unknown key"),
    "duplicate-key": (recipe("pretrain:\n  lr: 0.1\n  lr: 0.2\n"), "duplicate key 'lr'"),
    "duplicate-section": (recipe("blend: {seq_len: 32}\nblend: {seq_len: 64}\n"), "duplicate key 'blend'"),
    "not-yaml": (recipe("pretrain: [unclosed\n"), "not valid YAML"),
    "top-level-list": (recipe("- a\n- b\n", base=False), "top level must be a mapping"),
    "base-missing": (recipe("base: nowhere.yaml\n", base=False), "base"),
    "no-file": ({"files": {}, "argv": ["blend", "--recipe", "tests/recipes/none.yaml"]}, "file not found"),
    "name-traversal": (recipe("name: ../../../x\n"), "name"),
    "name-slash": (recipe("name: org/model\n"), "name"),
    "release-name-traversal": (recipe("release: {name: ../x}\n"), "release.name"),
    "release-name-slash": (recipe("release: {name: org/model}\n"), "release.name"),
    "release-name-dot": (recipe("release: {name: .hidden}\n"), "release.name"),
    "manifest-absolute": (recipe("data: {manifest: /etc/passwd}\n"), "data.manifest"),
    "manifest-parent": (recipe("data: {manifest: ../../x.yaml}\n"), "data.manifest"),
    "pretrained-dir-outside": (recipe("tokenizer: {pretrained_dir: /usr}\n"), "tokenizer.pretrained_dir"),
    "decontaminate-outside": (recipe("tokenize: {decontaminate_tasks: /etc}\n"), "tokenize.decontaminate_tasks"),
    "include-path-outside": (recipe("evaluate: {include_path: ../..}\n"), "evaluate.include_path"),
    "steps-beyond-data": ({"files": {R: "base: micro.yaml\npretrain: {steps: 81}\n"},
                           "argv": ["pretrain", "--recipe", R]}, "pretrain.steps"),
    # data manifests
    "weight-inf": (manifest("  - {name: a, kind: builtin, builtin: python-docs, license: x, weight: .inf}\n"),
                   "sources.0.weight"),
    "source-name-traversal": (manifest("  - {name: ../a, kind: builtin, builtin: python-docs, license: x, "
                                       "weight: 1}\n"), "sources.0.name"),
    "manifest-duplicate-key": (manifest("  - {name: a, name: b, kind: builtin, builtin: python-docs, "
                                        "license: x, weight: 1}\n"), "duplicate key 'name'"),
    "local-etc-passwd": (manifest(local("/etc/passwd")), "sources.loc.paths"),
    "local-parent": (manifest(local("../../../*")), "sources.loc.paths"),
    "local-symlink-out": (manifest(local("tests/recipes/link.txt"), {"tests/recipes/link.txt": "->/etc/hostname"}),
                          "sources.loc.paths"),
    "local-binary": (manifest(local("tests/recipes/bin.txt"), {"tests/recipes/bin.txt": b"abc\x00\x01def"}),
                     "bin.txt"),
    "local-not-utf8": (manifest(local("tests/recipes/latin1.txt"),
                                {"tests/recipes/latin1.txt": "caf\u00e9\n".encode("latin-1")}), "latin1.txt: line 1"),
    "jsonl-number": (manifest(local("tests/recipes/n.jsonl", "jsonl"), {"tests/recipes/n.jsonl": '{"text": 5}\n'}),
                     "n.jsonl: line 1"),
    "jsonl-list": (manifest(local("tests/recipes/l.jsonl", "jsonl"),
                            {"tests/recipes/l.jsonl": '{"text": "ok"}\n{"text": ["a"]}\n'}), "l.jsonl: line 2"),
    "jsonl-broken": (manifest(local("tests/recipes/b.jsonl", "jsonl"), {"tests/recipes/b.jsonl": '{"text": \n'}),
                     "b.jsonl: line 1"),
    "jsonl-not-object": (manifest(local("tests/recipes/o.jsonl", "jsonl"), {"tests/recipes/o.jsonl": '"text"\n'}),
                         "o.jsonl: line 1"),
    "hf-traversal-id": (manifest("  - {name: h, kind: hf, repo_id: ../../data, revision: main, license: x, "
                                 "weight: 1}\n"), "sources.h.repo_id"),
    "hf-local-outside": (manifest("  - {name: h, kind: hf, repo_id: /etc, revision: main, license: x, "
                                  "weight: 1}\n"), "sources.h.repo_id"),
    # recorded hashes, checked on read
    "flip-indices": ({"tamper": ("artifacts/blend/indices.npy", "flip"),
                      "argv": ["batch", "--step", "0"]}, "indices.npy"),
    "edit-blend-json": ({"tamper": ("artifacts/blend/blend.json", "append: "), "argv": ["batch", "--step", "0"]},
                        "blend.json"),
    "extra-file-blend": ({"add": "artifacts/blend/extra.npy", "argv": ["batch", "--step", "0"]}, "extra.npy"),
    "no-provenance-blend": ({"tamper": ("artifacts/blend/provenance.json", "delete"),
                             "argv": ["batch", "--step", "0"]}, "provenance.json"),
    "flip-train-tokens": ({"tamper": ("artifacts/tokenize/arithmetic/train.npy", "flip"),
                           "argv": ["batch", "--step", "0"]}, "train.npy"),
    "flip-val-tokens": ({"tamper": ("artifacts/tokenize/arithmetic/val.npy", "flip"),
                         "argv": ["pretrain", "--recipe", "tests/recipes/short.yaml"]}, "val.npy"),
    "truncate-val-tokens": ({"tamper": ("artifacts/tokenize/python-code/val.npy", "truncate"),
                             "argv": ["pretrain", "--recipe", "tests/recipes/short.yaml"]}, "val.npy"),
    "edit-tokenize-json": ({"tamper": ("artifacts/tokenize/tokenize.json", "append: "),
                            "argv": ["blend", "--recipe", MICRO]}, "tokenize.json"),
    "edit-ingest-shard": ({"tamper": ("artifacts/ingest/arithmetic/shard-00000.jsonl", "flip"),
                           "argv": ["tokenize", "--recipe", MICRO]}, "shard-00000.jsonl"),
    "edit-ingest-shard-tokenizer": ({"tamper": ("artifacts/ingest/python-docs/shard-00000.jsonl", "flip"),
                                     "argv": ["tokenizer", "--recipe", MICRO]}, "shard-00000.jsonl"),
    "edit-tokenizer-json": ({"tamper": ("artifacts/tokenizer/tokenizer.json", "flip"),
                             "argv": ["tokenize", "--recipe", MICRO]}, "tokenizer.json"),
    "flip-pretrain-weights": ({"tamper": ("artifacts/pretrain/final/model.safetensors", "flip"),
                               "argv": ["posttrain", "--recipe", MICRO]}, "model.safetensors"),
    "edit-pretrain-config": ({"tamper": ("artifacts/pretrain/final/config.json", "append: "),
                              "argv": ["posttrain", "--recipe", MICRO]}, "config.json"),
    "edit-pretrain-tokenizer": ({"tamper": ("artifacts/pretrain/final/tokenizer.json", "flip"),
                                 "argv": ["posttrain", "--recipe", MICRO]}, "tokenizer.json"),
    "release-from-flipped-weights": ({"tamper": ("artifacts/pretrain/final/model.safetensors", "flip"),
                                      "argv": ["release", "--recipe", "tests/recipes/pre.yaml"],
                                      "files": {"tests/recipes/pre.yaml": SHORT_YAML + "release: {variant: pretrain}\n"}},
                                     "model.safetensors"),
    "pretrained-tokenizer-garbage": ({"files": {"tests/recipes/badtok/tokenizer.json": "{garbage",
                                                R: "base: micro.yaml\ntokenizer: {pretrained_dir: tests/recipes/badtok}\n"},
                                      "argv": ["tokenizer", "--recipe", R]}, "badtok/tokenizer.json"),
    # post-training that diverges stops like pretraining, writing nothing
    "posttrain-lr-explodes": ({"files": {R: "base: micro.yaml\nposttrain: {lr: 1.0e+6, steps: 6, eval_problems: 8}\n"},
                               "argv": ["posttrain", "--recipe", R]}, "non-finite"),
    # command line
    "batch-step-out-of-range": ({"argv": ["batch", "--step", "1000000"]}, "out of range"),
    "batch-no-blend": ({"argv": ["batch", "--step", "0", "--blend-dir", "nowhere"]}, "blend.json: not found"),
    "recreate-missing": ({"argv": ["recreate", "nowhere"]}, "nowhere: not found"),
    "publish-not-release": ({"argv": ["publish", "artifacts/blend", "--repo-id", "org/x"]}, "lineage.json"),
    "resume-nonexistent": ({"argv": ["pretrain", "--recipe", "tests/recipes/short.yaml", "--resume", "nowhere"]},
                           "nowhere: not a checkpoint directory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_naming_it_and_changes_nothing(case, wd, capsys):
    spec, needle = CASES[case]
    made = []
    for rel, content in spec.get("files", {}).items():
        p = wd / rel
        if not p.parent.exists():
            p.parent.mkdir(parents=True)
            made.append(p.parent)
        if isinstance(content, str) and content.startswith("->"):
            p.symlink_to(content[2:])
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        made.append(p)
    with contextlib.ExitStack() as stack:
        if "tamper" in spec:
            stack.enter_context(tampered(wd / spec["tamper"][0], spec["tamper"][1]))
        if "add" in spec:
            stack.enter_context(added(wd / spec["add"]))
        before = snapshot(wd)
        try:
            code, err = cli(wd, *spec["argv"], capsys=capsys)
        finally:
            for p in reversed(made):
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        after = snapshot(wd)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error")]  # progress bars aside
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert after == before  # nothing changed where a later stage reads (locks and temporaries gone too)


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


def test_debug_shows_the_traceback(wd, capsys):
    (wd / R).write_text("base: micro.yaml\nblend: {seq_len: true}\n")
    try:
        with cwd(wd), pytest.raises(Exception, match="blend.seq_len"):
            main(["--debug", "blend", "--recipe", R])
    finally:
        (wd / R).unlink()


# --------------------------------------------------------------------------- concurrent runs and kills


BLOCKED_STAGE = """
import sys
import pipeline.blend as stage
real = stage.run
def gated(*a, **k):
    print("holding the lock", flush=True)   # the barrier: the test reads this line
    sys.stdin.read()                         # ...and releases us by closing stdin
    return real(*a, **k)
stage.run = gated
from pipeline.cli import main
sys.exit(main(["blend", "--recipe", "tests/recipes/micro.yaml"]))
"""


def test_two_runs_at_once_the_second_refuses_naming_the_first(wd, tmp_path, capsys):
    """Two `omp blend` in one folder (the lock is the same for every stage command, pretrain included):
    the second refuses naming the first's pid and touches nothing; the first then finishes."""
    work = tmp_path / "w"
    shutil.copytree(wd, work, symlinks=True)
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-c", BLOCKED_STAGE], cwd=work, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # ordered by pipes: the first run holds the lock from the line it prints until we close its stdin
        assert first.stdout.readline().strip() == "holding the lock", first.stderr.read()
        before = snapshot(work)
        code, err = cli(work, "blend", "--recipe", MICRO, capsys=capsys)
        assert code == 2 and f"in use by pid {first.pid}" in err and "artifacts/blend" in err
        assert snapshot(work) == before  # the refused run touched nothing
    finally:
        out, errs = first.communicate("")
    assert first.returncode == 0, errs[-2000:]
    from pipeline.core.integrity import verify_stage

    verify_stage(work / "artifacts/blend")
    lock = work / "artifacts/.blend.lock"
    assert not lock.exists()
    # a lock left by a killed process (its pid is gone) is stale and taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "command": "omp x"}))
    code, err = cli(work, "blend", "--recipe", MICRO, capsys=capsys)
    assert code == 0, err and not lock.exists()


KILL_BETWEEN_OUTPUTS = """
import os, sys
import pipeline.pretrain.outputs as outputs
real = outputs.write_json
def dying(path, obj):
    real(path, obj)
    if str(path).endswith("metrics.json"):   # final/, history and metrics written; provenance not yet
        os._exit(9)                          # as kill -9: no cleanup, no finally
outputs.write_json = dying
from pipeline.cli import main
sys.exit(main(["pretrain", "--recipe", "tests/recipes/other.yaml"]))
"""


def test_kill_between_outputs_never_mixes_two_runs(wd, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(wd, work, symlinks=True)
    pre = work / "artifacts/pretrain"
    old_model = sha256_file(pre / "final/model.safetensors")
    old_ckpts = sorted(p.name for p in (pre / "checkpoints").iterdir())
    (work / "tests/recipes/other.yaml").write_text(SHORT_YAML.replace("base: micro.yaml\n", "base: micro.yaml\nseed: 8\n"))
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", KILL_BETWEEN_OUTPUTS], cwd=work, env=env, capture_output=True, text=True)
    assert p.returncode == 9, p.stderr[-2000:]
    # the old run's outputs are whole: weights, metrics and provenance agree and verify
    from pipeline.core.integrity import verify_stage

    rec = verify_stage(pre)
    assert sha256_file(pre / "final/model.safetensors") == old_model == rec["model_sha256"]
    assert read_json(pre / "metrics.json")["model_sha256"] == old_model
    # lineage (whole recipe) and provenance (the stage's own keys) are both the old run's, not seed 8's
    assert read_json(pre / "final/lineage.json")["recipe"]["seed"] == rec["config"]["seed"] != 8
    # the killed run wrote its own checkpoints (the old ones went after its first one was written)
    new_ckpts = sorted(p.name for p in (pre / "checkpoints").iterdir())
    assert new_ckpts == old_ckpts
    assert read_json(pre / "checkpoints" / new_ckpts[-1] / "manifest.json")["lineage"]["recipe"]["seed"] == 8
    assert [p.name for p in (work / "artifacts").iterdir() if p.name.startswith(".pretrain.tmp-")]
    # the next run cleans what the kill left and commits all its outputs together
    code, err = cli(work, "pretrain", "--recipe", "tests/recipes/other.yaml", capsys=capsys)
    assert code == 0, err
    assert not [p.name for p in (work / "artifacts").iterdir() if p.name.startswith(".")]
    assert not [p for p in pre.rglob(".*")]
    rec = verify_stage(pre)
    assert read_json(pre / "metrics.json")["model_sha256"] == rec["model_sha256"] != old_model


def test_resume_refuses_another_recipe_and_records_an_override(wd, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(wd, work, symlinks=True)
    (work / "tests/recipes/lr.yaml").write_text(SHORT_YAML + "  lr: 0.001\n")
    before = snapshot(work)
    code, err = cli(work, "pretrain", "--recipe", "tests/recipes/lr.yaml", "--resume", "latest", capsys=capsys)
    assert code == 2 and "recipe_sha256" in err and "pretrain.lr" in err and "step-0000004" in err
    assert snapshot(work) == before
    # another data order (blend seed) is named too
    (work / "tests/recipes/order.yaml").write_text(SHORT_YAML + "blend: {seed: 99}\n")
    with cwd(work):
        from pipeline.core import checkpoint as ckpt
        from pipeline.core.config import load_recipe, recipe_dict, recipe_sha256

        r = load_recipe("tests/recipes/order.yaml")
        run = {"recipe_sha256": recipe_sha256(r), "indices_sha256": "0" * 64, "recipe": recipe_dict(r)}
        with pytest.raises(ckpt.CheckpointError, match=r"indices_sha256.*blend\.seed"):
            ckpt.check_resume(Path("artifacts/pretrain/checkpoints/step-0000002"), run)
    code, err = cli(work, "pretrain", "--recipe", "tests/recipes/lr.yaml", "--resume", "latest",
                    "--accept-mismatch", capsys=capsys)
    assert code == 0, err
    lin = read_json(work / "artifacts/pretrain/final/lineage.json")
    assert lin["resume_mismatch"]["recipe_keys"] == ["pretrain.lr"]
    assert lin["resume_mismatch"]["checkpoint_hashes"]["recipe_sha256"] != lin["recipe_sha256"]

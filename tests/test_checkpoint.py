"""Checkpoint directories: manifest verification, truncation/corruption refused, latest-valid, keep-last-K."""

from __future__ import annotations

import pytest

from pipeline.core import checkpoint as ckpt
from pipeline.core.errors import CheckpointError


def write(root, step, payload=b"weights"):
    tmp = ckpt.begin(root, step)
    (tmp / "model.safetensors").write_bytes(payload * 100)
    (tmp / "state-rank0.pt").write_bytes(b"state%d" % step)
    return ckpt.commit(root, step, {"parent": None})


def test_commit_writes_manifest_and_verifies(tmp_path):
    path = write(tmp_path, 10)
    assert path.name == "step-0000010"
    m = ckpt.verify(path)
    assert m["step"] == 10
    assert set(m["files"]) == {"model.safetensors", "state-rank0.pt"}
    assert m["files"]["model.safetensors"]["bytes"] == 700
    assert not list(tmp_path.glob(".step-*"))  # the temporary directory was renamed away


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    path = write(tmp_path, 5)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 690 bytes, manifest says 700"):
        ckpt.verify(path)
    f.write_bytes(b"X" * 700)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* does not match"):
        ckpt.verify(path)
    other = write(tmp_path, 6)
    (other / "state-rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="state-rank0.pt: missing"):
        ckpt.verify(other)


def test_incomplete_directory_is_not_a_checkpoint(tmp_path):
    write(tmp_path, 1)
    tmp = ckpt.begin(tmp_path, 2)            # a writer killed before commit
    (tmp / "model.safetensors").write_bytes(b"half")
    assert [s for s, _ in ckpt.list_steps(tmp_path)] == [1]
    (tmp_path / "step-0000003").mkdir()     # no manifest at all
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ckpt.latest(tmp_path)


def test_latest_valid_falls_back_to_previous_good(tmp_path):
    write(tmp_path, 10)
    bad = write(tmp_path, 20)
    (bad / "state-rank0.pt").write_bytes(b"garbage!")
    with pytest.raises(CheckpointError, match="step-0000020"):
        ckpt.resolve("latest", tmp_path)
    warnings = []
    assert ckpt.resolve("latest-valid", tmp_path, warn=warnings.append).name == "step-0000010"
    assert "step-0000020" in warnings[0]
    assert ckpt.resolve("none", tmp_path) is None


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints to resume from"):
        ckpt.resolve("latest", tmp_path)
    bad = write(tmp_path, 1)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        ckpt.resolve("latest-valid", tmp_path, warn=lambda *_: None)


def test_prune_keeps_last_k(tmp_path):
    for s in (10, 20, 30, 40):
        write(tmp_path, s)
    gone = ckpt.prune(tmp_path, 2)
    assert [p.name for p in gone] == ["step-0000010", "step-0000020"]
    assert [s for s, _ in ckpt.list_steps(tmp_path)] == [30, 40]

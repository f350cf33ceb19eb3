"""Reading the published order: what global batch N contains, from the published files alone.

Used by `omp batch` and by the trainer, so "what did step N see" has one answer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import DataIntegrityError
from pipeline.core.io import read_json
from pipeline.core.integrity import check_name, check_relpath, verify_file, verify_stage
from pipeline.core.paths import OUT


class PublishedOrder:
    """indices.npy + blend.json + the token files they name.

    `verify=True` checks the sha256 of the indices and of every token file against blend.json
    and raises DataIntegrityError naming the file that differs.
    """

    def __init__(self, blend_dir: str | Path = OUT["blend"],
                 tokenize_dir: str | Path = OUT["tokenize"], verify: bool = True):
        self.blend_dir, self.tokenize_dir = Path(blend_dir), Path(tokenize_dir)
        meta_path = self.blend_dir / "blend.json"
        if not meta_path.is_file():
            raise DataIntegrityError(f"{meta_path}: not found; run the blend stage (`dvc repro blend`)")
        self.verify = verify
        if verify:
            verify_stage(self.blend_dir)  # blend.json and indices.npy as the blend stage recorded them
        self.meta = read_json(meta_path)
        self.seq_len, self.batch_size = self.meta["seq_len"], self.meta["global_batch_size"]
        self.steps = self.meta["steps"]
        self.names = [s["name"] for s in self.meta["sources"]]
        ipath = self.blend_dir / "indices.npy"
        for n in self.names:
            check_name(n, f"{meta_path}: source name")
        paths = {n: self.tokenize_dir / check_relpath(self.meta["token_paths"][n], f"{meta_path}: token_paths.{n}")
                 for n in self.names}
        if verify:
            _check(ipath, self.meta["indices_sha256"])
            for n in self.names:
                _check(paths[n], self.meta["token_files"][n])
        self.indices = np.load(ipath, mmap_mode="r")
        self.tokens = [np.load(paths[n], mmap_mode="r") for n in self.names]

    def instance(self, i: int) -> np.ndarray:
        sid, off = (int(v) for v in self.indices[i])
        return np.asarray(self.tokens[sid][off:off + self.seq_len], dtype=np.int64)

    def batch(self, step: int) -> np.ndarray:
        """Global batch `step` as an int64 array of shape (global_batch_size, seq_len)."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} out of range: the published order has steps 0..{self.steps - 1}")
        lo = step * self.batch_size
        return np.stack([self.instance(i) for i in range(lo, lo + self.batch_size)])

    def val_tokens(self, name: str) -> np.ndarray:
        path = self.tokenize_dir / check_relpath(self.meta["val_paths"][name], f"blend.json: val_paths.{name}")
        if self.verify:
            _check(path, self.meta["val_files"][name])
        return np.load(path, mmap_mode="r")


def _check(path: Path, expected: str) -> None:
    verify_file(path, expected, "blend.json")

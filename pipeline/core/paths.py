"""Where each stage writes: one table instead of path literals in every module.

Paths are relative to the working directory a stage runs in (the repository root under `dvc repro`,
a work folder under `omp recreate`), as dvc.yaml's `outs` are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARTIFACTS = Path("artifacts")
STAGES = ("ingest", "tokenizer", "tokenize", "blend", "pretrain", "posttrain", "quantize", "evaluate", "release")
OUT: dict[str, Path] = {stage: ARTIFACTS / stage for stage in STAGES}
# wall-clock figures and machine descriptions: no DVC output covers them (DESIGN: timings apart)
TIMINGS = ARTIFACTS / "timings"


def stage_dir(stage: str, artifacts: Path = ARTIFACTS) -> Path:
    """artifacts/<stage> (under another artifacts folder when given)."""
    if stage not in OUT:
        raise KeyError(f"{stage!r} is not a stage of the chain ({', '.join(STAGES)})")
    return Path(artifacts) / stage


@dataclass
class DataDirs:
    """The data a training run reads: the published order (blend), the token files, the tokenizer."""
    blend: Path = OUT["blend"]
    tokenize: Path = OUT["tokenize"]
    tokenizer: Path = OUT["tokenizer"]


def final_dir(stage: str, artifacts: Path = ARTIFACTS) -> Path:
    """artifacts/<stage>/final: a training stage's model folder (pretrain, posttrain)."""
    return stage_dir(stage, artifacts) / "final"

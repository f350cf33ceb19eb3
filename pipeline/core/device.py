"""Where a stage runs and in what precision: `device: auto|cpu|cuda`, `precision: auto|fp32|bf16`.

auto device = CUDA when one is present, else CPU; auto precision = bf16 autocast on CUDA, fp32 on
CPU. Weights stay fp32 either way (autocast computes in bf16), so saved models are fp32 files.
The offline default on a CPU machine is therefore CPU + fp32, and bitwise reproducible.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.core.errors import RecipeError


def resolve(device: str, where: str = "<recipe>", key: str = "device") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeError(where, key, "cuda asked for, but no CUDA device is available")
    return torch.device(device)


def use_bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str):
    """bf16 autocast where `precision` asks for it; a no-op context otherwise."""
    if not use_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)

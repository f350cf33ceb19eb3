"""Round-to-nearest weight quantization, symmetric, per output channel or per group of input columns.

A weight W of shape (out, in) becomes integers q in [-2^(b-1), 2^(b-1) - 1] and float scales s:
per channel s has shape (out, 1); with group size g, s has shape (out, in // g) and column j uses
s[:, j // g]. W ≈ q * s (the dequantized weight, `dequantize`).
"""

from __future__ import annotations

import torch


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def scales_for(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale per row of `w` (…, n) so that the largest |value| maps to the top code."""
    return (w.abs().amax(dim=-1, keepdim=True) / qrange(bits)[1]).clamp(min=1e-10)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = qrange(bits)
    return torch.clamp(torch.round(w / scale), lo, hi)


def effective_group(cols: int, group_size: int) -> int:
    """The largest divisor of `cols` not above `group_size`: a layer whose width the recipe's group
    does not divide (e.g. an MLP of 688 columns with groups of 32) gets smaller groups (16), not an error."""
    return max(d for d in range(1, min(cols, group_size) + 1) if cols % d == 0)


def check_groups(w: torch.Tensor, group_size: int | None, name: str = "weight") -> None:
    if group_size is not None and w.shape[1] % group_size:
        raise ValueError(f"{name}: {w.shape[1]} input columns do not split into groups of {group_size}")


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale float32 (out, 1) or (out, in // group_size))."""
    w = w.detach().float()
    check_groups(w, group_size)
    if group_size is None:
        s = scales_for(w, bits)
        return round_to_grid(w, s, bits).to(torch.int8), s
    out, cols = w.shape
    g = w.reshape(out, cols // group_size, group_size)
    s = scales_for(g, bits)
    q = round_to_grid(g, s, bits).reshape(out, cols)
    return q.to(torch.int8), s.squeeze(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (out, in) int8 and scale (out, 1) or (out, groups) → float32 (out, in)."""
    group = q.shape[1] // scale.shape[1]
    return (q.float().reshape(q.shape[0], scale.shape[1], group) * scale.unsqueeze(-1)).reshape(q.shape)

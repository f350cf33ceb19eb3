"""Compressing a pseudo-gradient for the outer sync: block-wise fp16 / int8 / int4, optional top-k.

A flat fp32 vector `x` (numel n) becomes a `Packed` message:
  - fp16: the values as float16 (2 bytes each), no scales;
  - int8: symmetric levels -127..127, one fp32 scale (absmax / 127) per block of `block_size`;
  - int4: symmetric levels -7..7 stored as 1..15 and packed two per byte, one fp32 scale per block;
  - sign: one bit per entry (packed eight per byte) and one fp32 scale per block, the block's mean
    |x|: the scaled sign of Karimireddy et al. 2019 ("Error Feedback Fixes SignSGD"), which with
    error feedback converges like the uncompressed method. 21x smaller than fp32 at block 64;
  - top-k (optional, any kind): first keep the `topk_fraction` largest-magnitude entries; their
    int32 positions are sent too, and only the kept values are quantized.
Bytes on the wire = payload + scales (+ indices): `Packed.nbytes`, and exactly what Comm counts,
because the message is sent as those tensors.

Scales stay fp32 because pseudo-gradient entries are ~1e-4..1e-2 and an fp16 scale would lose
the small blocks to subnormals; at block 64 a scale costs 0.0625 bytes per element.

Error feedback (Karimireddy et al. 2019): what quantization dropped this time is added to the next
message, so the error does not accumulate: after T syncs the sum of what was sent differs from the
sum of the true vectors by only the last residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LEVELS = {"int8": 127, "int4": 7}


@dataclass
class Packed:
    kind: str
    numel: int                        # length of the original flat vector
    payload: torch.Tensor             # fp16 values, int8 levels, or uint8 (two int4 levels per byte)
    scales: torch.Tensor | None       # fp32, one per block (int8/int4)
    indices: torch.Tensor | None      # int32 positions of the kept entries (top-k)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.payload, self.scales, self.indices) if t is not None]

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of what is sent, in the order of tensors(): payload, scales, indices."""
        return [(n, t) for n, t in (("payload", self.payload), ("scales", self.scales),
                                    ("indices", self.indices)) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n,) -> (n_blocks, block_size), zero-padded at the end."""
    n_blocks = max(1, math.ceil(x.numel() / block_size))
    padded = torch.zeros(n_blocks * block_size, dtype=torch.float32)
    padded[:x.numel()] = x
    return padded.view(n_blocks, block_size)


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _sign_quantize(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled sign: bits (1 = non-negative) packed 8 per byte; scale = mean |x| of the real entries."""
    n = x.numel()
    b = _blocks(x, block_size)
    counts = torch.full((b.shape[0],), float(block_size))
    counts[-1] = n - (b.shape[0] - 1) * block_size          # the zero padding is not data
    scales = b.abs().sum(dim=1) / counts
    bits = (x >= 0).to(torch.uint8)
    bits = torch.cat([bits, torch.zeros((-n) % 8, dtype=torch.uint8)]).view(-1, 8)
    return (bits * _BITS).sum(dim=1, dtype=torch.uint8), scales


def _sign_dequantize(payload: torch.Tensor, scales: torch.Tensor, numel: int, block_size: int) -> torch.Tensor:
    bits = ((payload[:, None] & _BITS) != 0).reshape(-1)[:numel].float() * 2 - 1
    return bits * scales.repeat_interleave(block_size)[:numel]


def quantize_blockwise(x: torch.Tensor, kind: str, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat fp32 `x` -> (payload, scales). fp16 has no scales."""
    x = x.reshape(-1).float()
    if kind == "fp16":
        return x.half(), None
    if kind == "sign":
        return _sign_quantize(x, block_size)
    if kind not in LEVELS:
        raise ValueError(f"unknown compression kind {kind!r}: expected fp16, int8, int4 or sign")
    levels = LEVELS[kind]
    b = _blocks(x, block_size)
    scales = b.abs().amax(dim=1) / levels
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(b / safe[:, None]).clamp_(-levels, levels).reshape(-1)
    if kind == "int8":
        return q.to(torch.int8), scales
    u = (q + 8).to(torch.uint8)                  # 1..15; 0 never occurs, 8 is zero
    if u.numel() % 2:
        u = torch.cat([u, torch.full((1,), 8, dtype=torch.uint8)])
    return (u[0::2] << 4) | u[1::2], scales


def dequantize_blockwise(payload: torch.Tensor, scales: torch.Tensor | None, kind: str, numel: int,
                         block_size: int = 64) -> torch.Tensor:
    """Inverse of quantize_blockwise: flat fp32 of length `numel`."""
    if kind == "fp16":
        return payload.float()[:numel]
    if kind == "sign":
        return _sign_dequantize(payload, scales, numel, block_size)
    if kind == "int8":
        q = payload.float()
    elif kind == "int4":
        q = torch.stack([(payload >> 4) & 0xF, payload & 0xF], dim=1).reshape(-1).float() - 8
    else:
        raise ValueError(f"unknown compression kind {kind!r}")
    n_blocks = scales.numel()
    q = q[:n_blocks * block_size].view(n_blocks, block_size)
    return (q * scales[:, None]).reshape(-1)[:numel]


def topk_count(numel: int, fraction: float | None) -> int:
    return numel if fraction is None else max(1, math.ceil(numel * fraction))


def compress(x: torch.Tensor, kind: str, block_size: int = 64, topk_fraction: float | None = None) -> Packed:
    x = x.reshape(-1).float()
    indices = None
    values = x
    if topk_fraction is not None:
        k = topk_count(x.numel(), topk_fraction)
        # ties broken by position (stable sort), so every worker picks the same way on equal input
        order = torch.sort(x.abs(), descending=True, stable=True).indices[:k]
        indices = torch.sort(order).values.to(torch.int32)
        values = x[indices.long()]
    if kind == "none":
        payload, scales = values.clone(), None
    else:
        payload, scales = quantize_blockwise(values, kind, block_size)
    return Packed(kind, x.numel(), payload, scales, indices)


def decompress(p: Packed, block_size: int = 64) -> torch.Tensor:
    n_values = p.numel if p.indices is None else p.indices.numel()
    values = p.payload.float() if p.kind == "none" else dequantize_blockwise(
        p.payload, p.scales, p.kind, n_values, block_size)
    if p.indices is None:
        return values
    out = torch.zeros(p.numel, dtype=torch.float32)
    out[p.indices.long()] = values
    return out


def message_nbytes(numel: int, kind: str, block_size: int = 64, topk_fraction: float | None = None) -> int:
    """Analytic bytes of one compressed message (what `compress(...).nbytes` returns)."""
    n = topk_count(numel, topk_fraction)
    idx = 0 if topk_fraction is None else 4 * n
    if kind == "none":
        return 4 * n + idx
    if kind == "fp16":
        return 2 * n + idx
    n_blocks = max(1, math.ceil(n / block_size))
    if kind == "sign":
        return math.ceil(n / 8) + 4 * n_blocks + idx
    payload = n_blocks * block_size if kind == "int8" else math.ceil(n_blocks * block_size / 2)
    return payload + 4 * n_blocks + idx


class ErrorFeedback:
    """Keeps the residual of the last compression and adds it to the next input."""

    def __init__(self, numel: int, enabled: bool = True):
        self.enabled = enabled
        self.residual = torch.zeros(numel, dtype=torch.float32)

    def compress(self, x: torch.Tensor, kind: str, block_size: int, topk_fraction: float | None) -> tuple[Packed, torch.Tensor]:
        """Returns (message, what the message decodes to)."""
        target = x + self.residual if self.enabled else x
        packed = compress(target, kind, block_size, topk_fraction)
        sent = decompress(packed, block_size)
        if self.enabled:
            self.residual = target - sent
        return packed, sent

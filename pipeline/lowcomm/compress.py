"""Compressing a pseudo-gradient for the outer sync: block-wise fp16 / int8 / int4, optional top-k.

A flat fp32 vector `x` (numel n) becomes a `Packed` message:
  - fp16: the values as float16 (2 bytes each), no scales;
  - int8: symmetric levels -127..127, one fp32 scale (absmax / 127) per block of `block_size`;
  - int4: symmetric levels -7..7 stored as 1..15 and packed two per byte, one fp32 scale per block;
  - sign: one bit per entry (packed eight per byte) and one fp32 scale per block, the block's mean
    |x|: the scaled sign of Karimireddy et al. 2019 ("Error Feedback Fixes SignSGD"), which with
    error feedback converges like the uncompressed method. 21x smaller than fp32 at block 64;
  - int2: four levels {-3, -1, +1, +3} x scale (scale = absmax / 3 per block), packed four per
    byte: the 2-bit value quantizer of SparseLoCo (Sarfi et al. 2025, "Communication Efficient LLM
    Pre-training with SparseLoCo"). No zero level: it is meant for top-k values, which are the
    largest entries and never zero;
  - top-k (optional, any kind): first keep the `topk_fraction` largest-magnitude entries; their
    positions are sent too, and only the kept values are quantized. Positions are int32 over the
    whole vector, or, with `topk_chunk` C (<= 32768), the top ceil(C * fraction) of every chunk of
    C entries as int16 offsets inside the chunk (SparseLoCo's chunked top-k: 2 bytes per index).
    Ties are broken by position (a stable sort), so equal inputs pick the same entries everywhere
    and a compressed run replays bitwise.
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
    indices: torch.Tensor | None      # positions of the kept entries (top-k): int32, or int16 in-chunk
    chunk: int | None = None          # chunked top-k: chunk length and entries kept per chunk (both
    per_chunk: int | None = None      # known to every worker from the recipe; not sent)

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


def _int2_quantize(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..3 for levels (2c - 3) * scale, nearest level (midpoints at 0 and +-2 scale); 4 per byte."""
    n = x.numel()
    b = _blocks(x, block_size)
    scales = b.abs().amax(dim=1) / 3
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (torch.floor(b / (2 * safe[:, None])) + 2).clamp_(0, 3).to(torch.uint8).reshape(-1)[:n]
    codes = torch.cat([codes, torch.zeros((-n) % 4, dtype=torch.uint8)]).view(-1, 4)
    return (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3], scales


def _int2_dequantize(payload: torch.Tensor, scales: torch.Tensor, numel: int, block_size: int) -> torch.Tensor:
    codes = torch.stack([(payload >> s) & 3 for s in (6, 4, 2, 0)], dim=1).reshape(-1)[:numel]
    return (codes.float() * 2 - 3) * scales.repeat_interleave(block_size)[:numel]


def quantize_blockwise(x: torch.Tensor, kind: str, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat fp32 `x` -> (payload, scales). fp16 has no scales."""
    x = x.reshape(-1).float()
    if kind == "fp16":
        return x.half(), None
    if kind == "sign":
        return _sign_quantize(x, block_size)
    if kind == "int2":
        return _int2_quantize(x, block_size)
    if kind not in LEVELS:
        raise ValueError(f"unknown compression kind {kind!r}: expected fp16, int8, int4, int2 or sign")
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
    if kind == "int2":
        return _int2_dequantize(payload, scales, numel, block_size)
    if kind == "int8":
        q = payload.float()
    elif kind == "int4":
        q = torch.stack([(payload >> 4) & 0xF, payload & 0xF], dim=1).reshape(-1).float() - 8
    else:
        raise ValueError(f"unknown compression kind {kind!r}")
    n_blocks = scales.numel()
    q = q[:n_blocks * block_size].view(n_blocks, block_size)
    return (q * scales[:, None]).reshape(-1)[:numel]


MAX_TOPK_CHUNK = 32768   # in-chunk offsets are int16


def topk_count(numel: int, fraction: float | None, chunk: int | None = None) -> int:
    """How many entries top-k keeps of `numel`: ceil(numel * fraction), or per chunk ceil(chunk * fraction)
    (at most the chunk's length; the last chunk may be shorter)."""
    if fraction is None:
        return numel
    if chunk is None:
        return max(1, math.ceil(numel * fraction))
    per = max(1, math.ceil(chunk * fraction))
    full, last = divmod(numel, chunk)
    return full * min(per, chunk) + (min(per, last) if last else 0)


def _topk_positions(x: torch.Tensor, fraction: float, chunk: int | None) -> torch.Tensor:
    """Kept positions in ascending order: int32 global positions, or int16 offsets chunk by chunk."""
    a = x.abs()
    if chunk is None:
        k = topk_count(x.numel(), fraction)
        # ties broken by position (stable sort), so every worker picks the same way on equal input
        order = torch.sort(a, descending=True, stable=True).indices[:k]
        return torch.sort(order).values.to(torch.int32)
    if not 0 < chunk <= MAX_TOPK_CHUNK:
        raise ValueError(f"topk_chunk={chunk}: must be 1..{MAX_TOPK_CHUNK} (offsets are int16)")
    per = max(1, math.ceil(chunk * fraction))
    n = x.numel()
    full, last = divmod(n, chunk)
    parts = []
    if full:
        rows = a[:full * chunk].view(full, chunk)
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :min(per, chunk)]
        parts.append(torch.sort(order, dim=1).values.reshape(-1))
    if last:
        order = torch.sort(a[full * chunk:], descending=True, stable=True).indices[:min(per, last)]
        parts.append(torch.sort(order).values)
    return torch.cat(parts).to(torch.int16)


def _global_positions(indices: torch.Tensor, numel: int, chunk: int | None, per: int | None) -> torch.Tensor:
    if chunk is None:
        return indices.long()
    full, last = divmod(numel, chunk)
    starts = [torch.arange(full).repeat_interleave(min(per, chunk)) * chunk] if full else []
    if last:
        starts.append(torch.full((min(per, last),), full * chunk))
    return indices.long() + torch.cat(starts)


def compress(x: torch.Tensor, kind: str, block_size: int = 64, topk_fraction: float | None = None,
             topk_chunk: int | None = None) -> Packed:
    x = x.reshape(-1).float()
    indices, chunk, per = None, None, None
    values = x
    if topk_fraction is not None:
        indices = _topk_positions(x, topk_fraction, topk_chunk)
        if topk_chunk is not None:
            chunk, per = topk_chunk, max(1, math.ceil(topk_chunk * topk_fraction))
        values = x[_global_positions(indices, x.numel(), chunk, per)]
    if kind == "none":
        payload, scales = values.clone(), None
    else:
        payload, scales = quantize_blockwise(values, kind, block_size)
    return Packed(kind, x.numel(), payload, scales, indices, chunk, per)


def decompress(p: Packed, block_size: int = 64) -> torch.Tensor:
    n_values = p.numel if p.indices is None else p.indices.numel()
    values = p.payload.float() if p.kind == "none" else dequantize_blockwise(
        p.payload, p.scales, p.kind, n_values, block_size)
    if p.indices is None:
        return values
    out = torch.zeros(p.numel, dtype=torch.float32)
    out[_global_positions(p.indices, p.numel, p.chunk, p.per_chunk)] = values
    return out


def message_nbytes(numel: int, kind: str, block_size: int = 64, topk_fraction: float | None = None,
                   topk_chunk: int | None = None) -> int:
    """Analytic bytes of one compressed message (what `compress(...).nbytes` returns)."""
    n = topk_count(numel, topk_fraction, topk_chunk)
    idx = 0 if topk_fraction is None else (2 if topk_chunk is not None else 4) * n
    if kind == "none":
        return 4 * n + idx
    if kind == "fp16":
        return 2 * n + idx
    n_blocks = max(1, math.ceil(n / block_size))
    if kind == "sign":
        return math.ceil(n / 8) + 4 * n_blocks + idx
    if kind == "int2":
        return math.ceil(n / 4) + 4 * n_blocks + idx
    payload = n_blocks * block_size if kind == "int8" else math.ceil(n_blocks * block_size / 2)
    return payload + 4 * n_blocks + idx


class ErrorFeedback:
    """Keeps the residual of the last compression and adds it to the next input."""

    def __init__(self, numel: int, enabled: bool = True, decay: float = 1.0):
        self.enabled = enabled
        self.decay = decay       # SparseLoCo: e <- decay * e + x before compressing (1.0: plain EF)
        self.residual = torch.zeros(numel, dtype=torch.float32)

    def compress(self, x: torch.Tensor, kind: str, block_size: int, topk_fraction: float | None,
                 topk_chunk: int | None = None) -> tuple[Packed, torch.Tensor]:
        """Returns (message, what the message decodes to)."""
        if not self.enabled:
            target = x
        elif self.decay == 1.0:
            target = x + self.residual
        else:
            target = x + self.decay * self.residual
        packed = compress(target, kind, block_size, topk_fraction, topk_chunk)
        sent = decompress(packed, block_size)
        if self.enabled:
            self.residual = target - sent
        return packed, sent

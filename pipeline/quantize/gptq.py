"""GPTQ (Frantar et al. 2022): quantize one column at a time and spread its rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = 2 X^T X).

Blocks are one group wide, so each group's scale is taken from the weights as they stand after
the error of every earlier group has been folded in. Columns are taken in their natural order.
"""

from __future__ import annotations

import torch

from pipeline.quantize.rtn import check_groups, round_to_grid, scales_for


class HessianHook:
    """Accumulates X^T X of a Linear layer's inputs over every token it sees (float64)."""

    def __init__(self, module: torch.nn.Linear):
        self.h = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
        self.tokens = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.h += (x.T @ x).cpu()   # the forward may run on a GPU; the Hessian lives on the CPU
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        self.handle.remove()
        return 2 * self.h / max(1, self.tokens)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening the diagonal by `damp` × its mean."""
    h = h.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def quantize_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale float32 (out, in // group_size)) for W (out, in) with input Hessian H."""
    check_groups(w, group_size)
    w = w.detach().double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: any value works, use 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_cholesky(h, damp)
    out, cols = w.shape
    q = torch.zeros_like(w)
    scales = torch.zeros(out, cols // group_size, dtype=torch.float64)
    for g0 in range(0, cols, group_size):
        g1 = g0 + group_size
        block = w[:, g0:g1].clone()
        err = torch.zeros_like(block)
        s = scales_for(block, bits)
        scales[:, g0 // group_size] = s.squeeze(-1)
        hb = hinv[g0:g1, g0:g1]
        for i in range(group_size):
            col = block[:, i:i + 1]
            qi = round_to_grid(col, s, bits)
            q[:, g0 + i:g0 + i + 1] = qi
            e = (col - qi * s) / hb[i, i]
            block[:, i:] -= e @ hb[i:i + 1, i:]
            err[:, i:i + 1] = e
        w[:, g1:] -= err @ hinv[g0:g1, g1:]
    return q.to(torch.int8), scales.float()

"""MiLo: a 3-bit HQQ base plus a low-rank compensator fitted to the quantization residual, calibration-free.

Alternate, for `rounds` rounds: Q = quant(W - U V); E = W - deq(Q); (U, V) = rank-r randomized SVD of E with the
square root of the singular values in both factors. Inference: y = x deq(Q)^T + (x V^T) U^T. The compensator is
stored in 3 bits too, in groups of up to 64 along each factor's inner dim: asymmetric per-group min-max (our default,
fp16 scale and zero per group) or, as the paper stores them, symmetric (fp16 scale only; `compensator=symmetric`).
Rank 0 is plain HQQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from quant.base import QTensor, QuantConfigError, quantize, quantize_rtn, quantize_symmetric

COMPENSATOR_BITS = 3
COMPENSATOR_GROUP = 64
COMPENSATOR_FORMATS = ("asymmetric", "symmetric")


@dataclass
class MiLoTensor:
    base: QTensor
    u: Optional[QTensor]  # [out, rank]
    v: Optional[QTensor]  # [rank, in]
    rank: int

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        w = self.base.dequantize(torch.float32)
        if self.rank:
            w = w + self.u.dequantize() @ self.v.dequantize()
        return w.to(dtype)

    def storage_bits(self) -> float:
        out, n = self.base.shape
        bits = self.base.bits_per_weight() * out * n
        for f in (self.u, self.v):
            if f is not None:
                bits += f.bits_per_weight() * f.shape[0] * f.shape[1]
        return bits

    def bits_per_weight(self) -> float:
        out, n = self.base.shape
        return self.storage_bits() / (out * n)


def _group_for(n: int) -> int:
    g = min(COMPENSATOR_GROUP, n)
    while n % g:
        g -= 1
    return g


def _factor(x: torch.Tensor, compensator: str) -> QTensor:
    quantizer = quantize_symmetric if compensator == "symmetric" else quantize_rtn
    return quantizer(x, COMPENSATOR_BITS, _group_for(x.shape[1]))


@torch.no_grad()
def quantize_milo(w: torch.Tensor, rank: int, bits: int = 3, group_size: int = 64, rounds: int = 10,
                  base: str = "hqq", seed: int = 0, pad: bool = False, compensator: str = "asymmetric") -> MiLoTensor:
    if compensator not in COMPENSATOR_FORMATS:
        raise QuantConfigError(f"unknown compensator format {compensator!r}: use one of {list(COMPENSATOR_FORMATS)}")
    if bits != 3:
        raise QuantConfigError(f"MiLo is defined for 3-bit weights, got {bits}-bit (use rtn/hqq for others)")
    out, n = w.shape
    if rank < 0 or rank > min(out, n):
        raise QuantConfigError(f"MiLo rank {rank} must be in [0, {min(out, n)}] for a {out}x{n} weight")
    w = w.float()
    if rank == 0:
        return MiLoTensor(quantize(w, base, bits, group_size, pad), None, None, 0)
    torch.manual_seed(seed)  # svd_lowrank draws a random projection
    uv = torch.zeros_like(w)
    for _ in range(rounds):
        q = quantize(w - uv, base, bits, group_size, pad)
        residual = w - q.dequantize()
        u, s, v = torch.svd_lowrank(residual, q=min(rank + 8, min(out, n)), niter=2)
        root = s[:rank].sqrt()
        u_f, v_f = u[:, :rank] * root, (v[:, :rank] * root).T  # [out, r], [r, in]
        uv = u_f @ v_f
    uq, vq = _factor(u_f, compensator), _factor(v_f, compensator)
    # the base is refitted against the *quantized* compensator, so the stored pair is consistent
    q = quantize(w - uq.dequantize() @ vq.dequantize(), base, bits, group_size, pad)
    return MiLoTensor(q, uq, vq, rank)

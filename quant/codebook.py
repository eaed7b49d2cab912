"""Codebook (non-uniform) quantization: per output row (or per group of inputs), 16 centroids found by k-means++
then Lloyd iterations; each weight stores a 4-bit index, each codebook 16 float16 centroids.

This is the clustering half of CodeQuant (and SqueezeLLM/any4-style codebooks without rotation). Bits per weight:
4 + 16 * 16 / group (4.44 for a row of 576, 6.0 for groups of 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.base import QuantConfigError
from kernels.packing import pack, unpack

NUM_CENTROIDS = 16


@dataclass
class CodebookTensor:
    packed: torch.Tensor  # int32 [out, words] of 4-bit indices
    centroids: torch.Tensor  # float16 [out, groups, 16]
    group_size: int
    shape: tuple[int, int]

    def indices(self) -> torch.Tensor:
        return unpack(self.packed, 4, self.shape[1])

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        out, n = self.shape
        idx = self.indices().long().view(out, -1, self.group_size)
        return torch.gather(self.centroids.float(), 2, idx).reshape(out, n).to(dtype)

    def bits_per_weight(self) -> float:
        return 4 + NUM_CENTROIDS * 16 / self.group_size


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding for many 1-D problems at once: x [B, n] -> centroids [B, k]."""
    B, n = x.shape
    rows = torch.arange(B)
    c = torch.empty(B, k, dtype=x.dtype)
    c[:, 0] = x[rows, torch.randint(n, (B,), generator=gen)]
    d2 = (x - c[:, :1]).pow(2)
    for j in range(1, k):
        probs = d2 / d2.sum(1, keepdim=True).clamp_min(1e-30)
        pick = torch.multinomial(probs + 1e-12, 1, generator=gen).squeeze(1)
        c[:, j] = x[rows, pick]
        d2 = torch.minimum(d2, (x - c[:, j:j + 1]).pow(2))
    return c


@torch.no_grad()
def kmeans_1d(x: torch.Tensor, k: int = NUM_CENTROIDS, iters: int = 20, seed: int = 0):
    """Batched 1-D k-means: x [B, n] -> (centroids [B, k], assignment [B, n])."""
    gen = torch.Generator().manual_seed(seed)
    c = _kmeans_pp(x, k, gen).sort(1).values
    ones = torch.ones_like(x)
    for _ in range(iters):
        assign = _nearest(x, c)
        sums = torch.zeros_like(c).scatter_add_(1, assign, x)
        counts = torch.zeros_like(c).scatter_add_(1, assign, ones)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)  # an empty cluster keeps its centroid
        c = c.sort(1).values  # means of ordered intervals stay ordered; this only guards ties and empty clusters
    c = c.half().float()  # rounding is monotone: still sorted
    return c, _nearest(x, c)


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The nearest of the sorted centroids c [B, k] for each x [B, n]: a binary search among the midpoints, which
    is what argmin |x - c| gives (ties to the lower centroid) without the [B, n, k] distance tensor."""
    mid = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mid, x.contiguous())


def quantize_codebook(w: torch.Tensor, group_size: int | None = None, iters: int = 20, seed: int = 0) -> CodebookTensor:
    out, n = w.shape
    group = group_size or n
    if n % group:
        raise QuantConfigError(f"codebook group {group} does not divide the input dimension {n}")
    x = w.float().reshape(out * (n // group), group)
    centroids, assign = kmeans_1d(x, NUM_CENTROIDS, iters, seed)
    packed = pack(assign.reshape(out, n).to(torch.uint8), 4)
    return CodebookTensor(packed, centroids.reshape(out, n // group, NUM_CENTROIDS).half(), group, (out, n))

"""Codebook (non-uniform) quantization: per output row (or per group of inputs), 16 centroids found by k-means++
then Lloyd iterations; each weight stores a 4-bit index, each codebook 16 float16 centroids.

This is the clustering half of CodeQuant (and SqueezeLLM/any4-style codebooks without rotation). Bits per weight:
4 + 16 * 16 / group (4.44 for a row of 576, 6.0 for groups of 128).

With `importance` (one weight per input column, e.g. the column's mean squared activation on calibration text),
the k-means is weighted: a centroid is the importance-weighted mean of its members and k-means++ seeds in
proportion to importance x distance^2, so the codebook minimises sum_j importance_j (w_j - c(w_j))^2, the output
error of the row under a diagonal approximation of the inputs' second moment (SqueezeLLM's sensitivity weighting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.base import QuantConfigError
from qkernels.packing import pack, unpack

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


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator, weight: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ seeding for many 1-D problems at once: x [B, n] (points weighted by `weight` [B, n]) ->
    centroids [B, k]."""
    B, n = x.shape
    rows = torch.arange(B)
    c = torch.empty(B, k, dtype=x.dtype)
    first = torch.randint(n, (B,), generator=gen) if weight is None else torch.multinomial(
        weight / weight.sum(1, keepdim=True).clamp_min(1e-30) + 1e-12, 1, generator=gen).squeeze(1)
    c[:, 0] = x[rows, first]
    d2 = (x - c[:, :1]).pow(2)
    for j in range(1, k):
        mass = d2 if weight is None else d2 * weight
        probs = mass / mass.sum(1, keepdim=True).clamp_min(1e-30)
        pick = torch.multinomial(probs + 1e-12, 1, generator=gen).squeeze(1)
        c[:, j] = x[rows, pick]
        d2 = torch.minimum(d2, (x - c[:, j:j + 1]).pow(2))
    return c


@torch.no_grad()
def kmeans_1d(x: torch.Tensor, k: int = NUM_CENTROIDS, iters: int = 20, seed: int = 0,
              weight: torch.Tensor | None = None):
    """Batched 1-D k-means: x [B, n] -> (centroids [B, k], assignment [B, n]); `weight` [B, n] (> 0) weights the
    points (None: all 1)."""
    gen = torch.Generator().manual_seed(seed)
    if weight is not None:
        weight = weight.float().expand_as(x).contiguous()
    c = _kmeans_pp(x, k, gen, weight).sort(1).values
    mass = torch.ones_like(x) if weight is None else weight
    weighted = x if weight is None else x * weight
    for _ in range(iters):
        assign = _nearest(x, c)
        sums = torch.zeros_like(c).scatter_add_(1, assign, weighted)
        counts = torch.zeros_like(c).scatter_add_(1, assign, mass)
        c = torch.where(counts > 0, sums / counts.clamp_min(1e-30), c)  # an empty cluster keeps its centroid
        c = c.sort(1).values  # means of ordered intervals stay ordered; this only guards ties and empty clusters
    c = c.half().float()  # rounding is monotone: still sorted
    return c, _nearest(x, c)


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The nearest of the sorted centroids c [B, k] for each x [B, n]: a binary search among the midpoints, which
    is what argmin |x - c| gives (ties to the lower centroid) without the [B, n, k] distance tensor."""
    mid = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mid, x.contiguous())


def quantize_codebook(w: torch.Tensor, group_size: int | None = None, iters: int = 20, seed: int = 0,
                      importance: torch.Tensor | None = None) -> CodebookTensor:
    """Codebooks for w [out, n] per row (or per group of inputs); `importance` [n] weights the input columns."""
    out, n = w.shape
    group = group_size or n
    if n % group:
        raise QuantConfigError(f"codebook group {group} does not divide the input dimension {n}")
    x = w.float().reshape(out * (n // group), group)
    weight = None
    if importance is not None:
        if importance.shape != (n,):
            raise QuantConfigError(f"codebook importance has shape {tuple(importance.shape)}; expected ({n},)")
        imp = importance.float()
        imp = imp.clamp_min(imp.mean() * 1e-6 + 1e-30)  # a dead column still counts a little (no empty weight)
        weight = imp.view(1, n).expand(out, n).reshape(out * (n // group), group)
    centroids, assign = kmeans_1d(x, NUM_CENTROIDS, iters, seed, weight)
    packed = pack(assign.reshape(out, n).to(torch.uint8), 4)
    return CodebookTensor(packed, centroids.reshape(out, n // group, NUM_CENTROIDS).half(), group, (out, n))

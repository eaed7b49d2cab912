"""Torch references for the quantized matmuls (the ground truth the kernels are tested against).

Formats (see qkernels/packing.py for the bit layout):
- 3-bit asymmetric per-group (MiLo's base): packed [N, ceil(Kp/32)*3] int32, scale/zero [N, Kp/group] float16,
  w = (q - zero) * scale, Kp = K rounded up to whole groups;
- 4-bit codebooks (CodeQuant): packed [N, ceil(K/32)*4] int32 indices, centroids [N, K/group, 16] float16.
y = x @ W^T (+ (x @ V^T) @ U^T for a low-rank compensator).
"""

from __future__ import annotations

import torch

from qkernels.packing import unpack


def dequant_affine(packed, scale, zero, bits: int, k: int, group: int) -> torch.Tensor:
    n = packed.shape[0]
    kp = scale.shape[1] * group
    q = unpack(packed, bits, kp).float().view(n, -1, group)
    return ((q - zero.float()[..., None]) * scale.float()[..., None]).reshape(n, kp)[:, :k]


def dequant_codebook(packed, centroids, k: int) -> torch.Tensor:
    n, groups, _ = centroids.shape
    idx = unpack(packed, 4, k).long().view(n, groups, k // groups)
    return torch.gather(centroids.float(), 2, idx).reshape(n, k)


def affine_matmul(x, packed, scale, zero, bits: int, k: int, group: int, u=None, v=None) -> torch.Tensor:
    y = x.float() @ dequant_affine(packed, scale, zero, bits, k, group).T
    if u is not None:
        y = y + (x.float() @ v.float().T) @ u.float().T
    return y.to(x.dtype)


def codebook_matmul(x, packed, centroids, k: int) -> torch.Tensor:
    return (x.float() @ dequant_codebook(packed, centroids, k).T).to(x.dtype)


def grouped_affine_matmul(x_sorted, expert_offsets, packed, scale, zero, bits: int, k: int, group: int):
    """MoE form: tokens sorted by expert; expert e owns rows offsets[e]:offsets[e+1]; packed [E, N, words]."""
    out = torch.zeros(x_sorted.shape[0], packed.shape[1], dtype=torch.float32)
    for e in range(packed.shape[0]):
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        if hi > lo:
            out[lo:hi] = x_sorted[lo:hi].float() @ dequant_affine(packed[e], scale[e], zero[e], bits, k, group).T
    return out.to(x_sorted.dtype)

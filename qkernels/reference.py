"""Torch references for the quantized matmuls (the ground truth the kernels are tested against).

Formats (see qkernels/packing.py for the bit layout):
- 3-bit asymmetric per-group (MiLo's base): packed [N, ceil(Kp/32)*3] int32, scale/zero [N, Kp/group] float16,
  w = (q - zero) * scale, Kp = K rounded up to whole groups;
- 4-bit codebooks (CodeQuant): packed [N, ceil(K/32)*4] int32 indices, centroids [N, K/group, 16] float16.
y = x @ W^T (+ (x @ V^T) @ U^T for a low-rank compensator).

The AVX2 and AVX-512 paths of the CPU kernels multiply in integers: they round x to int16 per block and a codebook's
16 centroids to int16 per table (`x_as_int16`, `codebook_as_int16` give the float values they then multiply
exactly, so the kernels are tested against the reference on those to float rounding, and against exact x within
the rounding bound).
"""

from __future__ import annotations

import torch

from qkernels.packing import packed_words, unpack


X16_AFFINE_LIMIT = 32767  # the 3-bit path: x in [-32767, 32767] per group (7 * 2 * 32767 per int32 pair sum)
X16_CODEBOOK_LIMIT = 16383  # the codebook path: x in [-16383, 16383] per block, tables in [-4095, 4095]
TABLE_LIMIT = 4095


def _round_to_limit(t: torch.Tensor, limit: int) -> torch.Tensor:
    """t [..., n] rounded to integers in [-limit, limit] times max|t| / limit over the last dim (half to even, as
    the kernels' rounding); all-zero rows stay zero, rows with NaN or inf become NaN."""
    m = t.abs().amax(-1, keepdim=True)
    finite = torch.isfinite(t).all(-1, keepdim=True)
    ok = (m > 0) & finite
    lim = torch.full_like(m, limit)  # tensor / tensor: `limit / m` would run as limit * (1 / m), another rounding
    inv = torch.where(ok, lim / torch.where(ok, m, 1), 0)
    scale = torch.where(finite, torch.where(ok, m / lim, 0), float("nan"))
    return torch.round(torch.where(ok, t, 0) * inv) * scale


def x_as_int16(x: torch.Tensor, block: int, limit: int = X16_AFFINE_LIMIT) -> torch.Tensor:
    """x [R, K] as the integer paths (AVX2, AVX-512) see it: rounded to int16 per block of `block` values (zero-padded past K)."""
    r, k = x.shape
    kp = -(-k // block) * block
    xp = torch.nn.functional.pad(x.float(), (0, kp - k)).view(r, kp // block, block)
    return _round_to_limit(xp, limit).view(r, kp)[:, :k]


def codebook_x_block(group: int) -> int:
    """The block the integer codebook paths round x in (groups of a multiple of 32 take that path)."""
    return 128 if group % 128 == 0 else 64 if group % 64 == 0 else 32


def codebook_as_int16(centroids: torch.Tensor) -> torch.Tensor:
    """Centroids [..., 16] as the integer paths' tables: int16 in [-4095, 4095] times max|c| / 4095 per table."""
    return _round_to_limit(centroids.float(), TABLE_LIMIT)


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


def grouped_affine_matmul(x_sorted, expert_offsets, packed, scale, zero, bits: int, k: int, group: int, u=None,
                          v=None):
    """MoE form: tokens sorted by expert; expert e owns rows offsets[e]:offsets[e+1]; packed [E, N, words]
    (+ u [E, N, r], v [E, r, K])."""
    out = torch.zeros(x_sorted.shape[0], packed.shape[1], dtype=torch.float32, device=x_sorted.device)
    for e in range(packed.shape[0]):
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        if hi > lo:
            out[lo:hi] = affine_matmul(x_sorted[lo:hi].float(), packed[e], scale[e], zero[e], bits, k, group,
                                       None if u is None else u[e], None if v is None else v[e])
    return out.to(x_sorted.dtype)


def grouped_codebook_matmul(x_sorted, expert_offsets, packed, centroids, k: int) -> torch.Tensor:
    """MoE form of `codebook_matmul`: expert e owns rows offsets[e]:offsets[e+1]; packed [E, N, words],
    centroids [E, N, groups, 16]."""
    out = torch.zeros(x_sorted.shape[0], packed.shape[1], dtype=torch.float32, device=x_sorted.device)
    for e in range(packed.shape[0]):
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        if hi > lo:
            out[lo:hi] = codebook_matmul(x_sorted[lo:hi].float(), packed[e], centroids[e], k)
    return out.to(x_sorted.dtype)


def check_shapes(n: int, k: int, lead: tuple = (), *, bits: int = 3, group: int = 64, packed=None, scale=None,
                 zero=None, centroids=None, u=None, v=None) -> None:
    """Raises ValueError naming the first buffer whose shape does not fit an [n, k] weight of this format (a
    codebook when `centroids` is given, else `bits`-bit affine in groups of `group`; + the compensator u, v),
    stacked over `lead` dims. The kernels trust these shapes: a mis-sized buffer would be read out of bounds."""
    if centroids is not None:
        groups = centroids.shape[-2]
        if k % groups:
            raise ValueError(f"centroids has shape {list(centroids.shape)}: {groups} groups do not divide k = {k}")
        want = {"packed": (n, packed_words(k, 4)), "centroids": (n, groups, 16)}
        given = {"packed": packed, "centroids": centroids}
    else:
        groups = -(-k // group)  # a partial last group is zero-padded
        want = {"packed": (n, packed_words(groups * group, bits)), "scale": (n, groups), "zero": (n, groups)}
        given = {"packed": packed, "scale": scale, "zero": zero}
    if (u is None) != (v is None):
        raise ValueError("a compensator needs both u and v")
    if u is not None:
        want |= {"u": (n, u.shape[-1]), "v": (u.shape[-1], k)}
        given |= {"u": u, "v": v}
    for name, shape in want.items():
        shape = [*lead, *shape]
        if given[name] is None or list(given[name].shape) != shape:
            got = "missing" if given[name] is None else f"shape {list(given[name].shape)}"
            raise ValueError(f"{name} has {got}, expected {shape} for an [{n}, {k}] weight")

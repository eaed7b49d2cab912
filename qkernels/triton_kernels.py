"""Triton kernels for the quantized matmuls: y = x @ W^T with W unpacked and dequantized tile by tile.

- `affine3_matmul`: 3-bit asymmetric per-group weights (MiLo's base; 32 codes in three int32 words, a code may
  straddle two words), scale/zero per group; the low-rank compensator is fused into the epilogue (a tl.dot of
  t = x V^T with the U tile) or runs as two small matmuls after the kernel (both are benchmarked).
- `codebook4_matmul`: 4-bit indices into per-row (or per-group) 16-entry float16 codebooks (CodeQuant).
- `grouped_affine3_matmul`: the MoE form: tokens sorted by expert, every expert in one launch (program axis 2),
  rows of other experts masked; an empty expert costs its programs nothing but the launch.
Tiles: BLOCK_M >= 16 (tl.dot's minimum; decode M = 1..16 is masked), BLOCK_N x BLOCK_K tiles of W dequantized in
registers and fed to tl.dot in fp32 (the interpreter's bf16 tl.dot is wrong, so inputs are cast first).
On CPU the kernels run under TRITON_INTERPRET=1 (tests) with fixed 64 x 64 tiles; on CUDA, unless the caller pins
block_n/block_k, `triton.autotune` picks BLOCK_N, BLOCK_K, warps and stages per (M, N, K) among `TUNE_CONFIGS`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _affine3_tile(packed_ptr, scale_ptr, zero_ptr, rn, rk, N, K, words_per_row, groups_per_row,
                  GROUP: tl.constexpr):
    """Dequantized W[rn, rk] as a [BLOCK_N, BLOCK_K] fp32 tile."""
    bit = (rk % 32) * 3
    word = (rk // 32) * 3 + bit // 32
    off = (bit % 32).to(tl.uint32)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    row = packed_ptr + rn[:, None] * words_per_row
    lo = tl.load(row + word[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    straddle = (bit % 32) > 29
    hi = tl.load(row + word[None, :] + 1, mask=mask & straddle[None, :], other=0).to(tl.uint32, bitcast=True)
    val = lo >> off[None, :]
    val = tl.where(straddle[None, :], val | (hi << (32 - off)[None, :]), val) & 7
    g = rk // GROUP
    meta = rn[:, None] * groups_per_row + g[None, :]
    s = tl.load(scale_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    return (val.to(tl.float32) - z) * s


@triton.jit
def _affine3_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, t_ptr, u_ptr, M, N, K, words_per_row,
                    groups_per_row, stride_xm, stride_ym, rank, GROUP: tl.constexpr, RANK_BLOCK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        w = _affine3_tile(packed_ptr, scale_ptr, zero_ptr, rn, rk, N, K, words_per_row, groups_per_row, GROUP)
        acc += tl.dot(x, tl.trans(w))
    if RANK_BLOCK > 0:  # the fused compensator: + (x V^T) U^T, with t = x V^T [M, rank] computed beforehand
        rr = tl.arange(0, RANK_BLOCK)
        t = tl.load(t_ptr + rm[:, None] * rank + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < rank),
                    other=0.0)
        u = tl.load(u_ptr + rn[:, None] * rank + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < rank),
                    other=0.0).to(tl.float32)
        acc += tl.dot(t, tl.trans(u))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _codebook4_kernel(x_ptr, packed_ptr, cent_ptr, y_ptr, M, N, K, words_per_row, groups_per_row, stride_xm,
                      stride_ym, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        words = tl.load(packed_ptr + rn[:, None] * words_per_row + (rk // 8)[None, :], mask=mask, other=0)
        idx = (words.to(tl.uint32, bitcast=True) >> ((rk % 8) * 4).to(tl.uint32)[None, :]) & 15
        entry = (rn[:, None] * groups_per_row + (rk // GROUP)[None, :]) * 16 + idx.to(tl.int32)
        w = tl.load(cent_ptr + entry, mask=mask, other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _grouped_affine3_kernel(x_ptr, offsets_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, N, K, words_per_row,
                            groups_per_row, stride_xm, stride_ym, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    rm = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < end
    expert_packed = packed_ptr + e.to(tl.int64) * N * words_per_row
    expert_scale = scale_ptr + e.to(tl.int64) * N * groups_per_row
    expert_zero = zero_ptr + e.to(tl.int64) * N * groups_per_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if start + pid_m * BLOCK_M < end:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=row_ok[:, None] & (rk[None, :] < K),
                        other=0.0).to(tl.float32)
            w = _affine3_tile(expert_packed, expert_scale, expert_zero, rn, rk, N, K, words_per_row,
                              groups_per_row, GROUP)
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=row_ok[:, None] & (rn[None, :] < N))


# (BLOCK_N, BLOCK_K, num_warps, num_stages): narrow-N/deep-K tiles for decode GEMVs, wider ones for prefill
TUNE_CONFIGS = ((32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 4), (32, 256, 4, 2), (64, 256, 8, 2),
                (128, 64, 8, 3), (128, 128, 8, 3))


def _tuned(kernel, key):
    return triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                                    for bn, bk, w, st in TUNE_CONFIGS], key=key)(kernel)


_affine3_tuned = _tuned(_affine3_kernel, ["M", "N", "K"])
_codebook4_tuned = _tuned(_codebook4_kernel, ["M", "N", "K"])
_grouped_affine3_tuned = _tuned(_grouped_affine3_kernel, ["N", "K"])


def _autotune(x: torch.Tensor, block_n, block_k) -> bool:
    return x.is_cuda and block_n is None and block_k is None and os.environ.get("TRITON_INTERPRET") != "1"


def _launch(kernel, tuned, x, rows_grid, n: int, extra_grid: tuple, block_n, block_k, args, meta: dict):
    """Runs `kernel` with fixed tiles (interpreter, or pinned by the caller) or its autotuned twin on CUDA."""
    bm = 16 if rows_grid <= 16 else 32
    if _autotune(x, block_n, block_k):
        grid = (lambda cfg: (max(triton.cdiv(rows_grid, bm), 1), triton.cdiv(n, cfg["BLOCK_N"]), *extra_grid))
        tuned[grid](*args, **meta, BLOCK_M=bm)
    else:
        bn, bk = block_n or 64, block_k or 64
        grid = (max(triton.cdiv(rows_grid, bm), 1), triton.cdiv(n, bn), *extra_grid)
        kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


def affine3_matmul(x: torch.Tensor, packed, scale, zero, k: int, group: int, u=None, v=None,
                   block_n: int | None = None, block_k: int | None = None,
                   fuse_compensator: bool = True) -> torch.Tensor:
    """y = x @ deq(W)^T (+ (x @ V^T) @ U^T), x [M, K] -> y [M, N] in x's dtype. The compensator is added in the
    kernel's epilogue (`fuse_compensator`, t = x V^T computed first) or as two more matmuls after it."""
    x2 = x.reshape(-1, k).float().contiguous()  # fp32 into tl.dot (the interpreter's bf16 dot is wrong)
    m, n = x2.shape[0], packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.float32)
    fused = u is not None and fuse_compensator
    rank = u.shape[1] if fused else 0
    t = (x2 @ v.float().T).contiguous() if fused else y  # (y: an unused placeholder pointer)
    uu = u.contiguous() if fused else y
    _launch(_affine3_kernel, _affine3_tuned, x2, m, n, (), block_n, block_k,
            (x2, packed, scale, zero, y, t, uu, m, n, k, packed.shape[1], scale.shape[1], x2.stride(0),
             y.stride(0), rank),
            {"GROUP": group, "RANK_BLOCK": max(16, triton.next_power_of_2(rank)) if fused else 0})
    if u is not None and not fused:
        y += (x2 @ v.float().T) @ u.float().T
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def codebook4_matmul(x: torch.Tensor, packed, centroids, k: int, block_n: int | None = None,
                     block_k: int | None = None):
    x2 = x.reshape(-1, k).float().contiguous()
    m, n = x2.shape[0], packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.float32)
    _launch(_codebook4_kernel, _codebook4_tuned, x2, m, n, (), block_n, block_k,
            (x2, packed, centroids, y, m, n, k, packed.shape[1], centroids.shape[1], x2.stride(0), y.stride(0)),
            {"GROUP": k // centroids.shape[1]})
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def grouped_affine3_matmul(x_sorted, expert_offsets, packed, scale, zero, k: int, group: int,
                           max_rows_per_expert: int, block_n: int | None = None, block_k: int | None = None):
    """MoE: x_sorted [T, K] grouped by expert (offsets [E+1]), packed [E, N, words] -> y [T, N]."""
    x2 = x_sorted.float().contiguous()
    t, (e, n) = x2.shape[0], packed.shape[:2]
    y = torch.zeros(t, n, device=x2.device, dtype=torch.float32)
    _launch(_grouped_affine3_kernel, _grouped_affine3_tuned, x2, max(max_rows_per_expert, 1), n, (e,), block_n,
            block_k, (x2, expert_offsets.to(torch.int32).contiguous(), packed, scale, zero, y, n, k,
                      packed.shape[2], scale.shape[2], x2.stride(0), y.stride(0)), {"GROUP": group})
    return y.to(x_sorted.dtype)

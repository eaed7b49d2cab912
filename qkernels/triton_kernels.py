"""Triton kernels for the quantized matmuls: y = x @ W^T with W unpacked and dequantized tile by tile.

- `affine3_matmul`: 3-bit asymmetric per-group weights (MiLo's base; 32 codes in three int32 words, a code may
  straddle two words), scale/zero per group; the low-rank compensator is fused into the epilogue (a tl.dot of
  t = x V^T with the U tile, over the rank in chunks of at most MAX_RANK_BLOCK) or runs as two small matmuls
  after the kernel (both are benchmarked).
- `codebook4_matmul`: 4-bit indices into per-row (or per-group) 16-entry float16 codebooks (CodeQuant).
- `grouped_affine3_matmul`: the MoE form: tokens sorted by expert, every expert in one launch (program axis 2),
  rows of other experts masked; an empty expert costs its programs nothing but the launch. MiLo experts' own
  compensators (U_e, V_e zero-padded to one rank) are fused as in `affine3_matmul`, with t = x V_e^T from a
  second small grouped kernel (two launches in all, whatever the number of experts).
- `grouped_codebook4_matmul`: the same MoE form for 4-bit codebook experts (per-row or per-group codebooks of
  each expert, centroids [E, N, groups, 16]): one launch, whatever the number of experts.
Tiles: BLOCK_M >= 16 (tl.dot's minimum; decode M = 1..16 is masked), BLOCK_N x BLOCK_K tiles of W dequantized in
registers and fed to tl.dot as fp32 (the interpreter's bf16 tl.dot is wrong, so inputs are cast first).
Precision: on CUDA, tl.dot of fp32 inputs runs on tensor cores in TF32 (10-bit mantissa; Triton's default
input_precision), accumulating in fp32: results differ from an fp32 matmul by TF32 rounding, not bit for bit
(a CPU emulation stays within the gpu tests' 2e-3 relative tolerance; unmeasured on a GPU so far).
The interpreter computes in true fp32. Row offsets are 64-bit (rows x N passes 2^31 at Mixtral's N = 28672).
On CPU the kernels run under TRITON_INTERPRET=1 (tests) with fixed 64 x 64 tiles; on CUDA, unless the caller pins
block_n/block_k, `triton.autotune` picks BLOCK_N, BLOCK_K, warps and stages among `TUNE_CONFIGS` per
(M_BUCKET, N, K, RANK_BLOCK): M_BUCKET is M rounded up to a power of two (at most 128), so that per-expert row
counts, which change every step, do not re-tune at every new M.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qkernels.reference import check_shapes


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
def _compensate(acc, t_ptr, u_ptr, rm, rn, row_ok, N, rank, RANK_BLOCK: tl.constexpr):
    """acc + t[rm] U[rn]^T, t = x V^T [rows, rank] computed beforehand; the rank in chunks of RANK_BLOCK."""
    for r0 in range(0, rank, RANK_BLOCK):
        rr = r0 + tl.arange(0, RANK_BLOCK)
        t = tl.load(t_ptr + rm[:, None] * rank + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < rank),
                    other=0.0)
        u = tl.load(u_ptr + rn[:, None] * rank + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < rank),
                    other=0.0).to(tl.float32)
        acc += tl.dot(t, tl.trans(u))
    return acc


@triton.jit(do_not_specialize=["M_BUCKET"])
def _affine3_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, t_ptr, u_ptr, M, N, K, words_per_row,
                    groups_per_row, stride_xm, stride_ym, rank, M_BUCKET, GROUP: tl.constexpr,
                    RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # M_BUCKET is unused here: it is the autotuner's key for M
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        w = _affine3_tile(packed_ptr, scale_ptr, zero_ptr, rn, rk, N, K, words_per_row, groups_per_row, GROUP)
        acc += tl.dot(x, tl.trans(w))
    if RANK_BLOCK > 0:  # the fused compensator: + (x V^T) U^T
        acc = _compensate(acc, t_ptr, u_ptr, rm, rn, rm < M, N, rank, RANK_BLOCK)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _codebook4_tile(packed_ptr, cent_ptr, rn, rk, N, K, words_per_row, groups_per_row, GROUP: tl.constexpr):
    """Dequantized W[rn, rk] as a [BLOCK_N, BLOCK_K] fp32 tile: 4-bit indices into 16-entry codebooks."""
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    words = tl.load(packed_ptr + rn[:, None] * words_per_row + (rk // 8)[None, :], mask=mask, other=0)
    idx = (words.to(tl.uint32, bitcast=True) >> ((rk % 8) * 4).to(tl.uint32)[None, :]) & 15
    entry = (rn[:, None] * groups_per_row + (rk // GROUP)[None, :]) * 16 + idx.to(tl.int32)
    return tl.load(cent_ptr + entry, mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _codebook4_kernel(x_ptr, packed_ptr, cent_ptr, y_ptr, M, N, K, words_per_row, groups_per_row, stride_xm,
                      stride_ym, M_BUCKET, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        w = _codebook4_tile(packed_ptr, cent_ptr, rn, rk, N, K, words_per_row, groups_per_row, GROUP)
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _expert_rows(offsets_ptr, e, pid_m, BLOCK_M: tl.constexpr):
    """Grouped kernels: the (64-bit) sorted rows of expert e that program pid_m covers, which of them are the
    expert's, and whether any is (an empty expert's programs do nothing)."""
    start = tl.load(offsets_ptr + e).to(tl.int64)
    end = tl.load(offsets_ptr + e + 1).to(tl.int64)
    rm = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return rm, rm < end, start + pid_m * BLOCK_M < end


@triton.jit
def _rows_tile(x_ptr, rm, row_ok, rk, K, stride_xm):
    """Grouped kernels: the [BLOCK_M, BLOCK_K] fp32 tile of x at rows rm (those of the expert: row_ok), columns rk."""
    return tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=row_ok[:, None] & (rk[None, :] < K),
                   other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _grouped_affine3_kernel(x_ptr, offsets_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, t_ptr, u_ptr, N, K,
                            words_per_row, groups_per_row, stride_xm, stride_ym, rank, M_BUCKET,
                            GROUP: tl.constexpr, RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm, row_ok, busy = _expert_rows(offsets_ptr, e, pid_m, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e64 = e.to(tl.int64)
    expert_packed = packed_ptr + e64 * N * words_per_row
    expert_scale = scale_ptr + e64 * N * groups_per_row
    expert_zero = zero_ptr + e64 * N * groups_per_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if busy:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = _rows_tile(x_ptr, rm, row_ok, rk, K, stride_xm)
            w = _affine3_tile(expert_packed, expert_scale, expert_zero, rn, rk, N, K, words_per_row,
                              groups_per_row, GROUP)
            acc += tl.dot(x, tl.trans(w))
        if RANK_BLOCK > 0:  # expert e's compensator (padded ranks are zeros and add nothing)
            acc = _compensate(acc, t_ptr, u_ptr + e64 * N * rank, rm, rn, row_ok, N, rank, RANK_BLOCK)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=row_ok[:, None] & (rn[None, :] < N))


@triton.jit(do_not_specialize=["M_BUCKET"])
def _grouped_codebook4_kernel(x_ptr, offsets_ptr, packed_ptr, cent_ptr, y_ptr, N, K, words_per_row,
                              groups_per_row, stride_xm, stride_ym, M_BUCKET, GROUP: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm, row_ok, busy = _expert_rows(offsets_ptr, e, pid_m, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e64 = e.to(tl.int64)
    expert_packed = packed_ptr + e64 * N * words_per_row
    expert_cent = cent_ptr + e64 * N * groups_per_row * 16
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if busy:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = _rows_tile(x_ptr, rm, row_ok, rk, K, stride_xm)
            w = _codebook4_tile(expert_packed, expert_cent, rn, rk, N, K, words_per_row, groups_per_row, GROUP)
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=row_ok[:, None] & (rn[None, :] < N))


@triton.jit
def _grouped_lowrank_kernel(x_ptr, offsets_ptr, v_ptr, t_ptr, K, rank, stride_xm, BLOCK_M: tl.constexpr,
                            RANK_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """t[rows of expert e] = x V_e^T, v [E, rank, K]: the compensator's first factor, once per row (in the main
    kernel every N tile would recompute it, re-reading V_e)."""
    pid_m, pid_r, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm, row_ok, busy = _expert_rows(offsets_ptr, e, pid_m, BLOCK_M)
    rr = pid_r * RANK_BLOCK + tl.arange(0, RANK_BLOCK)
    expert_v = v_ptr + e.to(tl.int64) * rank * K
    t = tl.zeros((BLOCK_M, RANK_BLOCK), dtype=tl.float32)
    if busy:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = _rows_tile(x_ptr, rm, row_ok, rk, K, stride_xm)
            v = tl.load(expert_v + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < rank) & (rk[None, :] < K),
                        other=0.0).to(tl.float32)
            t += tl.dot(x, tl.trans(v))
        tl.store(t_ptr + rm[:, None] * rank + rr[None, :], t, mask=row_ok[:, None] & (rr[None, :] < rank))


# (BLOCK_N, BLOCK_K, num_warps, num_stages): narrow-N/deep-K tiles for decode GEMVs, wider ones for prefill
TUNE_CONFIGS = ((32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 4), (32, 256, 4, 2), (64, 256, 8, 2),
                (128, 64, 8, 3), (128, 128, 8, 3))
# the compensator's rank runs in chunks of at most this: a U tile of BLOCK_N x 64 fp32 fits beside the W tile
# in every config, whatever the rank (one RANK_BLOCK = next_power_of_2(rank) would not at rank 512)
MAX_RANK_BLOCK = 64
M_BUCKET_CAP = 128


def _tuned(kernel, key):
    return triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                                    for bn, bk, w, st in TUNE_CONFIGS], key=key)(kernel)


_affine3_tuned = _tuned(_affine3_kernel, ["M_BUCKET", "N", "K", "RANK_BLOCK"])
_codebook4_tuned = _tuned(_codebook4_kernel, ["M_BUCKET", "N", "K"])
_grouped_affine3_tuned = _tuned(_grouped_affine3_kernel, ["M_BUCKET", "N", "K", "RANK_BLOCK"])
_grouped_codebook4_tuned = _tuned(_grouped_codebook4_kernel, ["M_BUCKET", "N", "K"])


def m_bucket(rows: int) -> int:
    """The autotuner's M: rows rounded up to a power of two, capped (big-M tiles tune alike)."""
    return min(triton.next_power_of_2(max(rows, 1)), M_BUCKET_CAP)


def rank_block(rank: int) -> int:
    """0 without a compensator; else a power of two >= 16 (tl.dot's minimum), at most MAX_RANK_BLOCK."""
    return 0 if rank == 0 else min(max(16, triton.next_power_of_2(rank)), MAX_RANK_BLOCK)


def _block_m(rows: int) -> int:
    return 16 if rows <= 16 else 32  # a function of m_bucket(rows), so the tuned key covers it


def _autotune(x: torch.Tensor, block_n, block_k) -> bool:
    return x.is_cuda and block_n is None and block_k is None and os.environ.get("TRITON_INTERPRET") != "1"


def _launch(kernel, tuned, x, rows_grid, n: int, extra_grid: tuple, block_n, block_k, args, meta: dict):
    """Runs `kernel` with fixed tiles (interpreter, or pinned by the caller) or its autotuned twin on CUDA."""
    bm = _block_m(rows_grid)
    meta = {**meta, "M_BUCKET": m_bucket(rows_grid), "BLOCK_M": bm}
    if _autotune(x, block_n, block_k):
        grid = (lambda cfg: (max(triton.cdiv(rows_grid, bm), 1), triton.cdiv(n, cfg["BLOCK_N"]), *extra_grid))
        tuned[grid](*args, **meta)
    else:
        bn, bk = block_n or 64, block_k or 64
        grid = (max(triton.cdiv(rows_grid, bm), 1), triton.cdiv(n, bn), *extra_grid)
        kernel[grid](*args, **meta, BLOCK_N=bn, BLOCK_K=bk)


def _check_x(x: torch.Tensor, k: int, *weights) -> None:
    """x [..., k]; and no gradient asked of a kernel that has none (it would silently miss the kernel's term)."""
    if x.shape[-1] != k:
        raise ValueError(f"x has shape {list(x.shape)}, expected [..., {k}] (the weight's in-features)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights)):
        raise RuntimeError("the Triton kernels have no backward: call them under torch.no_grad(), or use "
                           "qkernels.modules, which runs the torch reference when a gradient is needed")


def affine3_matmul(x: torch.Tensor, packed, scale, zero, k: int, group: int, u=None, v=None,
                   block_n: int | None = None, block_k: int | None = None,
                   fuse_compensator: bool = True) -> torch.Tensor:
    """y = x @ deq(W)^T (+ (x @ V^T) @ U^T), x [M, K] -> y [M, N] in x's dtype. The compensator is added in the
    kernel's epilogue (`fuse_compensator`, t = x V^T computed first) or as two more matmuls after it."""
    _check_x(x, k, u, v)
    check_shapes(packed.shape[0], k, bits=3, group=group, packed=packed, scale=scale, zero=zero, u=u, v=v)
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
            {"GROUP": group, "RANK_BLOCK": rank_block(rank)})
    if u is not None and not fused:
        y += (x2 @ v.float().T) @ u.float().T
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def codebook4_matmul(x: torch.Tensor, packed, centroids, k: int, block_n: int | None = None,
                     block_k: int | None = None):
    _check_x(x, k)
    check_shapes(packed.shape[0], k, packed=packed, centroids=centroids)
    x2 = x.reshape(-1, k).float().contiguous()
    m, n = x2.shape[0], packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.float32)
    _launch(_codebook4_kernel, _codebook4_tuned, x2, m, n, (), block_n, block_k,
            (x2, packed, centroids, y, m, n, k, packed.shape[1], centroids.shape[1], x2.stride(0), y.stride(0)),
            {"GROUP": k // centroids.shape[1]})
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _grouped_inputs(x_sorted, expert_offsets, num_experts: int, n: int, max_rows_per_expert: int | None):
    """(x as contiguous fp32, int32 offsets on x's device, rows per expert for the grid, a zeroed fp32 y [T, n]) of a
    grouped call. Offsets must have one entry per expert plus one, from 0 to T, non-decreasing. The grid covers
    `max_rows_per_expert` rows of each expert: it is checked against the offsets (rows past it would be left zero)
    and taken from them when None. Offsets on the GPU cost one copy to the host; pass them on the CPU."""
    if tuple(expert_offsets.shape) != (num_experts + 1,):
        raise ValueError(f"expert_offsets has shape {list(expert_offsets.shape)}, expected [{num_experts + 1}]")
    off = expert_offsets.tolist()
    counts = [b - a for a, b in zip(off, off[1:])]
    if off[0] != 0 or off[-1] != x_sorted.shape[0] or min(counts, default=0) < 0:
        raise ValueError(f"expert_offsets {off} must rise from 0 to the {x_sorted.shape[0]} rows of x_sorted")
    most = max(counts, default=0)
    if max_rows_per_expert is None:
        max_rows_per_expert = most
    elif max_rows_per_expert < most:
        raise ValueError(f"max_rows_per_expert={max_rows_per_expert} is below the {most} rows of the largest expert "
                         "in expert_offsets: its other rows would stay zero")
    x2 = x_sorted.float().contiguous()
    y = torch.zeros(x2.shape[0], n, device=x2.device, dtype=torch.float32)
    return x2, expert_offsets.to(x2.device, torch.int32).contiguous(), max(max_rows_per_expert, 1), y


def grouped_affine3_matmul(x_sorted, expert_offsets, packed, scale, zero, k: int, group: int,
                           max_rows_per_expert: int | None = None, u=None, v=None, block_n: int | None = None,
                           block_k: int | None = None):
    """MoE: x_sorted [T, K] grouped by expert (offsets [E+1]), packed [E, N, words] (+ a compensator per expert,
    u [E, N, r], v [E, r, K], zero-padded to one rank r) -> y [T, N]."""
    _check_x(x_sorted, k, u, v)
    e, n = packed.shape[:2]
    check_shapes(n, k, (e,), bits=3, group=group, packed=packed, scale=scale, zero=zero, u=u, v=v)
    x2, offsets, rows, y = _grouped_inputs(x_sorted, expert_offsets, e, n, max_rows_per_expert)
    rank = 0 if u is None else u.shape[2]
    t, uu = y, y  # (unused placeholder pointers without a compensator)
    if rank:
        t = torch.empty(x2.shape[0], rank, device=x2.device, dtype=torch.float32)
        bm, rb = _block_m(rows), rank_block(rank)
        _grouped_lowrank_kernel[(triton.cdiv(rows, bm), triton.cdiv(rank, rb), e)](
            x2, offsets, v.contiguous(), t, k, rank, x2.stride(0), BLOCK_M=bm, RANK_BLOCK=rb, BLOCK_K=64)
        uu = u.contiguous()
    _launch(_grouped_affine3_kernel, _grouped_affine3_tuned, x2, rows, n, (e,), block_n, block_k,
            (x2, offsets, packed, scale, zero, y, t, uu, n, k, packed.shape[2], scale.shape[2], x2.stride(0),
             y.stride(0), rank),
            {"GROUP": group, "RANK_BLOCK": rank_block(rank)})
    return y.to(x_sorted.dtype)


def grouped_codebook4_matmul(x_sorted, expert_offsets, packed, centroids, k: int,
                             max_rows_per_expert: int | None = None,
                             block_n: int | None = None, block_k: int | None = None):
    """MoE: x_sorted [T, K] grouped by expert (offsets [E+1]), packed [E, N, words] 4-bit indices, centroids
    [E, N, groups, 16] (per row: groups = 1) -> y [T, N], every expert in one launch."""
    _check_x(x_sorted, k)
    e, n = packed.shape[:2]
    check_shapes(n, k, (e,), packed=packed, centroids=centroids)
    x2, offsets, rows, y = _grouped_inputs(x_sorted, expert_offsets, e, n, max_rows_per_expert)
    groups = centroids.shape[2]
    _launch(_grouped_codebook4_kernel, _grouped_codebook4_tuned, x2, rows, n, (e,), block_n, block_k,
            (x2, offsets, packed.contiguous(), centroids.contiguous(), y, n, k, packed.shape[2], groups,
             x2.stride(0), y.stride(0)),
            {"GROUP": k // groups})
    return y.to(x_sorted.dtype)

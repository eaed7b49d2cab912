"""Dense bit packing: 32 values of b bits fill exactly b 32-bit words (b = 2, 3, 4, 8), no wasted bits.

Layout (little-endian bitstream): in each block of 32 values along the last dim, value i occupies bits
[i*b, (i+1)*b) of the block's 32*b-bit stream, which is stored as b int32 words (word w holds stream bits
[32w, 32w + 32)). For b = 3 a value may straddle two words (values 10 and 21). The last dim is padded with zeros
to a multiple of 32. The Triton and CPU kernels read this layout directly.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
PACK_CHUNK = 1 << 20  # values packed at a time


def packed_words(n: int, bits: int) -> int:
    return -(-n // 32) * bits


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) with shape [..., n] -> int32 words [..., ceil(n/32) * bits]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits}-bit packing is not supported; use one of {SUPPORTED_BITS}")
    *lead, n = q.shape
    if q.dim() == 2 and q.shape[0] * n > PACK_CHUNK:  # row chunks: int64 temporaries stay O(chunk), not O(tensor)
        rows = max(1, PACK_CHUNK // n)
        return torch.cat([pack(q[r:r + rows], bits) for r in range(0, q.shape[0], rows)])
    blocks = -(-n // 32)
    v = torch.zeros(*lead, blocks * 32, dtype=torch.int64, device=q.device)
    v[..., :n] = q.to(torch.int64)
    if (v < 0).any() or (v >= (1 << bits)).any():
        raise ValueError(f"codes out of range for {bits} bits")
    v = v.view(*lead, blocks, 32)
    words = torch.zeros(*lead, blocks, bits, dtype=torch.int64, device=q.device)
    for i in range(32):
        start = i * bits
        w, off = divmod(start, 32)
        words[..., w] |= (v[..., i] << off) & 0xFFFFFFFF
        if off + bits > 32:  # straddles into the next word
            words[..., w + 1] |= v[..., i] >> (32 - off)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as signed int32
    return words.to(torch.int32).reshape(*lead, blocks * bits)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: int32 words [..., blocks * bits] -> uint8 codes [..., n]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits}-bit packing is not supported; use one of {SUPPORTED_BITS}")
    *lead, m = words.shape
    if m != packed_words(n, bits):
        raise ValueError(f"packed tensor has {m} words per row, but {n} values of {bits} bits need "
                         f"{packed_words(n, bits)}")
    blocks = m // bits
    w64 = words.to(torch.int64).view(*lead, blocks, bits) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    out = torch.empty(*lead, blocks, 32, dtype=torch.int64, device=words.device)
    for i in range(32):
        w, off = divmod(i * bits, 32)
        val = w64[..., w] >> off
        if off + bits > 32:
            val = val | (w64[..., w + 1] << (32 - off))
        out[..., i] = val & mask
    return out.reshape(*lead, blocks * 32)[..., :n].to(torch.uint8)

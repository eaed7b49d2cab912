"""Per-group asymmetric weight quantization: RTN and HQQ (half-quadratic refinement of the zero-point).

A weight W [out, in] is split into groups of `group_size` consecutive inputs per output row. Each group gets a
scale s = (max - min) / (2^b - 1) and a zero z = -min / s (stored in float16, like the papers), and codes
q = clamp(round(W / s + z), 0, 2^b - 1); dequantization is (q - z) * s.

HQQ keeps the min-max scale and refines the zero by minimising the lp-norm (p < 1) of the error with a
half-quadratic splitting: alternate a generalized soft-threshold of the error (E = shrink_lp(W - dequant)) and the
closed-form zero z = mean(q - (W - E) / s) per group; beta grows by kappa each round; stop when the error stops
falling. Defaults follow the HQQ / MiLo settings (p = 0.7, beta = 10, kappa = 1.01, 20 rounds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkernels.packing import SUPPORTED_BITS, pack, unpack


class QuantConfigError(ValueError):
    pass


@dataclass
class QTensor:
    """A packed per-group quantized weight [out, in]."""

    packed: torch.Tensor  # int32 [out, words]
    scale: torch.Tensor  # float16 [out, groups]
    zero: torch.Tensor  # float16 [out, groups]
    bits: int
    group_size: int
    shape: tuple[int, int]
    symmetric: bool = False  # zero fixed at 2^(bits-1) - 1/2 (a grid symmetric about 0): not stored, not counted

    @property
    def padded_in(self) -> int:
        """The input dim rounded up to whole groups (the last group is zero-padded when it does not divide)."""
        return -(-self.shape[1] // self.group_size) * self.group_size

    def codes(self) -> torch.Tensor:
        return unpack(self.packed, self.bits, self.padded_in)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        out, n = self.shape
        q = self.codes().to(torch.float32).view(out, -1, self.group_size)
        w = (q - self.zero.float()[..., None]) * self.scale.float()[..., None]
        return w.reshape(out, self.padded_in)[:, :n].to(dtype)

    def bits_per_weight(self) -> float:
        """Codes plus fp16 scale and zero per group (the scale alone when symmetric), over the real (unpadded)
        weights."""
        out, n = self.shape
        groups = self.padded_in // self.group_size
        return (self.bits * n + (1 if self.symmetric else 2) * 16 * groups) / n


def check_settings(bits: int, group_size: int, in_features: int, pad: bool = False) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantConfigError(f"{bits}-bit quantization is not supported; use one of {SUPPORTED_BITS}")
    if group_size < 1:
        raise QuantConfigError(f"group size must be >= 1, got {group_size}")
    if in_features % group_size and not pad:
        raise QuantConfigError(f"group size {group_size} does not divide the input dimension {in_features} "
                               "(allow zero-padding of the last group with pad_groups=true)")


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, groups, group_size]; a partial last group is padded with zeros (zero is always inside
    the min-max range of the padded group, so real weights keep a valid grid)."""
    out, n = w.shape
    padded = -(-n // group_size) * group_size
    w = w.float()
    if padded != n:
        w = torch.nn.functional.pad(w, (0, padded - n))
    return w.reshape(out, padded // group_size, group_size)


FP16_TINY = float(torch.finfo(torch.float16).tiny)


def _minmax(wg: torch.Tensor, bits: int):
    qmax = (1 << bits) - 1
    lo, hi = wg.amin(-1), wg.amax(-1)
    # A constant group (a rank-1 compensator's one-value groups, say) keeps its value with scale |value| and code
    # 0; scales stay >= float16's smallest normal so that the stored scale and zero are finite.
    scale = torch.where(hi - lo > 0, (hi - lo) / qmax, torch.maximum(lo.abs(), hi.abs()))
    scale = scale.clamp_min(FP16_TINY).half().float()
    zero = -lo / scale
    # round-trip through float16 (what is stored) before computing codes
    return scale, zero.half().float()


def _codes(wg, scale, zero, bits):
    return torch.clamp(torch.round(wg / scale[..., None] + zero[..., None]), 0, (1 << bits) - 1)


def _pack_result(q, scale, zero, bits, group_size, shape, symmetric: bool = False) -> QTensor:
    return QTensor(pack(q.reshape(shape[0], -1).to(torch.uint8), bits), scale.half(), zero.half(), bits,
                   group_size, tuple(shape), symmetric)


def symmetric_zero(bits: int) -> float:
    """The fixed zero of a symmetric grid: codes 0 .. 2^b - 1 dequantize to (q - zero) * s = +-s/2 .. +-(2^b-1)s/2."""
    return (1 << (bits - 1)) - 0.5


def quantize_symmetric(w: torch.Tensor, bits: int, group_size: int) -> QTensor:
    """Per-group symmetric quantization (MiLo stores its compensators so): scale = absmax / (2^(b-1) - 1/2), the
    zero a constant, so a group costs its codes and one fp16 scale."""
    check_settings(bits, group_size, w.shape[1])
    wg = _groups(w, group_size)
    z = symmetric_zero(bits)
    scale = (wg.abs().amax(-1) / z).clamp_min(FP16_TINY).half().float()
    zero = torch.full_like(scale, z)
    return _pack_result(_codes(wg, scale, zero, bits), scale, zero, bits, group_size, w.shape, symmetric=True)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, pad: bool = False) -> QTensor:
    check_settings(bits, group_size, w.shape[1], pad)
    wg = _groups(w, group_size)
    scale, zero = _minmax(wg, bits)
    return _pack_result(_codes(wg, scale, zero, bits), scale, zero, bits, group_size, w.shape)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: the proximal step of the lp (p < 1) penalty."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


ROW_CHUNK = 1 << 16  # HQQ works on this many weights' groups at a time: temporaries stay in cache, not O(tensor)


@torch.no_grad()
def quantize_hqq(w: torch.Tensor, bits: int, group_size: int, pad: bool = False, p: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, iters: int = 20) -> QTensor:
    check_settings(bits, group_size, w.shape[1], pad)
    wg = _groups(w, group_size)
    scale, zero = _minmax(wg, bits)
    s, z = scale[..., None], zero[..., None]
    qmax = (1 << bits) - 1
    rows = max(1, ROW_CHUNK // wg[0].numel())
    chunks = [slice(r, r + rows) for r in range(0, wg.shape[0], rows)]
    best_err, best_z = float("inf"), z.clone()
    for _ in range(iters):  # each round over row chunks: the error is the whole tensor's, as in one pass
        err_sum, z_new = 0.0, torch.empty_like(z)
        for c in chunks:
            wc, sc, zc = wg[c], s[c], z[c]
            q = torch.clamp(torch.round(wc / sc + zc), 0, qmax)
            diff = wc - (q - zc) * sc
            err_sum += diff.abs().sum().item()
            e = _shrink_lp(diff, beta, p)
            z_new[c] = (q - (wc - e) / sc).mean(-1, keepdim=True)
        err = err_sum / wg.numel()
        if err < best_err:
            best_err, best_z = err, z.clone()
        elif err > best_err * 1.0001:
            break  # early stop: the error grew
        z = z_new
        beta *= kappa
    zero = best_z[..., 0].half().float()
    codes = torch.empty(wg.shape, dtype=torch.uint8)
    for c in chunks:
        codes[c] = _codes(wg[c], scale[c], zero[c], bits)
    return _pack_result(codes, scale, zero, bits, group_size, w.shape)


def quantize(w: torch.Tensor, method: str, bits: int, group_size: int, pad: bool = False) -> QTensor:
    if method == "rtn":
        return quantize_rtn(w, bits, group_size, pad)
    if method == "hqq":
        return quantize_hqq(w, bits, group_size, pad)
    raise QuantConfigError(f"unknown base quantizer {method!r}: use rtn or hqq")

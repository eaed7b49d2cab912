"""The CPU kernels (qkernels/csrc/qmatmul_cpu.cpp): a C++ extension built with torch's extension tools at first
use (about a minute on 2 cores, once) and cached under `$SPECMOE_CACHE/torch_extensions` (default
`~/.cache/specmoe`). Every code path is compiled in (AVX-512 VBMI + VNNI, AVX2 + FMA + F16C, scalar) and the best
one this CPU has is chosen at run time, by its flags, not the build machine's; `SPECMOE_CPU_ISA=avx512|avx2|scalar`
forces one (an error where the CPU lacks it), and `use_isa` switches in-process (the benchmark measures every path
the machine supports). Chosen over `torch.compile` by measurement (`python -m pipelines.bench kernels`: both are timed
side by side).

`available()` is False, after one warning, when the build fails (no compiler): callers then use the reference.
Decode-sized batches (up to `MAX_KERNEL_ROWS` rows per expert) run the fused kernels; larger ones dequantize with
the kernel and call a dense matmul, which is faster once the weight is reused by many rows. `dense_rows` is the
float32 counterpart for the native engine's unquantized linears (actors.runner takes it per weight shape where it
measures faster than torch's BLAS).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "qmatmul_cpu.cpp"
SOURCES = (SOURCE, SOURCE.with_name("attention_cpu.cpp"))
MAX_KERNEL_ROWS = 16
_lock = threading.Lock()
_ext = None
_failed: str | None = None


ISAS = ("native", "avx512", "avx2", "scalar")  # native: the best path this CPU runs


def _isa() -> str:
    isa = os.environ.get("SPECMOE_CPU_ISA", "native")
    if isa not in ISAS:
        raise ValueError(f"SPECMOE_CPU_ISA={isa!r}: use one of {list(ISAS)}")
    return isa


def build_dir() -> Path:
    root = Path(os.environ.get("SPECMOE_CACHE", Path.home() / ".cache" / "specmoe"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + torch.__version__.encode()).hexdigest()[:12]
    return root / "torch_extensions" / f"qmatmul_cpu_{digest}"


def load():
    """The compiled extension (built on first call), or None when it cannot be built."""
    global _ext, _failed
    if _ext is not None or _failed is not None:
        return _ext
    with _lock:
        if _ext is None and _failed is None:
            from torch.utils import cpp_extension

            out = build_dir()
            out.mkdir(parents=True, exist_ok=True)
            if not any(out.glob("*.so")):
                print(f"building the CPU kernels (once, about a minute) in {out}", file=sys.stderr, flush=True)
            try:
                ext = cpp_extension.load(
                    name="specmoe_qmatmul_cpu", sources=[str(p) for p in SOURCES], build_directory=str(out),
                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
            except (RuntimeError, OSError, ImportError) as exc:  # no compiler or headers: the reference
                _failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                warnings.warn(f"the CPU kernels could not be built ({_failed}); using the torch reference",
                              stacklevel=2)
                return None
            try:
                ext.set_isa(_isa())
            except RuntimeError as exc:  # a forced path this CPU lacks: the user's setting, said in one line
                raise ValueError(f"SPECMOE_CPU_ISA={_isa()}: {str(exc).splitlines()[0]}") from None
            _ext = ext
    return _ext


def use_isa(name: str) -> str:
    """Switch the kernels' code path in this process (`native`: the best this CPU has); returns the path now used.
    A path the CPU lacks is a ValueError."""
    ext = load()
    if ext is None:
        raise RuntimeError("the CPU kernels are not available here")
    try:
        ext.set_isa(name)
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None
    return ext.isa()


def available() -> bool:
    return load() is not None


def integer_path() -> bool:
    """Whether the kernels now run an integer path (AVX2 or AVX-512, the same numerics), which rounds x to int16 per
    block and codebook tables to int16 (qkernels.reference.x_as_int16 / codebook_as_int16 say how): each x is off by
    at most 1.5e-5 (3-bit) or 3e-5 (codebook) of its block's largest |x|."""
    return load().isa() in ("avx2", "avx512")


_EMPTY = torch.empty(0)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def affine3_grouped(x, offsets, packed, scale, zero, group: int, u=None, v=None) -> torch.Tensor:
    """x_sorted [R, K] (rows of expert e at offsets[e]:offsets[e+1]), packed [E, N, words] -> [R, N] in x's dtype."""
    y = load().affine3_grouped(_f32(x), offsets, packed, scale, zero, _EMPTY if u is None else u,
                               _EMPTY if v is None else v, group)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def codebook4_grouped(x, offsets, packed, centroids) -> torch.Tensor:
    y = load().codebook4_grouped(_f32(x), offsets, packed, centroids)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def affine3_dequant(packed, scale, zero, k: int, group: int) -> torch.Tensor:
    return load().affine3_dequant(packed, scale, zero, k, group)


def dense_offsets(rows: int) -> torch.Tensor:
    return torch.tensor([0, rows], dtype=torch.int64)


def dense_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 x [R, K] @ weight [N, K]^T (+ bias): a decode-sized dense linear, each weight row read once for all
    R rows (a few; the engine's small-batch linears)."""
    return load().dense_rows(x.contiguous(), weight, _EMPTY if bias is None else bias)


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kvs: list[torch.Tensor], layer: int,
                     past: list[int], lens: list[int], scale: float,
                     bases: list[torch.Tensor | None] | None = None, offsets: list[int] | None = None) -> torch.Tensor:
    """A step's attention, every sequence in one call (csrc/attention_cpu.cpp): float32 q [B, T, Hq, D] and the new
    keys/values k_new, v_new [B, T, Hkv, D] of `lens[b]` <= T tokens per sequence (the rest padding); kvs[b] the
    sequence's buffer [L, 2, Hkv, capacity, D] with `past[b]` positions filled. Position p of sequence b lives in
    kvs[b] at p - offsets[b]; positions below offsets[b] are a prefix it shares, read from bases[b] (None, or no
    `bases` at all: no sharing). Writes the new keys and values into kvs[b] at `layer` and returns [B, T, Hq * D]: new token i of
    sequence b attends causally to positions 0..past[b] + i (padding rows zero)."""
    bases = [_EMPTY if b is None else b for b in (bases if bases is not None else [None] * len(kvs))]
    offsets = offsets if offsets is not None else [0] * len(kvs)
    return load().decode_attention(q, k_new, v_new, kvs, bases, offsets, layer, past, lens, scale)

"""Quantized modules whose matmuls dispatch: Triton on CUDA, the CPU kernel (qkernels/cpu.py) on CPU, the torch
reference otherwise (other devices, e.g. mps or xpu, with one warning). `backend` forces one ("reference" is the
config key's escape hatch); a shape, format or device a kernel does not take falls back to the reference with one
warning, never a wrong result. The kernels have no backward: when a gradient is needed (grad mode on and x, u
or v requires grad) the forward runs the reference, whose autograd is exact. Buffers are shape-checked at
construction (a mis-sized packed tensor is a ValueError naming it, not an out-of-bounds read).

- `QuantLinear`: one [out, in] weight, 3-bit affine (optionally + a MiLo compensator U V) or 4-bit codebook;
- `QuantExperts`: transformers 5's fused experts (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) with the
  same forward(hidden_states, top_k_index, top_k_weights): tokens are sorted by expert and every expert of a
  projection runs in one grouped kernel call (the MoE form), instead of a Python loop over experts (on CUDA,
  3-bit experts with or without MiLo compensators, and 4-bit codebook experts).
The CPU kernel serves decode-sized batches (<= qkernels.cpu.MAX_KERNEL_ROWS rows per expert); larger batches
dequantize transiently and use a dense matmul. The reference path caches its dequantized weights.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from qkernels import reference as ref

BACKENDS = ("auto", "triton", "cpu", "reference")
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def pick_backend(requested: str, x: torch.Tensor, bits: int | None) -> str:
    """bits: 3 (affine codes) or None (4-bit codebook); other affine widths have no kernel."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; use one of {BACKENDS}")
    if requested == "reference":
        return "reference"
    if bits not in (None, 3):
        if requested != "auto":
            _warn_once(f"bits{bits}", f"no kernel for {bits}-bit weights: using the torch reference")
        return "reference"
    device = x.device.type
    if requested == "auto":
        if device not in ("cuda", "cpu"):
            _warn_once(f"device-{device}", f"no quantized kernel for {device} tensors: using the torch reference")
            return "reference"
        requested = "triton" if device == "cuda" else "cpu"
    if requested == "cpu":
        from qkernels import cpu

        if device != "cpu":
            _warn_once(f"cpu-on-{device}", f"the CPU kernel does not take {device} tensors: using the torch "
                       "reference")
            return "reference"
        return "cpu" if cpu.available() else "reference"
    if device != "cuda" and not (device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        _warn_once(f"triton-on-{device}", f"the Triton backend needs CUDA (or CPU tensors with TRITON_INTERPRET=1), "
                   f"not {device}: using the torch reference")
        return "reference"
    return "triton"


def _f32(t):
    return None if t is None else t.float().contiguous()


class _Packed(nn.Module):
    """The shared part: buffers of one quantized format, stacked over experts ([E, ...]; E = 1 for a linear)."""

    HALF = ("scale", "zero", "centroids")

    def _register(self, **tensors) -> None:
        # float16 metadata is held as its int16 bits so that `model.to(dtype)` leaves it alone
        tensors = {**dict.fromkeys(("packed", "u", "v", *self.HALF)), **tensors}
        for name, t in tensors.items():
            if t is not None and name in self.HALF:
                t = t.to(torch.float16).view(torch.int16)
            self.register_buffer(f"_{name}" if name in self.HALF else name, None if t is None else t.contiguous())

    def _half(self, name: str):
        t = getattr(self, f"_{name}")
        return None if t is None else t.view(torch.float16)

    scale = property(lambda self: self._half("scale"))
    zero = property(lambda self: self._half("zero"))
    centroids = property(lambda self: self._half("centroids"))

    @property
    def is_codebook(self) -> bool:
        return self._centroids is not None

    @property
    def kernel_bits(self) -> int | None:
        return None if self.is_codebook else self.bits

    def _pick(self, x: torch.Tensor, k: int, requested: str) -> str:
        if x.shape[-1] != k:
            raise ValueError(f"x has shape {list(x.shape)}, expected [..., {k}] (the weight's in-features)")
        backend = pick_backend(requested, x, self.kernel_bits)
        if backend != "reference" and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, self.u, self.v)):
            return "reference"  # the kernels (C++ and Triton) have no backward; a bias is added outside them
        if backend == "cpu" and not self.cpu_supported(k):
            _warn_once(f"cpu-shape-{self.group}", f"the CPU kernel does not take this layout (group size "
                       f"{self.group if not self.is_codebook else k // self._centroids.shape[-2]}): using the "
                       "torch reference")
            return "reference"
        return backend

    def _dense(self, e: int, k: int) -> torch.Tensor:
        """Expert e's dequantized float32 [N, k] weight (compensator included)."""
        if self.is_codebook:
            return ref.dequant_codebook(self.packed[e].cpu(), self.centroids[e].cpu(), k)
        if self.bits == 3 and self.packed.device.type == "cpu" and self.cpu_supported(k):
            from qkernels import cpu

            if cpu.available():
                w = cpu.affine3_dequant(self.packed[e], self.scale[e], self.zero[e], k, self.group)
            else:
                w = ref.dequant_affine(self.packed[e], self.scale[e], self.zero[e], 3, k, self.group)
        else:
            w = ref.dequant_affine(self.packed[e].cpu(), self.scale[e].cpu(), self.zero[e].cpu(), self.bits, k,
                                   self.group)
        if self.u is not None:
            w = w + self.u[e].float().cpu() @ self.v[e].float().cpu()
        return w.to(self.packed.device)

    def cpu_supported(self, k: int) -> bool:
        """The CPU kernel takes 3-bit groups of whole 32-code blocks and codebook groups of multiples of 8."""
        if self.is_codebook:
            return (k // self._centroids.shape[-2]) % 8 == 0
        return self.group % 32 == 0

    def _cpu_grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        from qkernels import cpu

        if self.is_codebook:
            return cpu.codebook4_grouped(x, offsets, self.packed, self.centroids)
        return cpu.affine3_grouped(x, offsets, self.packed, self.scale, self.zero, self.group, _f32(self.u),
                                   _f32(self.v))


class QuantLinear(_Packed):
    """y = x W^T (+ b) for a packed 3-bit affine weight (optionally with a MiLo compensator) or a 4-bit codebook."""

    def __init__(self, in_features: int, out_features: int, *, packed, scale=None, zero=None, bits=3, group=64,
                 centroids=None, u=None, v=None, bias=None, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.backend = backend
        ref.check_shapes(out_features, in_features, bits=bits, group=group, packed=packed, scale=scale, zero=zero,
                         centroids=centroids, u=u, v=v)
        one = (lambda t: None if t is None else t[None])
        self._register(packed=one(packed), scale=one(scale), zero=one(zero), centroids=one(centroids),
                       u=one(_f32(u)), v=one(_f32(v)))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._ref_dense = None

    def dequantized(self) -> torch.Tensor:
        if self._ref_dense is None:
            self._ref_dense = self._dense(0, self.in_features)
        return self._ref_dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self._pick(x, self.in_features, self.backend)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if backend == "triton":
            from qkernels import triton_kernels as tk

            if self.is_codebook:
                y = tk.codebook4_matmul(x2, self.packed[0], self.centroids[0], k)
            else:
                y = tk.affine3_matmul(x2, self.packed[0], self.scale[0], self.zero[0], k, self.group,
                                      None if self.u is None else self.u[0], None if self.v is None else self.v[0])
        elif backend == "cpu":
            from qkernels import cpu

            if x2.shape[0] <= cpu.MAX_KERNEL_ROWS:
                y = self._cpu_grouped(x2, cpu.dense_offsets(x2.shape[0]))
            else:
                y = (x2.float() @ self._dense(0, k).T).to(x.dtype)
        else:
            y = (x2.float() @ self.dequantized().T).to(x.dtype)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


class _ExpertProjection(_Packed):
    """One fused projection ([E, N, K]) of a QuantExperts."""

    def __init__(self, n: int, k: int, num_experts: int, bits: int, group: int, **tensors):
        super().__init__()
        self.n, self.k, self.bits, self.group = n, k, bits, group
        ref.check_shapes(n, k, (num_experts,), bits=bits, group=group, **tensors)
        self._register(**tensors)
        self._ref_dense = None

    def pick(self, x: torch.Tensor, requested: str) -> str:
        return self._pick(x, self.k, requested)

    def run(self, x_sorted: torch.Tensor, offsets: torch.Tensor, counts: list[int], backend: str) -> torch.Tensor:
        if backend == "cpu":
            from qkernels import cpu

            if max(counts) <= cpu.MAX_KERNEL_ROWS:
                return self._cpu_grouped(x_sorted, offsets)
        if backend == "triton":
            from qkernels import triton_kernels as tk

            if self.is_codebook:
                return tk.grouped_codebook4_matmul(x_sorted, offsets, self.packed,
                                                   self.centroids, self.k, max(counts))
            return tk.grouped_affine3_matmul(x_sorted, offsets, self.packed, self.scale,
                                             self.zero, self.k, self.group, max(counts), self.u, self.v)
        out = torch.empty(x_sorted.shape[0], self.n, dtype=x_sorted.dtype, device=x_sorted.device)
        lo = 0
        for e, c in enumerate(counts):
            if c:
                out[lo:lo + c] = (x_sorted[lo:lo + c].float() @ self._weight(e, backend).T).to(out.dtype)
            lo += c
        return out

    def _weight(self, e: int, backend: str) -> torch.Tensor:
        if backend == "cpu":  # prefill-sized: transient
            return self._dense(e, self.k)
        if self._ref_dense is None:
            self._ref_dense = [None] * self.packed.shape[0]
        if self._ref_dense[e] is None:
            self._ref_dense[e] = self._dense(e, self.k)
        return self._ref_dense[e]


class QuantExperts(nn.Module):
    """Drop-in for transformers 5's fused experts module, over quantized per-expert weights."""

    def __init__(self, gate_up: dict, down: dict, hidden: int, intermediate: int, act_fn, backend: str = "auto"):
        """gate_up / down: {"bits", "group", "packed" [E, N, words], and "scale", "zero" [E, N, groups] float16
        (+ "u" [E, N, r], "v" [E, r, K]) or "centroids" [E, N, groups, 16] float16} (quant.checkpoint builds
        them from per-expert results)."""
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = gate_up["packed"].shape[0], hidden, intermediate
        self.act_fn, self.backend = act_fn, backend
        self.gate_up = _ExpertProjection(2 * intermediate, hidden, self.num_experts, **gate_up)
        self.down = _ExpertProjection(hidden, intermediate, self.num_experts, **down)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        counts_t = torch.bincount(flat, minlength=self.num_experts)[: self.num_experts].cpu()
        counts = counts_t.tolist()
        # indices >= num_experts (experts not held here) sort last and are dropped
        order = torch.argsort(flat, stable=True)[: sum(counts)]
        token = order // k
        offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64)
        torch.cumsum(counts_t, 0, out=offsets[1:])
        x = hidden_states[token]
        gate, up = self.gate_up.run(x, offsets, counts, self.gate_up.pick(x, self.backend)).chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        h = self.down.run(h, offsets, counts, self.down.pick(h, self.backend))
        h = h * top_k_weights.reshape(-1)[order, None].to(h.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, token, h)

"""Quantized modules whose matmul dispatches: Triton on CUDA, the torch reference elsewhere (the CPU kernel is
not built yet, so CPU runs the reference, which caches its dequantized weight after the first call).
`backend="reference"` forces the reference; a shape or dtype a kernel does not take falls back to the reference
with one warning, never a wrong result.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from kernels import reference as ref

BACKENDS = ("auto", "triton", "reference")
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def pick_backend(requested: str, x: torch.Tensor, bits: int | None) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; use one of {BACKENDS}")
    if requested == "reference":
        return "reference"
    if requested == "auto" and not x.is_cuda:
        return "reference"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        _warn_once("cpu", "the Triton backend needs CUDA (or TRITON_INTERPRET=1): using the torch reference")
        return "reference"
    if bits not in (None, 3):
        _warn_once(f"bits{bits}", f"no Triton kernel for {bits}-bit weights: using the torch reference")
        return "reference"
    return "triton"


class QuantLinear(nn.Module):
    """y = x W^T (+ b) for a packed 3-bit affine weight (optionally with a MiLo compensator) or a 4-bit codebook."""

    def __init__(self, in_features: int, out_features: int, *, packed, scale=None, zero=None, bits=3, group=64,
                 centroids=None, u=None, v=None, bias=None, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.backend = backend
        self.register_buffer("packed", packed)
        for name, t in (("scale", scale), ("zero", zero), ("centroids", centroids), ("u", u), ("v", v)):
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._dense = None  # the reference path's dequantized weight

    @property
    def is_codebook(self) -> bool:
        return self.centroids is not None

    def dequantized(self) -> torch.Tensor:
        if self._dense is None:
            if self.is_codebook:
                w = ref.dequant_codebook(self.packed.cpu(), self.centroids.cpu(), self.in_features)
            else:
                w = ref.dequant_affine(self.packed.cpu(), self.scale.cpu(), self.zero.cpu(), self.bits,
                                       self.in_features, self.group)
                if self.u is not None:
                    w = w + self.u.float().cpu() @ self.v.float().cpu()
            self._dense = w.to(self.packed.device)
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = pick_backend(self.backend, x, None if self.is_codebook else self.bits)
        if backend == "triton":
            from kernels import triton_kernels as tk

            if self.is_codebook:
                y = tk.codebook4_matmul(x, self.packed, self.centroids, self.in_features)
            else:
                y = tk.affine3_matmul(x, self.packed, self.scale, self.zero, self.in_features, self.group,
                                      self.u, self.v)
        else:
            y = (x.float() @ self.dequantized().T).to(x.dtype)
        return y if self.bias is None else y + self.bias

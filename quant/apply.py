"""Quantize a model's targets with RTN, HQQ or MiLo: the plan (ranks per tensor), one tensor at a time (the unit a
Ray task runs), and writing the results back into the model (dequantized, for the torch reference path).

Rank policies for MiLo compensators:
- `uniform`: `rank_dense` for attention, dense MLPs and shared experts, `rank_expert` for routed experts;
- `kurtosis`: from the weight's excess kurtosis k: rank 0 for k < 1, 2^(ceil(k) + 2) up to k = 9, `rank_max` above
  (outlier-heavy matrices get large ranks; Gaussian-like ones none);
- `frequency`: routed expert e of a layer gets rank_expert * E * f_e (f = its share of routing decisions on real
  text, mean rank = rank_expert); others get `rank_dense`;
- `mixed` (MiLo's recipe for MoE): `rank_dense` for attention, dense MLPs and shared experts, the kurtosis rule
  for routed experts.
Every rank is capped at `rank_max` and at min(out, in).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quant.base import QTensor, QuantConfigError, check_settings, quantize
from quant.codebook import CodebookTensor, quantize_codebook
from quant.milo import COMPENSATOR_FORMATS, MiLoTensor, quantize_milo
from quant.targets import Target, is_moe, quant_targets

METHODS = ("rtn", "hqq", "milo", "kmeans")
RANK_POLICIES = ("uniform", "kurtosis", "frequency", "mixed")


@dataclass
class QuantSpec:
    method: str = "milo"
    bits: int = 3
    group_size: int = 64
    rank_policy: str = "uniform"
    rank_dense: int = 16
    rank_expert: int = 8
    rank_max: int = 1024
    rounds: int = 10
    seed: int = 0
    compensator: str = "asymmetric"  # MiLo's factors: per-group min-max (scale + zero) or symmetric (scale only)
    pad_groups: bool = False  # zero-pad a last group that does not divide the input dim
    activation_weighted: bool = False  # kmeans: weight the input columns by their calibration activations (CodeQuant)
    routing_frequency: dict = field(default_factory=dict)  # layer -> [E] shares, for the frequency policy

    def check(self) -> None:
        if self.method not in METHODS:
            raise QuantConfigError(f"unknown quantization method {self.method!r}; known: {list(METHODS)}")
        if self.method == "milo" and self.bits != 3:
            raise QuantConfigError(f"MiLo is 3-bit; {self.bits}-bit was asked")
        if self.method == "kmeans" and self.bits != 4:
            raise QuantConfigError(f"codebooks have 16 centroids (4-bit indices); {self.bits}-bit was asked")
        if self.activation_weighted and self.method != "kmeans":
            raise QuantConfigError(f"activation weighting is for codebooks (kmeans), not {self.method!r}")
        if self.rank_policy not in RANK_POLICIES:
            raise QuantConfigError(f"unknown rank policy {self.rank_policy!r}")
        if self.compensator not in COMPENSATOR_FORMATS:
            raise QuantConfigError(f"unknown compensator format {self.compensator!r}; known: "
                                   f"{list(COMPENSATOR_FORMATS)}")


def excess_kurtosis(w: torch.Tensor) -> float:
    x = w.float().flatten()
    x = x - x.mean()
    var = x.pow(2).mean()
    return float(x.pow(4).mean() / var.clamp_min(1e-20).pow(2) - 3.0)


def rank_for(target: Target, spec: QuantSpec) -> int:
    return rank_of(spec, target.kind, target.layer, target.expert, target.get())


def rank_of(spec: QuantSpec, kind: str, layer: int, expert: int | None, w: torch.Tensor) -> int:
    """A target's compensator rank (0 unless MiLo) from its kind, place and, for the kurtosis policy, weights."""
    if spec.method != "milo":
        return 0
    if spec.rank_policy == "kurtosis" or (spec.rank_policy == "mixed" and kind == "expert"):
        k = excess_kurtosis(w)
        rank = 0 if k < 1 else (spec.rank_max if k > 9 else 2 ** (int(-(-k // 1)) + 2))
    elif spec.rank_policy == "frequency" and kind == "expert":
        shares = spec.routing_frequency.get(layer)
        if shares is None:
            raise QuantConfigError(f"frequency rank policy: no routing statistics for layer {layer}")
        rank = round(spec.rank_expert * len(shares) * shares[expert])
    else:
        rank = spec.rank_expert if kind == "expert" else spec.rank_dense
    return int(max(0, min(rank, spec.rank_max, *w.shape)))


def check_targets(targets: list, spec: QuantSpec, moe: bool) -> None:
    """Every setting against every target's shape, before any work starts."""
    spec.check()
    if not targets:
        raise QuantConfigError("the model has no decoder layers with linear weights to quantize")
    if spec.rank_policy == "frequency" and spec.method == "milo" and not moe:
        raise QuantConfigError("the frequency rank policy needs a model with MoE blocks; this one has none")
    for t in targets:
        n = t.get().shape[1]
        if spec.method == "kmeans":  # group_size 0: one codebook per output row
            if spec.group_size and n % spec.group_size:
                raise QuantConfigError(f"codebook group {spec.group_size} does not divide {n}")
            continue
        check_settings(spec.bits, spec.group_size, n, spec.pad_groups)


def plan(model, spec: QuantSpec) -> list[tuple[Target, int]]:
    """Targets and their ranks; checks every setting before any work starts."""
    targets = quant_targets(model)
    check_targets(targets, spec, is_moe(model))
    return [(t, rank_for(t, spec)) for t in targets]


def quantize_tensor(w: torch.Tensor, spec: QuantSpec, rank: int,
                    calib: torch.Tensor | None = None) -> QTensor | MiLoTensor | CodebookTensor:
    """One target's quantization; `calib` [tokens, in] is its input on calibration text (activation-weighted
    codebooks need it: each input column weighs its mean squared activation)."""
    if spec.method == "kmeans":
        importance = None
        if spec.activation_weighted:
            if calib is None:
                raise QuantConfigError("activation-weighted codebooks need the target's calibration input")
            importance = calib.float().pow(2).mean(0)
        return quantize_codebook(w, spec.group_size or None, seed=spec.seed, importance=importance)
    if spec.method == "milo":
        return quantize_milo(w, rank, spec.bits, spec.group_size, spec.rounds, seed=spec.seed, pad=spec.pad_groups,
                             compensator=spec.compensator)
    return quantize(w, spec.method, spec.bits, spec.group_size, spec.pad_groups)


def storage_bits(result) -> float:
    if isinstance(result, MiLoTensor):
        return result.storage_bits()
    out, n = result.shape
    return result.bits_per_weight() * out * n


@torch.no_grad()
def fake_quantize(model, spec: QuantSpec, progress=None) -> dict:
    """Quantize every target in place (weights replaced by their dequantized values) and return the accounting:
    bits per weight over the quantized tensors, counting codes, scales, zeros and compensators."""
    items = plan(model, spec)
    bits = weights = 0.0
    for target, rank in items:
        result = quantize_tensor(target.get(), spec, rank)
        target.set(result.dequantize())
        bits += storage_bits(result)
        weights += target.get().numel()
        if progress is not None:
            progress.update()
    by_kind: dict[str, list[int]] = {}
    for t, r in items:
        by_kind.setdefault("expert" if t.kind == "expert" else "dense", []).append(r)
    return {"bits_per_weight": bits / weights, "quantized_weights": int(weights), "tensors": len(items),
            "ranks": {t.name: r for t, r in items if r},
            "mean_rank": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}

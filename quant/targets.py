"""Which weights of a decoder get quantized, MoE-aware.

Every nn.Linear inside the decoder layers (attention, dense MLPs, shared experts, per-expert linear layouts) and
every expert of transformers 5's fused expert tensors (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj
[E, H, I]`) is a target, as an [out, in] matrix. Routers (`gate`, `router`, `shared_expert_gate`) are never
quantized, nor are embeddings, norms or the LM head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

ROUTER_NAMES = {"gate", "router", "shared_expert_gate"}


@dataclass
class Target:
    name: str  # e.g. model.layers.3.mlp.experts.gate_up_proj.7 or model.layers.3.self_attn.q_proj.weight
    kind: str  # attention | dense_mlp | expert | shared_expert
    layer: int
    expert: int | None
    param: nn.Parameter
    index: int | None  # expert index into a fused [E, ., .] parameter

    def get(self) -> torch.Tensor:
        return self.param.data if self.index is None else self.param.data[self.index]

    def set(self, w: torch.Tensor) -> None:
        target = self.get()
        target.copy_(w.to(target.dtype))


def _is_fused_experts(module: nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, nn.Parameter) and p.dim() == 3 and isinstance(getattr(module, "down_proj", None),
                                                                        nn.Parameter)


def _kind(name: str) -> str:
    if "attn" in name or "attention" in name:
        return "attention"
    if "shared_expert" in name:
        return "shared_expert"
    if ".experts." in f".{name}." or name.startswith("experts"):
        return "expert"
    return "dense_mlp"


def quant_targets(model: nn.Module) -> list[Target]:
    layers = model.model.layers
    out = []
    for li, layer in enumerate(layers):
        prefix = f"model.layers.{li}."
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ROUTER_NAMES:
                continue
            if isinstance(module, nn.Linear):
                kind = _kind(name)
                m = re.search(r"experts\.(\d+)\.", name)
                out.append(Target(prefix + name + ".weight", kind, li, int(m.group(1)) if m else None,
                                  module.weight, None))
            elif _is_fused_experts(module):
                for pname in ("gate_up_proj", "down_proj"):
                    param = getattr(module, pname)
                    for e in range(param.shape[0]):
                        out.append(Target(f"{prefix}{name}.{pname}.{e}", "expert", li, e, param, e))
    return out


def router_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The routers' weights (to check they are left untouched)."""
    out = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ROUTER_NAMES and getattr(module, "weight", None) is not None:
            out[name + ".weight"] = module.weight
    return out


def is_moe(model: nn.Module) -> bool:
    return any(t.kind == "expert" for t in quant_targets(model))

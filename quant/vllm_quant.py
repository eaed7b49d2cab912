"""MiLo and CodeQuant as a vLLM quantization method, so vLLM serves our quantized checkpoints (issue 23's stretch).

vLLM's engine core is a process of its own (spawned), so the method is registered by a `vllm.general_plugins` entry
point (pyproject.toml), which every vLLM process runs: `register()` adds

- the quantization method `specmoe` (`SpecMoEConfig`, read from the checkpoint's specmoe_quant.json): a linear
  layer that holds quantized targets gets `SpecMoELinearMethod`, a routed-experts layer `SpecMoEMoEMethod`; the rest
  (router, embeddings, LM head) stays vLLM's unquantized layer;
- the load format `specmoe` (`SpecMoELoader`): the checkpoint's unquantized tensors go through the model's own
  `load_weights`; each quantized target is rebuilt as a `qkernels.modules.QuantLinear` / `QuantExperts` (the
  native engine's modules: the C++ kernels on CPU, Triton on CUDA) and attached to the vLLM layer that computes it.
  vLLM fuses q/k/v (and gate/up) into one layer: their rows are stacked, and MiLo compensators become one
  block-diagonal U with the V's stacked, so the fused layer computes every shard's x (W + U V)^T in one call.

Tensor parallelism: each rank keeps its share of the packed rows, as vLLM shards a dense weight. Column-parallel
layers (q/k/v with GQA's replicated kv heads, gate/up, and each expert's gate and up) keep their rank's output rows;
row-parallel ones (o, down, and each expert's down) their rank's input columns, cut at whole quantization groups
(a MiLo V keeps the same columns and U stays whole, so the ranks' U (V_r x_r) add up to U (V x) in vLLM's
all-reduce; a per-row codebook keeps its table). A split that cuts a group is an error naming the layer.
`actors.vllm_host` asks for both when a role's model is a SpecMoE checkpoint; pipeline parallelism is refused there.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, QKVParallelLinear, ReplicatedLinear,
                                               RowParallelLinear, UnquantizedLinearMethod)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from qkernels.modules import QuantExperts, QuantLinear
from quant.checkpoint import (MANIFEST, CheckpointError, linear_kwargs, result_from, stack_experts, tp_cut,
                              verify_files)

NAME = "specmoe"
_registered = False


def register() -> None:
    """The `vllm.general_plugins` entry point: registers the quantization method and the load format (once per
    process; vLLM may call it several times)."""
    global _registered
    if _registered:
        return
    register_quantization_config(NAME)(SpecMoEConfig)
    register_model_loader(NAME)(SpecMoELoader)
    _registered = True


def _unit(name: str) -> tuple[str, str | None, int | None]:
    """A target's module name, and for experts of a fused tensor its projection and expert index:
    model.layers.0.self_attn.q_proj.weight -> (model.layers.0.self_attn.q_proj, None, None);
    model.layers.0.mlp.experts.down_proj.3 -> (model.layers.0.mlp.experts, down_proj, 3)."""
    m = re.match(r"^(.*)\.(gate_up_proj|down_proj)\.(\d+)$", name)
    if m is not None:
        return m.group(1), m.group(2), int(m.group(3))
    return name.rsplit(".", 1)[0], None, None


def _layer_of(name: str) -> str | None:
    m = re.match(r"^(.*\.layers\.\d+)\.", name)
    return None if m is None else m.group(1)


class _Plan:
    """Where each quantized target of a checkpoint lands in a vLLM model: module name -> ordered shards."""

    def __init__(self, manifest: dict, packed_modules: dict[str, list[str]]):
        self.linear: dict[str, list[str]] = {}   # vLLM module -> target names, in shard order
        self.experts: dict[str, dict] = {}       # layer prefix -> {projection -> {expert -> target}}
        for name in manifest["tensors"]:
            module, proj, e = _unit(name)
            if proj is not None:
                self.experts.setdefault(_layer_of(name), {}).setdefault(proj, {})[e] = name
                continue
            parent, _, leaf = module.rpartition(".")
            for fused, parts in packed_modules.items():
                if leaf in parts:
                    self.linear.setdefault(f"{parent}.{fused}", [None] * len(parts))[parts.index(leaf)] = name
                    break
            else:
                self.linear.setdefault(module, [name])

    def quantized_linear(self, prefix: str) -> bool:
        return prefix in self.linear

    def quantized_experts(self, prefix: str) -> bool:
        return _layer_of(prefix + ".") in self.experts


class SpecMoEConfig(QuantizationConfig):
    """A SpecMoE checkpoint's manifest (specmoe_quant.json) as vLLM's quantization config."""

    def __init__(self, manifest: dict):
        super().__init__()
        self.manifest = manifest
        self._plan = None

    def get_name(self):
        return NAME

    def get_supported_act_dtypes(self):
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the Triton kernels

    @staticmethod
    def get_config_filenames() -> list[str]:
        return [MANIFEST]

    @classmethod
    def from_config(cls, config: dict):
        return cls(config)

    def plan(self) -> _Plan:
        if self._plan is None:  # the model fills packed_modules_mapping as it is built
            self._plan = _Plan(self.manifest, self.packed_modules_mapping)
        return self._plan

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if self.plan().quantized_linear(prefix):
                return SpecMoELinearMethod()
            return UnquantizedLinearMethod()
        if isinstance(layer, RoutedExperts) and self.plan().quantized_experts(prefix):
            return SpecMoEMoEMethod(layer.moe_config)
        return None


class SpecMoELinearMethod(LinearMethodBase):
    """The layer's weight is the QuantLinear the loader attaches as `layer.specmoe` (none is allocated here)."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        layer.specmoe_out = sum(output_partition_sizes)

    def apply(self, layer, x, bias=None):
        y = layer.specmoe(x)
        return y if bias is None else y + bias


class SpecMoEMoEMethod(FusedMoEMethodBase):
    """The experts are the QuantExperts the loader attaches as `layer.specmoe`: vLLM routes (top-k and its
    weights), the grouped kernel runs every expert of a projection in one call."""

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        layer.specmoe_shape = (num_experts, hidden_size, intermediate_size_per_partition)

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        return layer.specmoe(x, topk_ids.long(), topk_weights)


def _rank_rows(layer, n: int) -> torch.Tensor | None:
    """The output rows of a linear layer's full weight [n, K] that its tensor-parallel rank computes (None: all)."""
    tp, rank = getattr(layer, "tp_size", 1), getattr(layer, "tp_rank", 0)
    if tp == 1 or isinstance(layer, (RowParallelLinear, ReplicatedLinear)):
        return None
    if isinstance(layer, QKVParallelLinear):  # kv heads are replicated when there are fewer than ranks
        q, k, v = (layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size,
                   layer.num_kv_heads * layer.v_head_size)
        kv = rank // layer.num_kv_head_replicas
        q_all, k_all = layer.total_num_heads * layer.head_size, layer.total_num_kv_heads * layer.head_size
        spans = [(rank * q, q), (q_all + kv * k, k), (q_all + k_all + kv * v, v)]
    else:  # gate/up (merged) or one projection: every part split evenly
        spans, offset = [], 0
        for size in getattr(layer, "output_sizes", None) or [n]:
            spans.append((offset + rank * (size // tp), size // tp))
            offset += size
    return torch.cat([torch.arange(start, start + size) for start, size in spans])


def _take_rows(kw: dict, rows: torch.Tensor | None, dim: int) -> dict:
    """QuantLinear (dim 0) or QuantExperts (dim 1) arguments for the given output rows only."""
    if rows is None:
        return kw
    return {key: (val.index_select(dim, rows).contiguous()
                  if key in ("packed", "scale", "zero", "u", "centroids") and val is not None else val)
            for key, val in kw.items()}


def _take_cols(kw: dict, c0: int, c1: int, k: int, where: str) -> dict:
    """QuantLinear / QuantExperts arguments (input dim last) for input columns c0..c1 of k, cut at whole groups: a
    3-bit group is `group` codes in group * 3 / 32 words; codebook codes pack 8 to a word in rows padded to 32."""
    out, group = dict(kw), kw["group"]
    if "centroids" in kw:
        groups = kw["centroids"].shape[-2]
        cut = tp_cut(group, group * groups, codebook=True)
        if c0 % cut or (c1 % cut and c1 != k):
            raise CheckpointError(f"{where}: tensor parallelism splits its {k} inputs at {c0}..{c1}, inside a "
                                  f"codebook block of {cut}")
        out["packed"] = kw["packed"][..., c0 // 8:c0 // 8 + -(-(c1 - c0) // 32) * 4].contiguous()
        if groups == 1:
            out["group"] = c1 - c0
        else:
            out["centroids"] = kw["centroids"][..., c0 // group:c1 // group, :].contiguous()
        return out
    if c0 % group or (c1 % group and c1 != k):
        raise CheckpointError(f"{where}: tensor parallelism splits its {k} inputs at {c0}..{c1}, inside a "
                              f"quantization group of {group}")
    g0, g1, words = c0 // group, -(-c1 // group), group * kw["bits"] // 32
    out["packed"] = kw["packed"][..., g0 * words:g1 * words].contiguous()
    out["scale"], out["zero"] = (kw[key][..., g0:g1].contiguous() for key in ("scale", "zero"))
    if kw.get("v") is not None:
        out["v"] = kw["v"][..., c0:c1].contiguous()
    return out


class SpecMoELoader(BaseModelLoader):
    """Loads a SpecMoE checkpoint into a vLLM model built with the `specmoe` quantization method."""

    def download_model(self, model_config) -> None:
        pass  # a local directory (actors.vllm_host fetches run storage first)

    def load_weights(self, model: nn.Module, model_config) -> None:
        path = Path(model_config.model)
        config = getattr(model, "quant_config", None) or getattr(getattr(model, "model", None),
                                                                   "quant_config", None)
        if config is None or config.get_name() != NAME:
            if not (path / MANIFEST).is_file():  # a speculative draft model: vLLM loads it with the target's format
                from dataclasses import replace

                from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

                DefaultModelLoader(replace(self.load_config, load_format="auto")).load_weights(model, model_config)
                return
            raise CheckpointError(f"load_format={NAME} needs quantization={NAME}")
        manifest = verify_files(path)
        plan = config.plan()
        modules = dict(model.named_modules())
        shards: dict[str, dict] = {}
        uses = Counter(e["shard"] for e in manifest["tensors"].values())  # a shard is dropped after its last use

        def result(name: str):
            entry = manifest["tensors"][name]
            shard = entry["shard"]
            if shard not in shards:
                shards[shard] = load_file(str(path / shard))
            out = result_from(shards[shard], name, entry)
            uses[shard] -= 1
            if not uses[shard]:
                del shards[shard]
            return out

        with torch.no_grad():
            for module_name, names in plan.linear.items():
                layer = modules.get(module_name)
                if layer is None or None in names:
                    raise CheckpointError(f"{path}: vLLM's model has no layer for {names} ({module_name})")
                results = [result(n) for n in names]
                kwargs = linear_kwargs(results, layer.input_size)
                kwargs = _take_rows(kwargs, _rank_rows(layer, kwargs["packed"].shape[0]), 0)
                if isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
                    c0 = layer.tp_rank * layer.input_size_per_partition
                    kwargs = _take_cols(kwargs, c0, c0 + layer.input_size_per_partition, layer.input_size,
                                        module_name)
                    kwargs["in_features"] = layer.input_size_per_partition
                out = kwargs["packed"].shape[0]
                if out != layer.specmoe_out:
                    raise CheckpointError(f"{module_name}: the checkpoint has {out} rows, vLLM's layer "
                                          f"{layer.specmoe_out}")
                layer.specmoe = QuantLinear(kwargs.pop("in_features"), out, **kwargs)
            experts_by_layer = {_layer_of(n + "."): (n, m) for n, m in modules.items()
                                if isinstance(m, RoutedExperts)}
            for layer_prefix, projections in plan.experts.items():
                module_name, layer = experts_by_layer.get(layer_prefix, (None, None))
                if layer is None:
                    raise CheckpointError(f"{path}: vLLM's model has no routed experts in {layer_prefix}")
                num, hidden, inter = layer.specmoe_shape  # inter: this rank's share of the intermediate size
                act = getattr(layer, "activation", "silu")
                if str(getattr(act, "value", act)).lower() != "silu":
                    raise CheckpointError(f"{module_name}: activation {act} is not SiLU")
                cfg = layer.moe_config
                if cfg.moe_parallel_config.use_ep:
                    raise CheckpointError(f"{module_name}: expert parallelism is not supported for SpecMoE "
                                          "checkpoints (tensor parallelism is)")
                tp, rank = cfg.tp_size, cfg.tp_rank
                full = inter * tp
                stacked = {}
                for proj, n, k in (("gate_up_proj", 2 * full, hidden), ("down_proj", hidden, full)):
                    per = projections.get(proj, {})
                    if sorted(per) != list(range(num)):
                        raise CheckpointError(f"{layer_prefix}: {proj} has experts {sorted(per)}, vLLM {num}")
                    stacked[proj] = stack_experts([result(per[e]) for e in range(num)], n, k)
                if stacked["gate_up_proj"]["packed"].shape[1] != 2 * full:
                    raise CheckpointError(f"{module_name}: the checkpoint's experts have "
                                          f"{stacked['gate_up_proj']['packed'].shape[1] // 2} intermediate rows, "
                                          f"vLLM's {full}")
                if tp > 1:  # this rank's gate and up rows, and the same down columns
                    mine = torch.arange(rank * inter, (rank + 1) * inter)
                    stacked["gate_up_proj"] = _take_rows(stacked["gate_up_proj"], torch.cat([mine, full + mine]), 1)
                    stacked["down_proj"] = _take_cols(stacked["down_proj"], rank * inter, (rank + 1) * inter, full,
                                                      f"{module_name}.down_proj")
                layer.specmoe = QuantExperts(stacked["gate_up_proj"], stacked["down_proj"], hidden, inter,
                                             nn.functional.silu)
            rest = load_file(str(path / "rest.safetensors"))
            loaded = model.load_weights(_vllm_names(rest, model))
        if loaded is not None:  # the names the model's own loader filled
            missing = sorted({n for n, _ in model.named_parameters() if ".specmoe." not in n} - set(loaded))
            if missing:
                raise CheckpointError(f"{path}: {len(missing)} of vLLM's parameters are not in the checkpoint, "
                                      f"e.g. {missing[0]}")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for m in modules.values():
            if isinstance(getattr(m, "specmoe", None), nn.Module):
                m.specmoe.to(device)


def _vllm_names(rest: dict[str, torch.Tensor], model: nn.Module):
    """The unquantized tensors under the names the vLLM model's load_weights takes: transformers 5 names the
    router of a fused-experts block `mlp.gate` where vLLM's Mixtral says `block_sparse_moe.gate`; a name vLLM's
    model does not have is matched by its layer and its last two components, when exactly one parameter does."""
    params = {n for n, _ in model.named_parameters()}
    for name, t in rest.items():
        if name in params or _layer_of(name) is None:
            yield name, t
            continue
        layer, tail = _layer_of(name), ".".join(name.split(".")[-2:])
        hits = [p for p in params if p.startswith(layer + ".") and p.endswith("." + tail)]
        yield (hits[0] if len(hits) == 1 else name), t

"""Quantized checkpoints: a directory the model zoo and the target actor load by path.

    config.json, tokenizer files        the source model's
    rest.safetensors                    every parameter that is not quantized (embeddings, norms, routers, head)
    quantized-000NN.safetensors         packed targets: <name>.packed (int32), <name>.scale / .zero (float16),
                                        MiLo compensators as <name>.u.* and <name>.v.* (no .zero when symmetric)
    specmoe_quant.json                  manifest: format, method, bits, group size, rank policy, per tensor
                                        (shape, rank, shard), bits per weight, source fingerprint, shard sha256

Loading rebuilds the model from its config, loads `rest`, and writes each dequantized target into place (the torch
reference path). A missing file, a changed hash or a tensor whose size does not match its shape is a clear error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quant.base import QTensor, symmetric_zero
from quant.codebook import CodebookTensor
from quant.milo import MiLoTensor
from quant.targets import quant_targets

MANIFEST = "specmoe_quant.json"
FORMAT = 1
SHARD_TENSORS = 512


class CheckpointError(ValueError):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(model) -> str:
    """The source model: its config and a sample of every target weight."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for t in quant_targets(model):
        w = t.get().float().flatten()
        h.update(t.name.encode())
        h.update(w[:: max(1, w.numel() // 64)][:64].numpy().tobytes())
    return h.hexdigest()[:32]


def tensors_of(name: str, result) -> dict[str, torch.Tensor]:
    def one(prefix: str, q: QTensor) -> dict:
        out = {f"{prefix}.packed": q.packed.contiguous(), f"{prefix}.scale": q.scale.contiguous()}
        if not q.symmetric:  # a symmetric grid's zero is a constant of its bits
            out[f"{prefix}.zero"] = q.zero.contiguous()
        return out

    if isinstance(result, CodebookTensor):
        return {f"{name}.packed": result.packed.contiguous(), f"{name}.centroids": result.centroids.contiguous()}
    if isinstance(result, MiLoTensor):
        out = one(name, result.base)
        if result.rank:
            out.update(one(f"{name}.u", result.u))
            out.update(one(f"{name}.v", result.v))
        return out
    return one(name, result)


def result_from(tensors: dict[str, torch.Tensor], name: str, entry: dict):
    def one(prefix: str, shape, bits, group, symmetric: bool = False) -> QTensor:
        try:
            scale = tensors[f"{prefix}.scale"]
            zero = torch.full_like(scale, symmetric_zero(bits)) if symmetric else tensors[f"{prefix}.zero"]
            q = QTensor(tensors[f"{prefix}.packed"], scale, zero, bits, group, tuple(shape), symmetric)
        except KeyError as exc:
            raise CheckpointError(f"tensor {exc.args[0]!r} is missing from its shard") from None
        expected_groups = -(-shape[1] // group)
        if q.scale.shape != (shape[0], expected_groups):
            raise CheckpointError(f"{prefix}: scale has shape {tuple(q.scale.shape)}, expected "
                                  f"{(shape[0], expected_groups)}")
        return q

    if entry.get("codebook"):
        try:
            cb = CodebookTensor(tensors[f"{name}.packed"], tensors[f"{name}.centroids"], entry["group_size"],
                                tuple(entry["shape"]))
        except KeyError as exc:
            raise CheckpointError(f"tensor {exc.args[0]!r} is missing from its shard") from None
        return cb
    base = one(name, entry["shape"], entry["bits"], entry["group_size"])
    if entry.get("rank"):
        r = entry["rank"]
        sym = bool(entry.get("comp_symmetric"))
        u = one(f"{name}.u", [entry["shape"][0], r], entry["comp_bits"], entry["u_group"], sym)
        v = one(f"{name}.v", [r, entry["shape"][1]], entry["comp_bits"], entry["v_group"], sym)
        return MiLoTensor(base, u, v, r)
    return base


def manifest_entry(result, shard: str) -> dict:
    if isinstance(result, CodebookTensor):
        return {"shape": list(result.shape), "bits": 4, "group_size": result.group_size, "shard": shard,
                "rank": 0, "codebook": True}
    base = result.base if isinstance(result, MiLoTensor) else result
    entry = {"shape": list(base.shape), "bits": base.bits, "group_size": base.group_size, "shard": shard, "rank": 0}
    if isinstance(result, MiLoTensor) and result.rank:
        entry.update(rank=result.rank, comp_bits=result.u.bits, u_group=result.u.group_size,
                     v_group=result.v.group_size)
        if result.u.symmetric:
            entry["comp_symmetric"] = True
    return entry


def save(out_dir: Path, model, tokenizer, results: dict[str, object], meta: dict) -> Path:
    """Write a quantized checkpoint for `model` (its targets replaced by `results`, name -> tensor result)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {t.name: t for t in quant_targets(model)}
    missing = set(targets) - set(results)
    if missing:
        raise CheckpointError(f"{len(missing)} targets have no quantized result, e.g. {sorted(missing)[0]}")
    quantized = {t.name if t.index is None else t.name.rsplit(".", 1)[0] for t in targets.values()}
    rest = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in quantized}
    if getattr(model.config, "tie_word_embeddings", False):
        rest.pop("lm_head.weight", None)  # tied to the embeddings: safetensors refuses shared storage
    save_file(rest, str(out_dir / "rest.safetensors"))
    entries, shards = {}, {}
    names = sorted(results)
    for s in range(0, len(names), SHARD_TENSORS):
        shard = f"quantized-{s // SHARD_TENSORS + 1:05d}.safetensors"
        payload = {}
        for name in names[s:s + SHARD_TENSORS]:
            payload.update(tensors_of(name, results[name]))
            entries[name] = manifest_entry(results[name], shard)
        save_file(payload, str(out_dir / shard))
    for f in ["rest.safetensors"] + sorted({e["shard"] for e in entries.values()}):
        shards[f] = sha256(out_dir / f)
    if not getattr(model.config, "architectures", None):  # a model built from a config: serving engines need it
        model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    write_manifest(out_dir, meta, entries, shards)
    return out_dir


def write_manifest(out_dir: Path, meta: dict, entries: dict, files: dict[str, str]) -> None:
    """The checkpoint's manifest: `meta`, every quantized tensor's entry (shape, bits, rank, file) and the sha256 of
    every weight file."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, **meta, "tensors": entries, "files": files}
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(path: Path) -> dict:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"{path} is not a quantized checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{f} is corrupt: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{f}: unsupported format {manifest.get('format')!r} (this version reads {FORMAT})")
    return manifest


def verify_files(path, hashes: bool = True) -> dict:
    """The manifest of a checkpoint whose shard files are all there and, with `hashes`, match their sha256 in the
    manifest (a job checks this before it starts anything; loading checks it again)."""
    path = Path(path)
    manifest = read_manifest(path)
    for fname, digest in manifest["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {fname}")
        if hashes and sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {fname} does not match its hash in {MANIFEST} (corrupt)")
    return manifest


def load_quantized(path, dtype=torch.float32, verify: bool = True, runtime: str = "dequantized",
                   backend: str = "auto"):
    """Rebuild the model of a quantized checkpoint. runtime "dequantized": targets hold their dequantized weights
    (plain torch matmuls); "packed": linear targets become qkernels.modules.QuantLinear and fused expert modules
    qkernels.modules.QuantExperts (Triton on CUDA, the CPU kernel on CPU, `backend` forces one); a fused experts
    module whose experts mix formats stays dequantized, with a warning."""
    if runtime not in ("dequantized", "packed"):
        raise CheckpointError(f"unknown runtime {runtime!r}: use dequantized or packed")
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    manifest = verify_files(path, hashes=verify)
    config = AutoConfig.from_pretrained(str(path))
    rest = load_file(str(path / "rest.safetensors"))
    if own_head(config, rest):
        config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected:
        raise CheckpointError(f"checkpoint {path}: unexpected tensors {unexpected[:3]}")
    targets = {t.name: t for t in quant_targets(model)}
    if set(targets) != set(manifest["tensors"]):
        raise CheckpointError(f"checkpoint {path}: its tensors do not match the model built from its config")
    shards: dict[str, dict] = {}
    experts: dict[str, dict[str, dict[int, object]]] = {}  # module -> projection -> expert -> result
    with torch.no_grad():
        for name, entry in manifest["tensors"].items():
            if entry["shard"] not in shards:
                shards[entry["shard"]] = load_file(str(path / entry["shard"]))
            try:
                result = result_from(shards[entry["shard"]], name, entry)
                targets[name].set(result.dequantize())
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {path}: {name}: {exc}") from None
            if runtime == "packed" and targets[name].index is None:
                _swap_linear(model, name, result, backend)
            elif runtime == "packed":
                module, proj, e = name.rsplit(".", 2)
                experts.setdefault(module, {}).setdefault(proj, {})[int(e)] = result
        for module, projections in experts.items():
            _swap_experts(model, module, projections, backend)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.to(dtype).eval()


def own_head(config, rest_names) -> bool:
    """Whether a checkpoint whose config ties the LM head to the embeddings stores a head of its own (`save` drops a
    tied head): CodeQuant's rotated, norm-scaled head, in checkpoints whose config.json was copied from the source
    (quantize jobs before 2026-12-07 wrote it so). Loaders untie it."""
    return bool(getattr(config, "tie_word_embeddings", False)) and "lm_head.weight" in rest_names


def tp_cut(group: int, in_features: int, codebook: bool) -> int:
    """The unit a tensor-parallel rank's share of a quantized layer's inputs must be a whole multiple of: one
    quantization group, or for a codebook with one group per row, one block of 32 codes (codes pack 8 to a word
    in rows padded to 32). Both actors.vllm_host (before vLLM starts) and quant.vllm_quant (at the cut) use it."""
    return 32 if codebook and group == in_features else group


def linear_kwargs(results: list, in_features: int) -> dict:
    """The keyword arguments of one QuantLinear computing the row-stacked outputs of `results` (one projection, or
    q, k, v of one attention, which vLLM fuses into one layer): packed codes, scales, zeros or codebooks stacked
    by rows; MiLo compensators as a block-diagonal U [sum N, sum r] and the V's stacked [sum r, K]."""
    kinds = {isinstance(r, CodebookTensor) for r in results}  # affine shards may or may not have a compensator
    if len(kinds) != 1:
        raise CheckpointError("shards fused into one layer mix codebook and affine formats")
    out = {"in_features": in_features}
    if isinstance(results[0], CodebookTensor):
        return {**out, "bits": 4, "group": results[0].group_size, "packed": torch.cat([r.packed for r in results]),
                "centroids": torch.cat([r.centroids for r in results])}
    bases = [r.base if isinstance(r, MiLoTensor) else r for r in results]
    if len({(b.bits, b.group_size) for b in bases}) != 1:
        raise CheckpointError("shards fused into one layer have different bits or group sizes")
    out.update(bits=bases[0].bits, group=bases[0].group_size,
               **{k: torch.cat([getattr(b, k) for b in bases]) for k in ("packed", "scale", "zero")})
    ranks = [r.rank if isinstance(r, MiLoTensor) else 0 for r in results]
    if sum(ranks):
        rows = [b.shape[0] for b in bases]
        u = torch.zeros(sum(rows), sum(ranks))
        vs = []
        r0 = c0 = 0
        for res, n, rank in zip(results, rows, ranks):
            if rank:
                u[r0:r0 + n, c0:c0 + rank] = res.u.dequantize()
                vs.append(res.v.dequantize())
            r0, c0 = r0 + n, c0 + rank
        out.update(u=u, v=torch.cat(vs))
    return out


def _swap_linear(model, weight_name: str, result, backend: str) -> None:
    from qkernels.modules import QuantLinear

    module_name = weight_name.rsplit(".", 1)[0]
    parent_name, _, leaf = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, leaf)
    bias = None if old.bias is None else old.bias.detach()
    kwargs = linear_kwargs([result], old.in_features)
    new = QuantLinear(kwargs.pop("in_features"), old.out_features, bias=bias, backend=backend, **kwargs)
    setattr(parent, leaf, new)


def _swap_experts(model, module_name: str, projections: dict, backend: str) -> None:
    from qkernels.modules import QuantExperts

    old = model.get_submodule(module_name)
    if set(projections) != {"gate_up_proj", "down_proj"}:
        return
    try:
        e, hidden, inter = old.down_proj.shape
        new = QuantExperts(stack_experts([projections["gate_up_proj"][i] for i in range(e)], 2 * inter, hidden),
                           stack_experts([projections["down_proj"][i] for i in range(e)], hidden, inter),
                           hidden, inter, old.act_fn, backend)
    except (ValueError, KeyError) as exc:
        import warnings

        warnings.warn(f"{module_name}: kept dequantized ({exc})", stacklevel=3)
        return
    parent_name, _, leaf = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, new)


def stack_experts(results: list, n: int, k: int) -> dict:
    """Per-expert quantization results (QTensor, MiLoTensor, CodebookTensor) of one [E x (n, k)] projection -> the
    stacked buffers qkernels.modules.QuantExperts takes. Compensators of different ranks are zero-padded."""
    kinds = {type(r) for r in results}
    if len(kinds) != 1:
        raise ValueError(f"experts of one projection mix formats {sorted(k.__name__ for k in kinds)}")
    if isinstance(results[0], CodebookTensor):
        groups = {r.centroids.shape[1] for r in results}
        if len(groups) != 1:
            raise ValueError("experts of one projection have different codebook groups")
        return {"bits": 4, "group": k // groups.pop(), "packed": torch.stack([r.packed for r in results]),
                "centroids": torch.stack([r.centroids for r in results])}
    bases = [r.base if isinstance(r, MiLoTensor) else r for r in results]
    if len({(b.bits, b.group_size) for b in bases}) != 1:
        raise ValueError("experts of one projection have different bits or group sizes")
    tensors = {name: torch.stack([getattr(b, name) for b in bases]) for name in ("packed", "scale", "zero")}
    ranks = [r.rank if isinstance(r, MiLoTensor) else 0 for r in results]
    rmax = max(ranks)
    tensors["u"] = tensors["v"] = None
    if rmax:
        u = torch.zeros(len(results), n, rmax)
        v = torch.zeros(len(results), rmax, k)
        for e, (r, rank) in enumerate(zip(results, ranks)):
            if rank:
                u[e, :, :rank] = r.u.dequantize()
                v[e, :rank] = r.v.dequantize()
        tensors["u"], tensors["v"] = u, v
    return {"bits": bases[0].bits, "group": bases[0].group_size, **tensors}

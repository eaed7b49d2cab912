"""Quantize a model (MoE-aware) into a checkpoint, as Ray tasks, resumably, without holding the model.

    python -m pipelines.quantize                      # demo: MiLo 3-bit g64 on the demo MoE (smollm2-moe-8x)
    python -m pipelines.quantize method=hqq           # plain HQQ 3-bit g64
    python -m pipelines.quantize tiny                 # a random tiny Mixtral, seconds
    python -m pipelines.quantize run.resume=<run>     # finish a killed run (on any node)
    python -m pipelines.evaluate target.model.name=<run>/model   # serve the result

Stages, each a Ray task where the model's files are (never the driver):
1. plan: the targets from the model's config on the meta device and its shard headers (settings checked here,
   before a run directory exists);
2. quantize: one task per weight matrix (`num_workers` in flight, `task_cpus`/`task_gpus` each) reads its tensor
   from the safetensors shards on its node, quantizes it and writes it into the checkpoint in run storage
   (`<run>/model/tensors/<name>.safetensors`); the driver records the small result in `<run>/tensors.jsonl`, so a
   killed job, or one that lost a node, resumes without redoing a stored tensor;
3. the rest of the model (embeddings, norms, routers, head), config and tokenizer; the manifest; publish;
4. perplexity of source, `compare` baselines and checkpoint, one model at a time in a task (`ppl_cpus`).
MiLo, HQQ and RTN are data-free. The stages that need the whole model run as tasks too, on a node with room for
it (`task_resources`; a GPU with `task_gpus`): the frequency rank policy's routing statistics (before the run
directory exists, so a model without routers is a config error), CodeQuant's global stage (fold the norms, learn
and fuse the rotation; each target's rotated weight and calibration input go to `<run>/prepared/` in storage, where
its quantize task reads them, and the rotated rest of the model into the checkpoint) and CodeQuant's block-level
fine-tuning (the same rotation, read back, then layer by layer against the stored quantized tensors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load, save
from tqdm import tqdm

from actors import storage, zoo
from actors.cpus import actor_threads
from actors.hosts import init_ray
from pipelines.cli import run_cli
from pipelines.runs import (
    append_jsonl,
    make_run_dir,
    read_jsonl,
    save_config,
    write_json,
)
from pipelines.schema import ConfigError, QuantizeConfig
from pipelines.tracking import Tracker
from quant import checkpoint as ckpt
from quant.apply import QuantSpec, quantize_tensor, rank_of, storage_bits
from quant.base import QuantConfigError
from quant.perplexity import TextSourceError, eval_text, perplexity, pydoc_text
from quant.source import Shards, header_of, read_target
from quant.targets import quant_targets

CODEQUANT_KEYS = ("calib_tokens", "rotation_steps", "rotation_lr", "rotation_batch", "codebook_weighting",
                  "expert_tokens", "finetune_steps", "finetune_lr", "sequential")


def spec_of(cfg: QuantizeConfig) -> QuantSpec:
    method = "kmeans" if cfg.method == "codequant" else cfg.method  # codequant clusters like kmeans, after rotating
    group = 0 if method == "kmeans" else cfg.group_size
    return QuantSpec(method, cfg.bits, group, cfg.rank_policy, cfg.rank_dense, cfg.rank_expert,
                     cfg.rank_max, cfg.rounds, cfg.seed, compensator=cfg.compensator, pad_groups=cfg.pad_groups,
                     activation_weighted=cfg.method == "codequant" and cfg.codebook_weighting == "activation")


def rotate_for_codequant(cfg: QuantizeConfig, model, tok) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CodeQuant's global part: fold norms, learn and fuse the rotation; returns the rotation and each target's
    calibration input (what its codebook is fine-tuned against)."""
    from quant.codequant import (
        _linear_inputs,
        _target_input,
        fold_norms,
        fuse_rotation,
        learn_rotation,
        norm_outputs,
    )

    ids = tok(pydoc_text(), return_tensors="pt").input_ids[0, :cfg.calib_tokens]
    fold_norms(model)
    x = norm_outputs(model, ids)
    r, losses = learn_rotation(x, cfg.rotation_steps, cfg.rotation_lr, cfg.seed, cfg.rotation_batch)
    fuse_rotation(model, r)
    inputs = _linear_inputs(model, ids)
    print(f"rotation: 4-bit activation error {losses[0]:.3g} -> {losses[-1]:.3g}")
    routed = cfg.expert_tokens == "routed"
    return r.detach(), {t.name: _target_input(t, inputs, model, routed).detach() for t in quant_targets(model)}


PREPARED = "prepared"  # <run>/prepared/: CodeQuant's rotated targets with their calibration inputs, and the rotation


def _rotated_model(cfg: QuantizeConfig, prepared: str):
    """The source model with norms folded and the stored rotation fused (what the quantized tensors approximate)."""
    from quant.codequant import fold_norms, fuse_rotation

    model, tok = zoo.load_model(cfg.model.name, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    fold_norms(model)
    fuse_rotation(model, load(storage.read_bytes(storage.join(prepared, "rotation.safetensors")))["r"])
    return model, tok


def codequant_stage(cfg: QuantizeConfig, prepared: str, out: str) -> dict:
    """CodeQuant's global stage, in a Ray task: the rotation, each target's rotated weight and calibration input
    into `prepared`, the rotated rest of the model into the checkpoint at `out`. `done.json` is written last (with
    what went into the checkpoint): a resumed run skips the stage. Returns that record."""
    torch.set_num_threads(actor_threads())
    model, tok = zoo.load_model(cfg.model.name, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    r, calib = rotate_for_codequant(cfg, model, tok)
    storage.write_bytes(storage.join(prepared, "rotation.safetensors"), save({"r": r.contiguous()}))
    targets = quant_targets(model)
    for t in targets if not cfg.sequential else ():  # sequential: each layer's inputs come from LayerCalibrator
        storage.write_bytes(storage.join(prepared, f"{t.name}.safetensors"), save(
            {"w": t.get().detach().float().contiguous(), "x": calib.pop(t.name).float().contiguous()}))
    quantized = {t.name if t.index is None else t.name.rsplit(".", 1)[0] for t in targets}
    tied = getattr(model.config, "tie_word_embeddings", False)
    rest = {k: v for k, v in model.state_dict().items() if k not in quantized and not (tied and k == "lm_head.weight")}
    # the rotated model's config: CodeQuant unties the LM head (it is scaled by the final norm), so the source's
    # tie_word_embeddings=True would tie the stored head back to the embeddings when the checkpoint loads
    record = {"written": write_model_files(cfg.model.name, {}, out, tensors=rest, config=model.config)}
    storage.write_text(storage.join(prepared, "done.json"), json.dumps(record))
    return record


class LayerCalibrator:
    """GPTQ-style sequential calibration, as a Ray actor that holds the rotated model once: `calibrate(li, rows)`
    gives the layers before li their stored quantized values (`rows`: their ledger rows; each applied once) and
    writes layer li's targets' calibration inputs, with their rotated weights, into `prepared`. A restarted actor
    reloads the model, and the next call re-applies every row it is given."""

    def __init__(self, cfg: QuantizeConfig, prepared: str, out: str, threads: int):
        torch.set_num_threads(threads)  # it asks Ray for no CPUs: it works only between the waves of tasks
        self.cfg, self.prepared, self.out = cfg, prepared, out
        self.model, tok = _rotated_model(cfg, prepared)
        self.targets = quant_targets(self.model)
        self.ids = tok(pydoc_text(), return_tensors="pt").input_ids[0, :cfg.calib_tokens]
        self.applied: set[str] = set()

    def calibrate(self, layer: int, rows: dict) -> int:
        from quant.codequant import _linear_inputs, _target_input

        with torch.no_grad():
            for t in self.targets:
                if t.layer < layer and t.name not in self.applied:
                    t.set(_read_tensor(rows[t.name], self.out).dequantize())
                    self.applied.add(t.name)
        inputs = _linear_inputs(self.model, self.ids, upto=layer)
        mine = [t for t in self.targets if t.layer == layer]
        for t in mine:
            x = _target_input(t, inputs, self.model, self.cfg.expert_tokens == "routed")
            storage.write_bytes(storage.join(self.prepared, f"{t.name}.safetensors"), save(
                {"w": t.get().detach().float().contiguous(), "x": x.detach().float().contiguous()}))
        return len(mine)


def block_stage(cfg: QuantizeConfig, prepared: str, out: str, rows: dict) -> tuple[dict, dict]:
    """CodeQuant's block-level fine-tuning, in a Ray task: the rotated model, the stored quantized tensors
    fine-tuned layer by layer and written back. Returns the updated ledger rows and the stage's statistics."""
    torch.set_num_threads(actor_threads())
    model, tok = _rotated_model(cfg, prepared)
    targets = [(t, rows[t.name]["rank"]) for t in quant_targets(model)]
    results = {name: _read_tensor(row, out) for name, row in rows.items()}
    results, stats = block_finetune(cfg, model, tok, targets, results)
    return {name: {**rows[name], **_write_tensor(name, result, out)} for name, result in results.items()}, stats


def frequency_stage(cfg: QuantizeConfig) -> dict:
    """The frequency rank policy's routing statistics, in a Ray task: {layer: [E] shares}, or {"error": message}."""
    torch.set_num_threads(actor_threads())
    model, tok = zoo.load_model(cfg.model.name, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    try:
        return {"shares": routing_frequency(model, tok, cfg.routing_tokens)}
    except QuantConfigError as exc:
        return {"error": str(exc)}


@torch.inference_mode()
def routing_frequency(model, tokenizer, num_tokens: int) -> dict[int, list[float]]:
    """Share of top-k routing decisions per expert and layer, on real text (for the frequency rank policy)."""
    from quant.targets import router_params

    counts: dict[int, torch.Tensor] = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or getattr(gate, "weight", None) is None:
            continue
        top_k = getattr(gate, "top_k", None) or getattr(model.config, "num_experts_per_tok", 1)

        def hook(module, inputs, output, li=li, top_k=top_k):
            logits = output[0] if isinstance(output, tuple) else output
            picks = logits.reshape(-1, logits.shape[-1]).topk(top_k, dim=-1).indices
            counts[li] = counts.get(li, 0) + torch.bincount(picks.flatten(), minlength=logits.shape[-1])

        hooks.append(gate.register_forward_hook(hook))
    if not hooks or not router_params(model):
        raise QuantConfigError("the frequency rank policy needs a model with MoE routers; this one has none")
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[:, :num_tokens]
    model(ids.to(next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return {li: (c.float() / c.sum()).tolist() for li, c in counts.items()}


TENSORS = "tensors"  # the checkpoint's folder of quantized tensors, one file each, written by the tasks


def _tensor_file(name: str) -> str:
    return f"{TENSORS}/{name}.safetensors"


def _rss(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> int:
    """This process's RSS now, with its peak (VmHWM) reset to it where Linux allows; 0 off Linux."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    try:
        return _rss("VmRSS")
    except OSError:
        return 0


def plan_source(model_name: str, spec: QuantSpec, trust_remote_code: bool) -> dict:
    """The quantization plan of a model, made from its config on the meta device and its shard headers, on the node
    that runs it (a Ray task: the driver never holds the model): targets with their stored tensors and ranks (None:
    decided from the weights, in the task), the rest of the model by stored name, a fingerprint, sizes. Bad settings
    and unreadable models come back as {"error": message}."""
    from quant.apply import check_targets
    from quant.source import SourceError, disk_keys, meta_model, rest_keys
    from quant.targets import is_moe

    try:
        path = zoo.local_dir(model_name)
        if (path / ckpt.MANIFEST).is_file():
            raise SourceError(f"{model_name} is already a quantized checkpoint; quantize its source model")
        shards = Shards(path)
        model = meta_model(path, trust_remote_code)
        targets = quant_targets(model)
        check_targets(targets, spec, is_moe(model))
        plan, quantized = [], set()
        # kurtosis ranks come from the weights, frequency ranks from routing statistics the driver adds to the spec
        in_task = spec.method == "milo" and spec.rank_policy in ("kurtosis", "frequency", "mixed")
        for t in targets:
            shape = tuple(t.get().shape)
            keys = disk_keys(t.name, shape, t.index is not None, shards)
            rank = None if in_task else rank_of(spec, t.kind, t.layer, t.expert, t.get())
            stored = sum((shards.index[k].end - shards.index[k].start) // (shards.index[k].shape[0] if i is not None
                                                                            else 1) for k, i in keys)
            plan.append({"name": t.name, "kind": t.kind, "layer": t.layer, "expert": t.expert, "shape": shape,
                         "keys": keys, "rank": rank, "bytes": stored})
            quantized.add(t.name if t.index is None else t.name.rsplit(".", 1)[0])
        return {"targets": plan, "rest": rest_keys(model, quantized, shards), "fingerprint": shards.fingerprint(),
                "source_bytes": shards.bytes}
    except (SourceError, QuantConfigError, zoo.ModelNotFound, OSError) as exc:
        return {"error": str(exc)}


def write_model_files(model_name: str, rest: dict, out: str, tensors: dict | None = None, config=None) -> dict:
    """The checkpoint's unquantized part into storage: rest.safetensors (`rest`: name -> stored name in the source's
    shards, read here; or `tensors`, given) and the source's config (or `config`, a transformers config the job
    changed) and tokenizer files. Returns {file: {size, sha256}} of what it wrote."""
    src = zoo.local_dir(model_name)
    if tensors is None:
        shards = Shards(src)
        tensors = {name: shards.read(key) for name, key in rest.items()}
    files = {"rest.safetensors": save({k: v.contiguous() for k, v in tensors.items()})}
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(zoo.WEIGHT_FILES) and f.name not in (
                "model.safetensors.index.json", storage.MANIFEST, ckpt.MANIFEST) and not f.name.startswith("."):
            files[f.name] = f.read_bytes()
    if config is not None:
        files["config.json"] = config.to_json_string(use_diff=False).encode()
    written = {}
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data)
        written[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return written


def quantize_one(item: dict, spec: QuantSpec, model_name: str, out: str, device: str = "cpu",
                 prepared: str | None = None, finetune=(0, 0.0)) -> dict:
    """One target, in a Ray task: read from the source's shards on this node (CodeQuant: its rotated weight and
    calibration input from `prepared` in storage), quantized, written into the checkpoint at `out` in storage.
    Returns its ledger row (small: no tensors)."""
    import ray

    torch.set_num_threads(actor_threads())
    idle = _reset_peak_rss()
    t0 = time.perf_counter()
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    file = storage.join(out, _tensor_file(item["name"]))
    if storage.exists(file):  # a retry of a task whose node died after it wrote: nothing redone
        data = storage.read_bytes(file)
        entry = json.loads(header_of(data)["__metadata__"]["entry"])
        return {"name": item["name"], "file": _tensor_file(item["name"]), "entry": entry, "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "bits": storage_bits(_from_bytes(data, item["name"], entry)),
                "weights": math.prod(item["shape"]), "rank": entry["rank"], "seconds": 0.0, "peak_rss_bytes": 0,
                "node": node, "reused": True}
    calib = None
    if prepared is None:
        w = read_target(Shards(zoo.local_dir(model_name)), item["keys"])
    else:
        parts = load(storage.read_bytes(storage.join(prepared, f"{item['name']}.safetensors")))
        w, calib = parts["w"], parts["x"]
    w = w.to(device)
    rank = item["rank"]
    if rank is None:
        rank = rank_of(spec, item["kind"], item["layer"], item["expert"], w)
    result = quantize_tensor(w, spec, rank, calib)
    if calib is not None and finetune[0]:  # CodeQuant: fine-tune the centroids against the fp output
        from quant.codequant import finetune_centroids

        result = finetune_centroids(result, w, calib.to(device), finetune[0], finetune[1])
    weights = w.numel()
    del w
    row = _write_tensor(item["name"], result, out)
    if os.environ.get("SPECMOE_QUANT_WRITE_LOG"):  # the cluster benchmark counts tensors written twice
        log = Path(os.environ["SPECMOE_QUANT_WRITE_LOG"])
        log.mkdir(parents=True, exist_ok=True)
        (log / f"{item['name']}.{uuid.uuid4().hex}").touch()
    peak = _rss("VmHWM") - idle if idle else 0
    return {**row, "weights": weights, "rank": rank, "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak,
            "node": node, "reused": False}


def _from_bytes(data: bytes, name: str, entry: dict):
    return ckpt.result_from(load(data), name, entry)


def _write_tensor(name: str, result, out: str) -> dict:
    file = _tensor_file(name)
    entry = ckpt.manifest_entry(result, file)
    data = save({k: v.detach().cpu().contiguous() for k, v in ckpt.tensors_of(name, result).items()},
                metadata={"entry": json.dumps(entry)})
    storage.write_bytes(storage.join(out, file), data)
    return {"name": name, "file": file, "entry": entry, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "bits": storage_bits(result)}


def _read_tensor(row: dict, out: str):
    return _from_bytes(storage.read_bytes(storage.join(out, row["file"])), row["name"], row["entry"])


def _done(run_dir, out: str, planned: set[str]) -> dict[str, dict]:
    """Ledger rows of tensors whose file is in storage (a resumed run, on any node, redoes none of them)."""
    stored = set(storage.listdir(storage.join(out, TENSORS)))
    rows = {}
    for row in read_jsonl(run_dir / "tensors.jsonl"):
        if row["name"] in planned and row["file"].split("/", 1)[1] in stored:
            rows[row["name"]] = row
    return rows


def _check_plan(run_dir, source: str, spec_json: str) -> None:
    """Refuse partial work of another model or config (a resumed run whose source changed); nothing is deleted."""
    meta = run_dir / "plan.json"
    record = {"source_fingerprint": source, "spec": json.loads(spec_json)}
    if meta.is_file() and json.loads(meta.read_text()) != record:
        raise ConfigError(f"{run_dir} holds partial work of another model or config (the source model changed "
                          "since the run started?); start a new run")
    meta.write_text(json.dumps(record))


def block_finetune(cfg: QuantizeConfig, model, tok, items, results: dict) -> tuple[dict, dict]:
    """CodeQuant's block-level centroid fine-tuning (layer by layer: each layer sees the quantized
    layers before it): layer output MSE + `router_kl_weight` x router KL. The model keeps its fp weights.
    Returns the updated results and the last layer's {mse,kl}_{before,after}."""
    from quant.codequant import finetune_blocks

    ids = tok(pydoc_text(), return_tensors="pt").input_ids[0, :cfg.calib_tokens]
    fp = {t.name: t.get().clone() for t, _ in items}
    results = dict(results)
    t0 = time.perf_counter()
    stats = finetune_blocks(model, ids, results, cfg.block_finetune_steps, cfg.finetune_lr, cfg.router_kl_weight)
    with torch.no_grad():
        for t, _ in items:
            t.set(fp[t.name])
    last = {f"block_{k}": v for k, v in stats[max(stats)].items()}
    last["block_finetune_s"] = time.perf_counter() - t0
    print("block fine-tuning (last layer): " + json.dumps({k: round(v, 6) for k, v in last.items()}))
    return results, last


def ppl_stage(cfg: QuantizeConfig, checkpoint: str, ids: torch.Tensor) -> dict:
    """Perplexity of the source, each `compare` baseline (the source fake-quantized at the same bits and group) and
    the checkpoint, in a Ray task (on a GPU with task_gpus): one model at a time, each loaded there."""
    from quant.apply import fake_quantize

    torch.set_num_threads(actor_threads())
    device = "cuda" if cfg.task_gpus and torch.cuda.is_available() else "cpu"
    ppl = {"window": cfg.ppl_window, "stride": cfg.ppl_stride or None, "protocol": cfg.ppl_protocol}

    def source():
        return zoo.load_model(cfg.model.name, cfg.model.dtype, device, cfg.model.trust_remote_code)[0]

    out = {"ppl_source": perplexity(source(), ids, **ppl), "rows": []}
    for method in cfg.compare:
        bits = 4 if method == "kmeans" else cfg.bits
        spec = spec_of(dataclasses.replace(cfg, method=method, bits=bits))
        m = source()
        acc = fake_quantize(m, spec)
        out["rows"].append({"method": method, "bits": f"{bits}" + (f" g{spec.group_size}" if spec.group_size else ""),
                            "bits_per_weight": acc["bits_per_weight"], "ppl": perplexity(m, ids, **ppl)})
        del m
    model = zoo.load_model(checkpoint, "float32", device, quant_runtime="dequantized")[0]
    out["ppl_quantized"] = perplexity(model, ids, **ppl)
    return out


def comparison_table(cfg: QuantizeConfig, summary: dict, rows: list[dict], ids, tracker, run_dir: Path) -> None:
    """fp, the `compare` baselines and this job's checkpoint: perplexity, bits per weight and delta vs fp, as a W&B
    table, summary keys and comparison.md."""
    from pipelines.report import QUANT_COLUMNS, quant_comparison

    group = "" if cfg.method == "codequant" else f" g{cfg.group_size}"
    rows = rows + [{"method": cfg.method, "bits": f"{cfg.bits}{group}", "bits_per_weight": summary["bits_per_weight"],
                    "ppl": summary["ppl_quantized"]}]
    data, lines = quant_comparison(rows, summary["ppl_source"])
    tracker.table("quant_comparison", QUANT_COLUMNS, data)
    for method, _, bpw, p, delta, _ in data[1:]:
        summary[f"compare/{method}/ppl"], summary[f"compare/{method}/bpw"] = p, bpw
        summary[f"compare/{method}/ppl_delta"] = delta
    (run_dir / "comparison.md").write_text("\n".join(
        [f"Perplexity on {ids.numel()} tokens of {cfg.ppl_text} ({cfg.ppl_protocol}, window {cfg.ppl_window})", ""]
        + lines) + "\n")
    print("\n".join(lines))


def _checks(cfg: QuantizeConfig) -> tuple[QuantSpec, torch.Tensor | None]:
    """Everything the driver can check before Ray starts: method, bits and rank policy agree, the model resolves,
    the evaluation text loads."""
    bad = [m for m in cfg.compare if m not in ("rtn", "hqq", "milo", "kmeans")]
    if bad:
        raise ConfigError(f"config key 'compare': unknown methods {bad}; use rtn, hqq, milo or kmeans")
    if cfg.compare and not cfg.ppl_tokens:
        raise ConfigError("config key 'compare': the comparison is by perplexity, and ppl_tokens=0 skips it")
    spec = spec_of(cfg)
    try:
        spec.check()
    except QuantConfigError as exc:
        raise ConfigError(f"config key 'method': {cfg.method} with bits={cfg.bits}: {exc}") from None
    zoo.check_model(cfg.model.name)
    ppl_ids = None
    if cfg.ppl_tokens:  # the evaluation text is resolved before any work (a hub text offline stops here)
        tok = zoo.load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
        try:
            ppl_ids = tok(eval_text(cfg.ppl_text), return_tensors="pt").input_ids[0, -cfg.ppl_tokens:]
        except TextSourceError as exc:
            raise ConfigError(f"ppl_text={cfg.ppl_text}: {exc}") from None
    return spec, ppl_ids


def run(cfg: QuantizeConfig) -> tuple[str, dict]:
    import ray

    t_start = time.perf_counter()
    spec, ppl_ids = _checks(cfg)
    init_ray(cfg.ray)
    resources = dict(cfg.task_resources) or None
    planner = ray.remote(num_cpus=min(cfg.task_cpus, 1), resources=resources)(plan_source)
    plan = ray.get(planner.remote(cfg.model.name, spec, cfg.model.trust_remote_code))
    if "error" in plan:
        raise ConfigError(f"model {cfg.model.name!r}: {plan['error']}")
    if spec.rank_policy == "frequency" and spec.method == "milo":  # a model without routers is a config error
        stage = ray.remote(num_cpus=min(cfg.task_cpus, 1), num_gpus=cfg.task_gpus, resources=resources)
        freq = ray.get(stage(frequency_stage).remote(cfg))
        if "error" in freq:
            raise ConfigError(f"model {cfg.model.name!r}: {freq['error']}")
        spec.routing_frequency = freq["shares"]
    run_dir = make_run_dir(cfg, "quantize")
    resolved = save_config(cfg, run_dir, "quantize")
    settings = {k: v for k, v in spec.__dict__.items() if k != "routing_frequency"}
    if cfg.method == "codequant":  # what else shapes its tensors: a resume must not mix parts made otherwise
        settings["codequant"] = {k: getattr(cfg, k) for k in CODEQUANT_KEYS}
    spec_json = json.dumps(settings, sort_keys=True)
    _check_plan(run_dir, plan["fingerprint"], spec_json)
    tracker = Tracker(cfg.wandb, run_dir.path, "quantize", resolved)
    out = storage.join(run_dir.location, "model")
    items = plan["targets"]
    done = _done(run_dir, out, {t["name"] for t in items})
    todo = [t for t in items if t["name"] not in done]
    if done:
        print(f"resuming: {len(done)} of {len(items)} tensors already quantized in {out}")
    prepared = storage.join(run_dir.location, PREPARED) if cfg.method == "codequant" else None
    rest_written = None
    if prepared is not None:  # the rotation first: every CodeQuant task reads its rotated weight
        done_file = storage.join(prepared, "done.json")
        if storage.exists(done_file):
            rest_written = json.loads(storage.read_text(done_file))["written"]
        else:
            stage = ray.remote(num_cpus=_ppl_cpus(cfg), num_gpus=cfg.task_gpus, resources=resources)(codequant_stage)
            rest_written = ray.get(stage.remote(cfg, prepared, out))["written"]
    device = "cuda" if cfg.task_gpus else "cpu"
    task = ray.remote(num_cpus=cfg.task_cpus, num_gpus=cfg.task_gpus, resources=resources)(quantize_one)
    bar = tqdm(total=len(items), initial=len(done), desc=f"quantize {cfg.method}", unit="tensor")
    rows, t_quant = dict(done), time.perf_counter()
    sequential = cfg.method == "codequant" and cfg.sequential
    # sequential CodeQuant goes layer by layer (a layer's inputs need the layers before it quantized); else one wave
    waves = [[t for t in todo if t["layer"] == li] for li in sorted({t["layer"] for t in todo})] if sequential \
        else [todo]
    calibrator = None
    if sequential and todo:  # one actor for the run, on the CPU; holding CPUs, GPUs or custom resources would
        # starve the tasks, and it works only between their waves
        calibrator = ray.remote(num_cpus=0, num_gpus=0, max_restarts=2, max_task_retries=2,
                                scheduling_strategy=_node_with(resources))(LayerCalibrator).remote(
            cfg, prepared, out, max(1, int(_ppl_cpus(cfg))))
    layer_of = {t["name"]: t["layer"] for t in items}
    for wave in waves:
        if sequential:
            li = wave[0]["layer"]
            ray.get(calibrator.calibrate.remote(li, {n: r for n, r in rows.items() if layer_of[n] < li}))
        queue, in_flight = list(wave), {}
        while queue or in_flight:
            while queue and len(in_flight) < cfg.num_workers:
                item = queue.pop(0)
                ref = task.remote(item, spec, cfg.model.name, out, device, prepared,
                                  (cfg.finetune_steps, cfg.finetune_lr))
                in_flight[ref] = item["name"]
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            in_flight.pop(ref)
            row = ray.get(ref)
            rows[row["name"]] = row
            append_jsonl(run_dir / "tensors.jsonl", row)
            run_dir.sync(every_s=cfg.run.sync_s)  # a resumed run, on any node, redoes nothing storage holds
            bar.update()
    bar.close()
    if calibrator is not None:
        ray.kill(calibrator)
    quantize_s = time.perf_counter() - t_quant
    block_stats: dict = {}
    if cfg.method == "codequant" and cfg.block_finetune_steps:
        stage = ray.remote(num_cpus=_ppl_cpus(cfg), num_gpus=cfg.task_gpus, resources=resources)(block_stage)
        updated, block_stats = ray.get(stage.remote(cfg, prepared, out, rows))
        for name, row in updated.items():
            rows[name] = row
            append_jsonl(run_dir / "tensors.jsonl", row)
    if rest_written is not None:  # CodeQuant: the rotated rest (norms folded), written by its global stage
        written = dict(rest_written)
    else:
        writer = ray.remote(num_cpus=min(cfg.task_cpus, 1), resources=resources)(write_model_files)
        written = ray.get(writer.remote(cfg.model.name, plan["rest"], out))
    written.update({r["file"]: {"size": r["size"], "sha256": r["sha256"]} for r in rows.values()})
    weights = sum(r["weights"] for r in rows.values())
    bpw = sum(r["bits"] for r in rows.values()) / weights
    meta = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "rank_policy": cfg.rank_policy,
            "spec": json.loads(spec_json), "source_model": cfg.model.name, "source_fingerprint": plan["fingerprint"],
            "bits_per_weight": bpw}
    if cfg.method == "codequant":
        meta.update(block_finetune_steps=cfg.block_finetune_steps, router_kl_weight=cfg.router_kl_weight)
    ckpt.write_manifest(run_dir.path / "model", meta, {n: rows[n]["entry"] for n in sorted(rows)},
                        {f: v["sha256"] for f, v in written.items() if f == "rest.safetensors" or f.startswith(TENSORS)})
    checkpoint = run_dir.publish("model", written=written)
    for t in items if prepared is not None else ():  # the rotated fp32 copies; the rotation and record stay
        run_dir.remove(PREPARED, f"{t['name']}.safetensors")
    fresh = [r for r in rows.values() if r["name"] not in done]
    summary = {"checkpoint": checkpoint, "tensors": len(items), "tensors_resumed": len(done),
               "tensors_quantized": len(todo), "bits_per_weight": bpw, "quantize_s": quantize_s,
               "task_s": sum(r["seconds"] for r in fresh), "num_workers": cfg.num_workers, "method": cfg.method,
               "source_bytes": plan["source_bytes"], "largest_tensor_bytes": max(t["bytes"] for t in items),
               "task_peak_rss_bytes": max((r["peak_rss_bytes"] for r in fresh), default=0),
               "task_nodes": len({r["node"] for r in fresh}), **block_stats}
    if ppl_ids is not None:
        stage = ray.remote(num_cpus=_ppl_cpus(cfg), num_gpus=cfg.task_gpus, resources=resources)(ppl_stage)
        ppl = ray.get(stage.remote(cfg, checkpoint, ppl_ids))
        summary.update(ppl_source=ppl["ppl_source"], ppl_quantized=ppl["ppl_quantized"], ppl_text=cfg.ppl_text,
                       ppl_protocol=cfg.ppl_protocol, ppl_tokens=int(ppl_ids.numel()))
        comparison_table(cfg, summary, ppl["rows"], ppl_ids, tracker, run_dir.path)
    summary["wall_s"] = time.perf_counter() - t_start
    summary["driver_peak_rss_bytes"] = _rss("VmHWM")  # this process's peak (0 off Linux)
    write_json(run_dir / "summary.json", summary)
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.finish()
    run_dir.sync()
    print(json.dumps(summary, indent=2))
    print(f"quantize: checkpoint {checkpoint}")
    return checkpoint, summary


def _node_with(resources: dict | None):
    """A scheduling strategy for an actor that must run where tasks asking for `resources` run without holding
    them: (soft) affinity to an alive node that has them; Ray's default when there are none."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for node in ray.nodes() if resources else ():
        if node.get("Alive") and all(node["Resources"].get(k, 0) >= v for k, v in resources.items()):
            return NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)
    return "DEFAULT"


def _ppl_cpus(cfg: QuantizeConfig) -> float:
    """The perplexity stage's CPUs: `ppl_cpus`, at most what the largest node has (so it can be placed)."""
    import ray

    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return max(min(cfg.ppl_cpus, largest), 0)


def main(argv: list[str] | None = None) -> None:
    run_cli("quantize", run, argv)


if __name__ == "__main__":
    main()

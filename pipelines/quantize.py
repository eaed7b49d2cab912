"""Quantize a model (MoE-aware) into a checkpoint, as Ray tasks, resumably.

    python -m pipelines.quantize                      # demo: MiLo 3-bit g64 on the demo MoE (smollm2-moe-8x)
    python -m pipelines.quantize method=hqq           # plain HQQ 3-bit g64
    python -m pipelines.quantize tiny                 # a random tiny Mixtral, seconds
    python -m pipelines.quantize run.resume=runs/quantize/<dir>   # finish a killed run
    python -m pipelines.evaluate target.model.name=runs/quantize/<dir>/model   # serve the result

MiLo and HQQ are data-free: one Ray task per weight matrix (`num_workers` in flight). Each finished tensor is
written at once to <run>/parts/ (and synced to run storage), so a killed job resumes, on any node, without redoing
it. The checkpoint (see `quant.checkpoint`) is assembled at the end into <run>/model, published with a manifest
(its location is the summary's `checkpoint`: what `target.model.name` takes), loaded back, and its perplexity is
measured beside the source's; the parts are then removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from actors import zoo
from actors.hosts import init_ray
from pipelines.cli import run_cli
from pipelines.schema import ConfigError, QuantizeConfig
from pipelines.runs import make_run_dir, save_config, write_json
from pipelines.tracking import Tracker
from quant import checkpoint as ckpt
from quant.apply import QuantSpec, plan, quantize_tensor, storage_bits
from quant.base import QuantConfigError
from quant.perplexity import TextSourceError, eval_text, perplexity, pydoc_text


CODEQUANT_KEYS = ("calib_tokens", "rotation_steps", "rotation_lr", "rotation_batch", "codebook_weighting",
                  "expert_tokens", "finetune_steps", "finetune_lr")


def spec_of(cfg: QuantizeConfig) -> QuantSpec:
    method = "kmeans" if cfg.method == "codequant" else cfg.method  # codequant clusters like kmeans, after rotating
    group = 0 if method == "kmeans" else cfg.group_size
    return QuantSpec(method, cfg.bits, group, cfg.rank_policy, cfg.rank_dense, cfg.rank_expert,
                     cfg.rank_max, cfg.rounds, cfg.seed, pad_groups=cfg.pad_groups,
                     activation_weighted=cfg.method == "codequant" and cfg.codebook_weighting == "activation")


def rotate_for_codequant(cfg: QuantizeConfig, model, tok):
    """CodeQuant's global part, in the driver: fold norms, learn and fuse the rotation; returns each target's
    calibration input (what its codebook is fine-tuned against)."""
    from quant.codequant import _linear_inputs, _target_input, fold_norms, fuse_rotation, learn_rotation, norm_outputs

    ids = tok(pydoc_text(), return_tensors="pt").input_ids[0, :cfg.calib_tokens]
    fold_norms(model)
    x = norm_outputs(model, ids)
    r, losses = learn_rotation(x, cfg.rotation_steps, cfg.rotation_lr, cfg.seed, cfg.rotation_batch)
    fuse_rotation(model, r)
    inputs = _linear_inputs(model, ids)
    print(f"rotation: 4-bit activation error {losses[0]:.3g} -> {losses[-1]:.3g}")
    from quant.targets import quant_targets

    routed = cfg.expert_tokens == "routed"
    return {t.name: _target_input(t, inputs, model, routed).detach() for t in quant_targets(model)}


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


def _part_path(parts: Path, name: str) -> Path:
    return parts / f"{name}.safetensors"


def _check_parts(parts: Path, source: str, spec_json: str) -> Path:
    """Refuse parts of another model or config (a resumed run whose source model changed on disk); nothing is
    deleted."""
    meta = parts / "meta.json"
    if meta.is_file():
        saved = json.loads(meta.read_text())
        if saved != {"source_fingerprint": source, "spec": json.loads(spec_json)}:
            raise ConfigError(f"{parts} holds partial work of another model or config (the source model changed "
                              "since the run started?); start a new run")
    parts.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"source_fingerprint": source, "spec": json.loads(spec_json)}))
    return parts


def _task(w: torch.Tensor, spec: QuantSpec, rank: int, name: str, threads: int, calib=None, finetune=(0, 0.0)):
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result = quantize_tensor(w, spec, rank, calib)
    if calib is not None and finetune[0]:  # CodeQuant: fine-tune the centroids against the fp output
        from quant.codequant import finetune_centroids

        result = finetune_centroids(result, w, calib.float(), finetune[0], finetune[1])
    return ckpt.tensors_of(name, result), ckpt.manifest_entry(result, ""), time.perf_counter() - t0


def block_finetune(cfg: QuantizeConfig, model, tok, items, results: dict) -> tuple[dict, dict]:
    """CodeQuant's block-level centroid fine-tuning in the driver (layer by layer: each layer sees the quantized
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


def comparison_table(cfg: QuantizeConfig, model, summary: dict, ids, ppl: dict, tracker, run_dir: Path) -> None:
    """fp, the `compare` baselines (fake-quantized copies of the source at the same bits and group) and this job's
    checkpoint: perplexity, bits per weight and delta vs fp, as a W&B table, summary keys and comparison.md."""
    import copy

    from pipelines.report import QUANT_COLUMNS, quant_comparison
    from quant.apply import fake_quantize

    rows = []
    for method in cfg.compare:
        bits = 4 if method == "kmeans" else cfg.bits
        spec = spec_of(dataclasses.replace(cfg, method=method, bits=bits))
        m = copy.deepcopy(model)
        acc = fake_quantize(m, spec)
        rows.append({"method": method, "bits": f"{bits}" + (f" g{spec.group_size}" if spec.group_size else ""),
                     "bits_per_weight": acc["bits_per_weight"], "ppl": perplexity(m, ids, **ppl)})
        del m
    group = "" if cfg.method == "codequant" else f" g{cfg.group_size}"
    rows.append({"method": cfg.method, "bits": f"{cfg.bits}{group}", "bits_per_weight": summary["bits_per_weight"],
                 "ppl": summary["ppl_quantized"]})
    data, lines = quant_comparison(rows, summary["ppl_source"])
    tracker.table("quant_comparison", QUANT_COLUMNS, data)
    for method, _, bpw, p, delta, _ in data[1:]:
        summary[f"compare/{method}/ppl"], summary[f"compare/{method}/bpw"] = p, bpw
        summary[f"compare/{method}/ppl_delta"] = delta
    (run_dir / "comparison.md").write_text("\n".join(
        [f"Perplexity on {ids.numel()} tokens of {cfg.ppl_text} ({cfg.ppl_protocol}, window {cfg.ppl_window})", ""]
        + lines) + "\n")
    print("\n".join(lines))


def run(cfg: QuantizeConfig) -> tuple[Path, dict]:
    import ray

    t_start = time.perf_counter()
    bad = [m for m in cfg.compare if m not in ("rtn", "hqq", "milo", "kmeans")]
    if bad:
        raise ConfigError(f"config key 'compare': unknown methods {bad}; use rtn, hqq, milo or kmeans")
    if cfg.compare and not cfg.ppl_tokens:
        raise ConfigError("config key 'compare': the comparison is by perplexity, and ppl_tokens=0 skips it")
    spec = spec_of(cfg)
    try:  # method, bits and rank policy agree, before the model loads
        spec.check()
    except QuantConfigError as exc:
        raise ConfigError(f"config key 'method': {cfg.method} with bits={cfg.bits}: {exc}") from None
    zoo.check_model(cfg.model.name)
    model, tok = zoo.load_model(cfg.model.name, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    calib = rotate_for_codequant(cfg, model, tok) if cfg.method == "codequant" else {}
    try:
        if cfg.rank_policy == "frequency" and cfg.method == "milo":  # a dense model has no routers: stop here
            spec.routing_frequency = routing_frequency(model, tok, cfg.routing_tokens)
        items = plan(model, spec)  # every setting checked before any work
    except QuantConfigError as exc:
        raise ConfigError(str(exc)) from None
    ppl_ids = None
    if cfg.ppl_tokens:  # the evaluation text is resolved before any work (a hub text offline stops here)
        try:
            ppl_ids = tok(eval_text(cfg.ppl_text), return_tensors="pt").input_ids[0, -cfg.ppl_tokens:]
        except TextSourceError as exc:
            raise ConfigError(f"ppl_text={cfg.ppl_text}: {exc}") from None
    run_dir = make_run_dir(cfg, "quantize")
    resolved = save_config(cfg, run_dir, "quantize")
    out = run_dir / "model"
    source = ckpt.fingerprint(model)
    settings = {k: v for k, v in spec.__dict__.items() if k != "routing_frequency"}
    if cfg.method == "codequant":  # what else shapes its tensors: a resume must not mix parts made otherwise
        settings["codequant"] = {k: getattr(cfg, k) for k in CODEQUANT_KEYS}
    spec_json = json.dumps(settings, sort_keys=True)
    parts = _check_parts(run_dir / "parts", source, spec_json)
    tracker = Tracker(cfg.wandb, run_dir.path, "quantize", resolved)
    todo = [(t, r) for t, r in items if not _part_path(parts, t.name).is_file()]
    if len(todo) < len(items):
        print(f"resuming: {len(items) - len(todo)} of {len(items)} tensors already quantized in {parts}")
    init_ray(cfg.ray)
    remote = ray.remote(num_cpus=cfg.task_cpus, resources=dict(cfg.task_resources) or None)(_task)
    threads = max(1, int(cfg.task_cpus))
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"quantize {cfg.method}", unit="tensor")
    in_flight: dict = {}
    task_s = 0.0
    t_quant = time.perf_counter()
    queue = list(todo)
    while queue or in_flight:
        while queue and len(in_flight) < cfg.num_workers:
            target, rank = queue.pop(0)
            ref = remote.remote(target.get().detach().float().clone(), spec, rank, target.name, threads,
                                calib.get(target.name), (cfg.finetune_steps, cfg.finetune_lr))
            in_flight[ref] = target.name
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        name = in_flight.pop(ref)
        tensors, entry, seconds = ray.get(ref)
        task_s += seconds
        tmp = _part_path(parts, name).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"entry": json.dumps(entry)})
        os.replace(tmp, _part_path(parts, name))  # a part exists only when complete
        run_dir.sync(every_s=cfg.run.sync_s)  # a resumed run, on any node, redoes nothing storage holds
        bar.update()
    bar.close()
    quantize_s = time.perf_counter() - t_quant

    results = {}
    for target, _ in items:
        path = _part_path(parts, target.name)
        with safe_open(str(path), "pt") as f:
            entry = json.loads(f.metadata()["entry"])
        results[target.name] = ckpt.result_from(load_file(str(path)), target.name, entry)
    block_stats: dict = {}
    if cfg.method == "codequant" and cfg.block_finetune_steps:
        results, block_stats = block_finetune(cfg, model, tok, items, results)
    weights = sum(t.get().numel() for t, _ in items)
    bpw = sum(storage_bits(r) for r in results.values()) / weights
    meta = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "rank_policy": cfg.rank_policy,
            "spec": json.loads(spec_json), "source_model": cfg.model.name, "source_fingerprint": source,
            "bits_per_weight": bpw}
    if cfg.method == "codequant":
        meta.update(block_finetune_steps=cfg.block_finetune_steps, router_kl_weight=cfg.router_kl_weight)
    ckpt.save(out, model, tok, results, meta)
    checkpoint = run_dir.publish("model")
    run_dir.remove("parts")  # all in the checkpoint now
    summary = {"checkpoint": checkpoint, "tensors": len(items), "tensors_resumed": len(items) - len(todo),
               "tensors_quantized": len(todo), "bits_per_weight": bpw, "quantize_s": quantize_s, "task_s": task_s,
               "num_workers": cfg.num_workers, "method": cfg.method, **block_stats}
    if ppl_ids is not None:
        ppl = {"window": cfg.ppl_window, "stride": cfg.ppl_stride or None, "protocol": cfg.ppl_protocol}
        summary["ppl_source"] = perplexity(model, ppl_ids, **ppl)  # (rotated, for codequant: same outputs)
        summary["ppl_quantized"] = perplexity(ckpt.load_quantized(out), ppl_ids, **ppl)
        summary.update(ppl_text=cfg.ppl_text, ppl_protocol=cfg.ppl_protocol, ppl_tokens=int(ppl_ids.numel()))
        comparison_table(cfg, model, summary, ppl_ids, ppl, tracker, run_dir.path)
    summary["wall_s"] = time.perf_counter() - t_start
    write_json(run_dir / "summary.json", summary)
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.finish()
    run_dir.sync()
    print(json.dumps(summary, indent=2))
    print(f"quantize: checkpoint {checkpoint}")
    return checkpoint, summary


def main(argv: list[str] | None = None) -> None:
    run_cli("quantize", run, argv)


if __name__ == "__main__":
    main()

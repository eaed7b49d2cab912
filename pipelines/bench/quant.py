"""`python -m pipelines.bench quant`: perplexity and honest bits per weight of every quantization method.

On the demo MoE (`--moe`, default `smollm2-moe-8x`), perplexity on the last `--ppl-tokens` of pydoc text
(512-token windows) of fp, RTN and HQQ 3-bit g64, MiLo 3-bit g64 (uniform ranks 16 dense / 8 experts; also the
kurtosis policy capped at 64 and the routing-frequency policy, mean expert rank 8: *_milo3_g64_kurtosis /
_frequency with mean_rank_*), RTN 4-bit g128 (last group zero-padded: 576 = 4.5 x 128), per-row 16-centroid k-means
codebooks; bits per weight count codes, scales, zeros, codebooks and compensators; CodeQuant (rotation + codebooks
+ centroid fine-tuning, and with `--block-steps` the block-level stage); W4A4 perplexities (4-bit per-token
activations) of k-means and CodeQuant; our HQQ's reconstruction error over the `hqq` package's (when installed);
and the quantize job's wall time with 1 and 2 workers.
"""

from __future__ import annotations

import time

import torch

from actors import zoo
from quant.perplexity import pydoc_text

VARIANTS = ("rtn3_g64", "hqq3_g64", "milo3_g64", "rtn4_g128", "kmeans4", "milo3_g64_kurtosis", "milo3_g64_frequency")
KEYS = ("model", "ppl_tokens", "ppl_window", "note", "ppl_fp",
        *(f"{k}_{v}" for v in VARIANTS for k in ("ppl", "bpw", "fake_quantize_s")),
        *(f"mean_rank_{v}" for v in VARIANTS if v.startswith("milo")), "ppl_kmeans4_a4",
        "ppl_codequant4", "bpw_codequant4", "codequant_rotation_act4_error_before_after", "fake_quantize_s_codequant4",
        "ppl_codequant4_a4", "ppl_codequant4_block", "block_finetune_s", "block_steps", "block_mse_before_after_mean",
        "block_kl_before_after_mean", "milo_vs_hqq_ppl_increase_ratio", "milo_extra_bpw",
        "hqq_ours_vs_package_error_ratio", "quantize_s_1_worker", "quantize_s_2_workers")


def run(args) -> dict:
    import copy

    from pipelines.config import load_config
    from pipelines.schema import QuantizeConfig
    from pipelines.quantize import routing_frequency, run as quantize_run
    from quant.apply import QuantSpec, fake_quantize
    from quant.base import quantize_hqq
    from quant.codequant import (CodeQuantSpec, add_activation_fake_quant, codequant, finetune_blocks, fold_norms,
                                 fuse_rotation)
    from quant.perplexity import perplexity
    from quant.targets import quant_targets

    base, tok = zoo.load_model(args.moe, device="cpu")
    ids = tok(pydoc_text(), return_tensors="pt").input_ids[0, -args.ppl_tokens:]
    out: dict = {"model": args.moe, "ppl_tokens": len(ids), "ppl_window": 512,
                 "note": "SmolLM2's weights were stored as Q4_1 (a 4-bit grid) before we built the MoE"}
    out["ppl_fp"] = perplexity(base, ids, 512)
    variants = {"rtn3_g64": QuantSpec("rtn", 3, 64), "hqq3_g64": QuantSpec("hqq", 3, 64),
                "milo3_g64": QuantSpec("milo", 3, 64, rank_dense=16, rank_expert=8, rounds=args.rounds),
                "rtn4_g128": QuantSpec("rtn", 4, 128, pad_groups=True), "kmeans4": QuantSpec("kmeans", 4, 0),
                # MiLo's other rank policies at about the uniform budget (mean expert rank ~8 either way)
                "milo3_g64_kurtosis": QuantSpec("milo", 3, 64, rank_policy="kurtosis", rank_max=64,
                                                rounds=args.rounds),
                "milo3_g64_frequency": QuantSpec("milo", 3, 64, rank_policy="frequency", rank_dense=16,
                                                 rank_expert=8, rounds=args.rounds,
                                                 routing_frequency=routing_frequency(base, tok, 2048))}
    for key, spec in variants.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        acc = fake_quantize(model, spec)
        out[f"ppl_{key}"] = perplexity(model, ids, 512)
        out[f"bpw_{key}"] = acc["bits_per_weight"]
        out[f"fake_quantize_s_{key}"] = time.perf_counter() - t0
        if spec.method == "milo":
            out[f"mean_rank_{key}"] = acc["mean_rank"]  # {"dense": ..., "expert": ...}
        print(key, out[f"ppl_{key}"], out[f"bpw_{key}"], flush=True)
        if key == "kmeans4":  # W4A4: the same codebooks with 4-bit per-token activations
            add_activation_fake_quant(model)
            out["ppl_kmeans4_a4"] = perplexity(model, ids, 512)
    calib = tok(pydoc_text(), return_tensors="pt").input_ids[0, :args.calib_tokens]
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    cq = codequant(model, calib, CodeQuantSpec(calib_tokens=args.calib_tokens))
    out["ppl_codequant4"] = perplexity(model, ids, 512)
    out["bpw_codequant4"] = sum(r.bits_per_weight() * r.shape[0] * r.shape[1] for r in cq["results"].values()) / sum(
        r.shape[0] * r.shape[1] for r in cq["results"].values())
    out["codequant_rotation_act4_error_before_after"] = [cq["rotation_loss_first"], cq["rotation_loss_last"]]
    out["fake_quantize_s_codequant4"] = time.perf_counter() - t0
    add_activation_fake_quant(model)
    out["ppl_codequant4_a4"] = perplexity(model, ids, 512)
    if args.block_steps:  # the block-level stage on the same rotation and codebooks (CodeQuant's full recipe)
        model = copy.deepcopy(base)
        fold_norms(model)
        fuse_rotation(model, cq["rotation"])
        t0 = time.perf_counter()
        results = dict(cq["results"])
        stats = finetune_blocks(model, calib, results, args.block_steps, CodeQuantSpec.finetune_lr,
                                CodeQuantSpec.router_kl_weight)
        out["ppl_codequant4_block"] = perplexity(model, ids, 512)
        out["block_finetune_s"] = time.perf_counter() - t0
        out["block_steps"] = args.block_steps
        out["block_mse_before_after_mean"] = [sum(v[k] for v in stats.values()) / len(stats)
                                              for k in ("mse_before", "mse_after")]
        out["block_kl_before_after_mean"] = [sum(v[k] for v in stats.values()) / len(stats)
                                             for k in ("kl_before", "kl_after")]
        print("codequant4 + block", out["ppl_codequant4_block"], flush=True)
    increase = lambda k: out[f"ppl_{k}"] - out["ppl_fp"]  # noqa: E731
    out["milo_vs_hqq_ppl_increase_ratio"] = increase("milo3_g64") / increase("hqq3_g64")
    out["milo_extra_bpw"] = out["bpw_milo3_g64"] - out["bpw_hqq3_g64"]
    try:
        from hqq.core.quantize import Quantizer

        ours = pkg = 0.0
        for t in quant_targets(base):
            w = t.get().float()
            q, meta = Quantizer.quantize(w, nbits=3, channel_wise=True, group_size=64, optimize=True,
                                         round_zero=False, axis=1, bitpack=False, compute_dtype=torch.float32,
                                         device="cpu")
            pkg += (w - Quantizer.dequantize(q, meta).float().reshape(w.shape)).pow(2).sum().item()
            ours += (w - quantize_hqq(w, 3, 64).dequantize()).pow(2).sum().item()
        out["hqq_ours_vs_package_error_ratio"] = ours / pkg
    except ImportError:
        out["hqq_ours_vs_package_error_ratio"] = None  # pip install hqq to measure it
    for workers in (1, 2):
        cfg = load_config(QuantizeConfig, "quantize", [
            "demo", f"run.storage={args.run_dir}", f"run.name=bench-quant-{workers}w", f"num_workers={workers}",
            f"rounds={args.rounds}", "ppl_tokens=0", f"model.name={args.moe}"])
        _, summary = quantize_run(cfg)
        out[f"quantize_s_{workers}_worker" + ("s" if workers > 1 else "")] = summary["quantize_s"]
    import ray

    ray.shutdown()
    return out

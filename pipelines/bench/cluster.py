"""`python -m pipelines.bench cluster`: the quantize job on a multi-node Ray, on a model bigger than its driver.

A synthetic MoE checkpoint (3.1 GB of bf16 safetensors shards by default, random weights) from a real config scaled
down: Qwen3-30B-A3B's (hidden 2048, experts of 768, top-8, 32 heads / 4 KV heads of 128, vocab 151,936, untied head)
with `--cluster-layers` layers (2) of `--cluster-experts` experts (96 of its 128). Quantized with `method=hqq bits=3` (group 64), the driver as its own
process (`python -m pipelines.quantize`, so its peak RSS is its own), on `ray.cluster_utils.Cluster`:
- `quantize_driver_peak_rss_over_model_bytes`: the driver's peak RSS (its VmHWM, which it writes into its summary)
  over the checkpoint's bytes;
- `quantize_task_peak_rss_over_largest_tensor_bytes`: the largest peak RSS a task reached above its idle RSS, over
  the largest stored tensor's bytes (the job's summary: `task_peak_rss_bytes`, `largest_tensor_bytes`);
- `quantize_s_3_nodes_vs_1_node`: the job's wall time with its tasks on a 3-node cluster (head + 2 workers, one CPU
  each) over one node with the same task slots: the median of `--cluster-runs` interleaved pairs (each pair's ratio
  in `quantize_s_3_nodes_vs_1_node_runs`; `quantize_s_1_node`, `quantize_s_3_nodes`: the medians of each side's
  times, every time in `quantize_s_runs`); the cores are shared here, so spreading can only show its cost;
- `resume_after_node_loss_redone_tensors`: on the 3-node cluster, a worker node is removed when a third of the
  tensors are stored; the job finishes (Ray retries the lost node's tasks), and every tensor written twice is
  counted (each write leaves a marker): 0 when nothing stored was redone. `node_loss_tensors_lost` counts
  tensors missing from the published checkpoint (0).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipelines.bench.common import stage

KEYS = ("model", "model_bytes", "tensors", "largest_tensor_bytes", "driver_peak_rss_bytes",
        "quantize_driver_peak_rss_over_model_bytes", "task_peak_rss_bytes",
        "quantize_task_peak_rss_over_largest_tensor_bytes", "quantize_s_1_node", "quantize_s_3_nodes",
        "quantize_s_3_nodes_vs_1_node", "quantize_s_3_nodes_vs_1_node_runs", "quantize_s_runs", "task_nodes_3_nodes", "resume_after_node_loss_redone_tensors",
        "node_loss_tensors_lost", "node_loss_tensors_stored_before", "node_loss_quantize_s", "method", "note")
ROOT = Path(__file__).resolve().parents[2]


def synthetic_moe(out: Path, layers: int, experts: int = 128) -> int:
    """Write the synthetic Qwen3-MoE checkpoint (one shard per layer, plus one for embeddings and head); returns its
    bytes. Built once per directory."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen3MoeConfig

    from actors import zoo

    if (out / "config.json").is_file():
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=experts,
                         num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         vocab_size=151936, num_hidden_layers=layers, tie_word_embeddings=False,
                         max_position_embeddings=4096, norm_topk_prob=True)
    cfg.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(zoo.local_dir(zoo.SMOLLM2))).save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)
    h, i, e, v = 2048, 768, experts, 151936

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).bfloat16()

    save_file({"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}, str(tmp / "model-head.safetensors"))
    for li in range(layers):
        p = f"model.layers.{li}."
        t = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": rand(32 * 128, h), p + "self_attn.k_proj.weight": rand(4 * 128, h),
             p + "self_attn.v_proj.weight": rand(4 * 128, h), p + "self_attn.o_proj.weight": rand(h, 32 * 128),
             p + "self_attn.q_norm.weight": torch.ones(128, dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(128, dtype=torch.bfloat16),
             p + "mlp.gate.weight": rand(e, h)}
        for x in range(e):
            t[f"{p}mlp.experts.{x}.gate_proj.weight"] = rand(i, h)
            t[f"{p}mlp.experts.{x}.up_proj.weight"] = rand(i, h)
            t[f"{p}mlp.experts.{x}.down_proj.weight"] = rand(h, i)
        save_file(t, str(tmp / f"model-layer{li:03d}.safetensors"))
        del t
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def _driver(model: Path, storage: Path, address: str, extra: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_MODE": "disabled",
                                                                          "RAY_ADDRESS": address}
    return subprocess.Popen([sys.executable, "-m", "pipelines.quantize", f"model.name={model}", "method=hqq",
                             "bits=3", "group_size=64", "ppl_tokens=0", f"run.storage={storage}", "num_workers=2",
                             "wandb.mode=disabled", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> str:
    """The driver's output. (Its peak RSS is in its summary, `driver_peak_rss_bytes`, read by the driver itself:
    the ru_maxrss that wait4 reports counts this process's pages at the fork, the synthetic model's among them.)"""
    out = proc.stdout.read()
    if proc.wait():
        raise RuntimeError(f"quantize driver failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def _summary(storage: Path) -> dict:
    [run] = list(storage.glob("quantize/*"))
    return json.loads((run / "summary.json").read_text())


def _cluster(nodes: int):
    from ray.cluster_utils import Cluster

    if nodes == 1:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    else:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(nodes - 1):
            c.add_node(num_cpus=1)
    c.wait_for_nodes()
    return c


def run(args) -> dict:
    work = Path(args.cluster_dir or tempfile.mkdtemp(prefix="specmoe-bench-cluster-"))
    model = work / "model"
    t = stage("cluster", f"synthetic Qwen3-MoE checkpoint ({args.cluster_layers} layers) in {model}")
    model_bytes = synthetic_moe(model, args.cluster_layers, args.cluster_experts)
    print(f"{model_bytes / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    out: dict = {"model": f"synthetic qwen3-moe (Qwen3-30B-A3B config, {args.cluster_layers} layers, "
                          f"{args.cluster_experts} experts, bf16)",
                 "model_bytes": model_bytes, "method": "hqq 3-bit g64"}
    times: dict[int, list[float]] = {1: [], 3: []}
    for rep, nodes in [(r, n) for r in range(args.cluster_runs) for n in (1, 3)]:
        stage("cluster", f"quantize on {nodes} node(s), pair {rep + 1} of {args.cluster_runs}")
        storage = work / f"runs-{nodes}"
        shutil.rmtree(storage, ignore_errors=True)
        c = _cluster(nodes)
        try:
            text = _wait(_driver(model, storage, c.address, []))
        finally:
            c.shutdown()
        s = _summary(storage)
        print(text[-600:])
        times[nodes].append(s["quantize_s"])
        if nodes == 1 and rep == 0:
            rss = s["driver_peak_rss_bytes"]
            out.update(tensors=s["tensors"], largest_tensor_bytes=s["largest_tensor_bytes"],
                       driver_peak_rss_bytes=rss, quantize_driver_peak_rss_over_model_bytes=rss / model_bytes,
                       task_peak_rss_bytes=s["task_peak_rss_bytes"],
                       quantize_task_peak_rss_over_largest_tensor_bytes=s["task_peak_rss_bytes"]
                       / s["largest_tensor_bytes"])
        else:
            out["task_nodes_3_nodes"] = s["task_nodes"]
        shutil.rmtree(storage, ignore_errors=True)
    ratios = [three / one for one, three in zip(times[1], times[3])]
    out.update(quantize_s_1_node=statistics.median(times[1]), quantize_s_3_nodes=statistics.median(times[3]),
               quantize_s_3_nodes_vs_1_node=statistics.median(ratios), quantize_s_3_nodes_vs_1_node_runs=ratios,
               quantize_s_runs={"1_node": times[1], "3_nodes": times[3]})
    out.update(_node_loss(model, work))
    out["note"] = (f"the spreading ratio is the median of {args.cluster_runs} interleaved 1-node / 3-node pairs, the "
                   "memory and node-loss figures one run each (each run quantizes the whole model: minutes on 2 "
                   "cores); tasks of both clusters share this machine's cores")
    return out


def _node_loss(model: Path, work: Path) -> dict:
    stage("cluster", "quantize on 3 nodes, a worker node removed a third of the way")
    storage, log = work / "runs-loss", work / "writes"
    shutil.rmtree(storage, ignore_errors=True)
    shutil.rmtree(log, ignore_errors=True)
    os.environ["SPECMOE_QUANT_WRITE_LOG"] = str(log)  # the nodes started below inherit it
    c = _cluster(3)
    try:
        proc = _driver(model, storage, c.address, [])
        layers = len(list(model.glob("model-layer*.safetensors")))
        experts = json.loads((model / "config.json").read_text())["num_local_experts"]
        total = layers * (4 + 2 * experts)  # attention q/k/v/o and every expert's gate_up and down, per layer
        stored = 0
        while proc.poll() is None:
            ledgers = list(storage.glob("quantize/*/tensors.jsonl"))
            stored = sum(1 for _ in open(ledgers[0])) if ledgers else 0
            if stored >= total // 3:
                worker = [n for n in c.worker_nodes][-1]
                c.remove_node(worker)
                print(f"removed a worker node with {stored} of ~{total} tensors stored", flush=True)
                break
            time.sleep(0.5)
        _wait(proc)
    finally:
        os.environ.pop("SPECMOE_QUANT_WRITE_LOG", None)
        c.shutdown()
    s = _summary(storage)
    writes: dict[str, int] = {}
    for f in log.iterdir():
        name = f.name.rsplit(".", 1)[0]
        writes[name] = writes.get(name, 0) + 1
    [run] = list(storage.glob("quantize/*"))
    manifest = json.loads((run / "model" / "specmoe_quant.json").read_text())
    lost = sum(1 for e in manifest["tensors"].values() if not (run / "model" / e["shard"]).is_file())
    return {"resume_after_node_loss_redone_tensors": sum(n - 1 for n in writes.values()),
            "node_loss_tensors_lost": lost + s["tensors"] - len(manifest["tensors"]),
            "node_loss_tensors_stored_before": stored, "node_loss_quantize_s": s["quantize_s"]}


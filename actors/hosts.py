"""Ray actors that host an engine for one model role (target, draft, verifier), and how to start them.

`EngineHost` is a plain class: tests and notebooks use it directly (`EngineHost(role_cfg).engine`); `start_host`
wraps it as an async Ray actor with the role's resources, restarts and placement. Concurrent `generate` calls
from many controllers land in one engine, which batches them (continuous batching): this is the "one batched
target pass" of Lookahead Reasoning. A caller that cancels its Ray call (`ray.cancel`) cancels its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import asdict, replace

import torch

from actors import zoo
from actors.cpus import actor_threads
from actors.engine import Engine, Request, Result, Speculation

log = logging.getLogger(__name__)


def build_engine(role) -> Engine:
    """An engine for a `pipelines.config.RoleConfig` (or its dict form)."""
    model_cfg, engine_cfg = role.model, role.engine
    torch.set_num_threads(engine_cfg.torch_threads or actor_threads())
    model, tok = zoo.load_model(model_cfg.name, model_cfg.dtype, model_cfg.device, model_cfg.trust_remote_code,
                                model_cfg.quant_runtime, model_cfg.quant_backend)
    spec_cfg = engine_cfg.speculation
    draft = None
    if spec_cfg.method == "draft":
        d = spec_cfg.draft_model
        draft, draft_tok = zoo.load_model(d.name, d.dtype, d.device, d.trust_remote_code)
        if draft_tok.get_vocab() != tok.get_vocab():
            raise ValueError(f"draft {d.name!r} uses another tokenizer than target {model_cfg.name!r}: "
                             "token-level SD needs the same tokenizer")
    spec = Speculation(spec_cfg.method, spec_cfg.num_tokens, spec_cfg.ngram_max, spec_cfg.ngram_min)
    return Engine(model, tok, draft_model=draft, speculation=spec,
                  prefix_cache_tokens=engine_cfg.prefix_cache_tokens, max_batch=engine_cfg.max_batch,
                  kv_budget_bytes=int(engine_cfg.kv_budget_mb * 2**20))


class EngineHost:
    def __init__(self, role_name: str, role):
        self.role_name = role_name
        self.model_name = role.model.name
        self.engine = build_engine(role)
        self._futures: dict[str, asyncio.Future] = {}
        self._loop_task: asyncio.Task | None = None

    @classmethod
    def from_engine(cls, engine: Engine, role_name: str = "target", model_name: str = "") -> "EngineHost":
        """An in-process host around an existing engine (tests, notebooks)."""
        host = cls.__new__(cls)
        host.role_name, host.model_name, host.engine = role_name, model_name, engine
        host._futures, host._loop_task = {}, None
        return host

    def info(self) -> dict:
        eng = self.engine
        return {"role": self.role_name, "model": self.model_name, "device": str(eng.target.device),
                "dtype": str(eng.target.dtype), "vocab_size": eng.target.model.config.vocab_size,
                "eos_ids": sorted(eng.eos_ids), "speculation": asdict(eng.speculation),
                "torch_threads": torch.get_num_threads(), "pid": os.getpid()}

    async def generate(self, requests: list[Request]) -> list[Result]:
        loop = asyncio.get_running_loop()
        ids, futures = [], []
        for req in requests:
            req.request_id = ""  # ids are the engine's: unique across callers
            rid = self.engine.submit(req)
            fut = loop.create_future()
            self._futures[rid] = fut
            ids.append(rid)
            futures.append(fut)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run())
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for rid in ids:
                self.engine.cancel(rid)
            raise

    async def settle(self) -> None:
        """Return once the engine has dropped the requests its callers cancelled. An actor's loop outlives a call;
        in-process (tests, notebooks) the caller's event loop may end first and leave them pending."""
        while self.engine.cancelled and self._loop_task is not None and not self._loop_task.done():
            await asyncio.sleep(0.001)

    async def next_token_probs(self, prefixes: list[list[int]], candidate_ids: list[int]) -> list[list[float]]:
        results = await self.generate([Request(prompt_ids=p, candidate_ids=list(candidate_ids), max_new_tokens=0)
                                       for p in prefixes])
        return [r.probs for r in results]

    async def clear_cache(self) -> None:
        """Forget finished sequences' KV (benchmarks: no run reuses another's work)."""
        self.engine.target.clear_cache()
        if self.engine.draft is not None:
            self.engine.draft.clear_cache()

    async def stats(self) -> dict:
        eng = self.engine
        return {"live": len(eng.live), "pending": len(eng.pending), "waiting": len(self._futures),
                "kv_bytes": eng.target.kv_bytes(), "kv_budget_bytes": eng.target.kv_budget_bytes,
                "kv_waits": eng.kv_waits,
                "cached_sequences": len(eng.target.cache),
                "cached_tokens": sum(s.length for s in eng.target.cache.values())}

    def shutdown(self) -> None:
        """Nothing outlives the actor here (a VLLMHost stops its engine process)."""

    async def _run(self) -> None:
        """Step the engine in a worker thread while the event loop keeps taking requests."""
        while self.engine.busy:
            try:
                finished = await asyncio.to_thread(self.engine.step)
            except Exception as exc:  # fail every waiting caller, keep the actor usable
                log.exception("engine step failed")
                self.engine.abort_all()
                for fut in self._futures.values():
                    if not fut.done():
                        fut.set_exception(exc)
                self._futures.clear()
                return
            for res in finished:
                fut = self._futures.pop(res.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(res)


def split_threads(roles: list, ray_cfg) -> list:
    """Roles whose `engine.torch_threads` is 0 (auto), given an equal share of this machine's cores when the job
    starts a local Ray instance, so model actors that run at the same time (target, draft, a verifier model) do
    not each spin a thread per core. On 2 cores with the target and the SAPO draft on one thread each,
    `lr_async+sd` runs at 0.88-0.90x `ar` against 0.73x with two threads each (same 8 problems; `ar` alone is
    as fast on one thread as on two: 16.8 vs 16.3 tokens/s). Against a cluster (`ray.address` or RAY_ADDRESS)
    the nodes' cores are unknown here: roles keep 0 and each actor uses its node's cores."""
    if ray_cfg.address or os.environ.get("RAY_ADDRESS") or not roles:
        return list(roles)
    share = max(1, int(ray_cfg.num_cpus or os.cpu_count() or 1) // len(roles))
    return [role if role.engine.torch_threads else replace(role, engine=replace(role.engine, torch_threads=share))
            for role in roles]


def host_class(role):
    """The host of a role's `engine.backend`: EngineHost (native) or actors.vllm_host.VLLMHost."""
    if role.engine.backend == "vllm":
        from actors.vllm_host import VLLMHost

        return VLLMHost
    return EngineHost


def start_host(role_name: str, role, placement_group=None, bundle_index: int | None = None):
    """Start a role's host as an async Ray actor with the role's resources and restart policy. A vLLM role on
    several GPUs (tensor x pipeline parallel) gets a placement group of its own: the host's bundle and one GPU
    bundle per vLLM worker, which vLLM's Ray executor fills (the host asks for no GPU itself)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    a = role.actor
    options = dict(num_cpus=a.num_cpus, num_gpus=a.num_gpus, max_restarts=a.max_restarts,
                   max_task_retries=a.max_task_retries if a.max_restarts else 0, max_concurrency=a.max_concurrency,
                   resources=dict(a.resources) or None, name=None)
    group = None  # a placement group made here, for a multi-GPU vLLM role
    if role.engine.backend == "vllm" and placement_group is None:
        from actors.vllm_host import placement_bundles

        bundles = placement_bundles(role)
        if bundles is not None:
            # one node: vLLM's Ray executor wants a worker on its driver's (the host's) node, and the workers read
            # the model from the directory the host resolved there (fetched from run storage on that node only)
            placement_group = group = ray.util.placement_group(bundles, strategy="STRICT_PACK")
            bundle_index, options["num_gpus"] = 0, 0
    if placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=-1 if bundle_index is None else bundle_index,
            placement_group_capture_child_tasks=group is not None)  # vLLM's Ray executor places its workers there
    elif a.scheduling == "spread":
        options["scheduling_strategy"] = "SPREAD"
    handle = ray.remote(host_class(role)).options(**options).remote(role_name, role)
    if group is not None:
        _OWN_GROUPS[handle._actor_id.hex()] = group  # stop_host gives the GPUs back
    return handle


_OWN_GROUPS: dict = {}  # actor id -> the placement group start_host made for a multi-GPU vLLM host


def stop_host(handle, timeout_s: float = 60.0) -> None:
    """Stop a host actor: its engine first (a vLLM host's engine core is a child process that a bare kill would
    leave running), then the actor, then the placement group start_host reserved for it."""
    import ray

    if hasattr(handle, "shutdown"):
        try:
            ray.get(handle.shutdown.remote(), timeout=timeout_s)
        except Exception:  # noqa: BLE001 (a dead or hung actor: kill it anyway)
            log.warning("host did not shut down cleanly; killing it")
    ray.kill(handle)
    group = _OWN_GROUPS.pop(handle._actor_id.hex(), None)
    if group is not None:
        ray.util.remove_placement_group(group)


def init_ray(ray_cfg) -> None:
    """Connect to `ray.address` (or RAY_ADDRESS); with neither, start a local instance in this process."""
    import ray

    if ray.is_initialized():
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:  # a cluster or `ray job submit`: the job's runtime env applies
        ray.init(address=address, namespace=ray_cfg.namespace, log_to_driver=True)
    else:
        # offline switches and caches reach the workers; secrets (tokens, keys) never do
        env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "SPECMOE_", "TRITON_"))
               and not any(s in k for s in ("TOKEN", "KEY", "SECRET"))}
        runtime_env = {"worker_process_setup_hook": "actors.ray_setup.local_worker_setup",
                       **({"env_vars": env} if env else {})}
        # address "local": a new instance even when another one runs on this machine (a bare ray.init() would
        # join the last one `ray start` or a test cluster left in /tmp/ray)
        with without_env(*PROCESS_ENV):
            ray.init(address="local", num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus,
                     namespace=ray_cfg.namespace, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)


# what belongs to this process, not to the Ray workers a local instance starts (they inherit its environment):
# W&B's service address would attach every worker to this process's W&B service, where a run a dead worker left open
# stays "in use" and its restarted worker cannot open it again
PROCESS_ENV = ("WANDB_SERVICE",)


@contextlib.contextmanager
def without_env(*names: str):
    """This process's environment without `names` while the block runs (processes started in it do not inherit
    them)."""
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)

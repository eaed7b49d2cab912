"""SAPO: train the draft to write the steps the target would write, briefly (DREAM-R).

    python -m pipelines.sapo trajectories=runs/collect/<dir>/trajectories.jsonl
    python -m pipelines.sapo tiny trajectories=...                               # random tiny draft, seconds
    python -m pipelines.sapo tiny trajectories=... lora.enabled=true             # LoRA, merged into the export
    python -m pipelines.sapo tiny trajectories=... distributed.workers=2         # 2 Ray Train workers (gloo)
    python -m pipelines.sapo tiny trajectories=... rewards.align_source=online   # the target actor's own steps
    python -m pipelines.sapo run.resume=runs/sapo/<dir>                          # continue from the last checkpoint
    python -m pipelines.sapo run.resume=runs/sapo/<dir> grpo.steps=200           # ... and train for longer

1. warm start: TRL's SFT trainer on the target's answers (prompt -> completion, loss on the completion);
2. GRPO (TRL) on three rewards from `rewards.sapo`. `grpo.unit=step` (default): a prompt is the problem plus the
   target trajectory's first d steps, a rollout is the draft's next step (`step_rollout` stops and cuts it at the
   delimiter), what the draft writes inside lookahead reasoning; `answer`: whole answers from the problem.
   R_align (the share, or accepted prefix, of the rollout's
   steps that the verifier accepts against the target's steps: the cached trajectory's (`offline`) or the target
   actor's own step from the same prefix, one batched call per group of rollouts (`online`)), R_length
   (min(1, S_target / S_rollout) on mean tokens per step; `rewards.length_form=answer` compares whole answers),
   R_outcome (math-verify; at the step unit only for steps drafted where the target wrote its final step, None
   for the others); weights 1:1:1 by default; TRL logs each reward's mean and std per step;
3. the trained draft is saved as a plain model directory (<run_dir>/draft; LoRA adapters merged in) that
   `pipelines.evaluate` loads by path.

`distributed.workers=1` trains in this process. With N > 1 (or DeepSpeed), training runs as Ray Train `TorchTrainer`
fits with N workers (gloo on CPU, nccl on GPU; `distributed.worker_resources` and `placement` place them): first
the warm start, then GRPO, to which the warm start is handed as a Ray Train checkpoint. HF/TRL's accelerate picks up
the process group and the RANK/WORLD_SIZE variables Ray Train sets; rank 0 writes the run (the export, summary.json,
W&B) and syncs it to run storage. Every GRPO checkpoint (`grpo.save_steps`) is reported to Ray Train, each rank with
its own files (per-rank RNG state, ZeRO shards), so ranks on nodes without a shared disk report a whole checkpoint;
a worker or node that dies makes Ray Train restart the group from the last one (`distributed.max_failures`), and
the summary comes back through the result's metrics. DeepSpeed ZeRO (`distributed.deepspeed_stage`, 2 by default
with GPUs) is refused on CPU. The target and the embedding verifier run as Ray actors shared by every worker.
A resumed run (`run.resume`, any node) continues from the last complete checkpoint (step counter, optimizer and
scheduler state) with the same W&B run id, and refuses a config that differs in a key that changes training.
summary.json records `grpo_samples_per_s` (completions scored over the wall time of GRPO's `train()` on rank 0) and
`grpo_wall_s`.
Not yet run here: the GPU path (nccl, DeepSpeed); this machine has no GPU, and the lent GPU machine has no Ray,
TRL or DeepSpeed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from actors import storage, zoo
from pipelines.cli import run_cli
from pipelines.runs import JsonlError, RunDir, make_run_dir, read_jsonl, save_config
from pipelines.sapo_train import step_rows, train
from pipelines.schema import MODEL_VERIFIERS, ConfigError, SapoConfig


def load_trajectories(cfg: SapoConfig, tok) -> list[dict]:
    """Rows of a collect run, checked against the draft's tokenizer before any training."""
    if not cfg.trajectories:
        raise ConfigError("config key 'trajectories': give the trajectories.jsonl of a pipelines.collect run")
    try:  # a location in run storage is fetched to this node first
        path = storage.fetch(cfg.trajectories)
    except storage.StorageError as exc:
        raise ConfigError(f"config key 'trajectories': {exc}") from None
    if not path.is_file():
        raise ConfigError(f"config key 'trajectories': {cfg.trajectories} is not a file")
    try:
        rows = read_jsonl(path, strict=True)
    except JsonlError as exc:
        raise ConfigError(f"config key 'trajectories': {exc}") from None
    if not rows:
        raise ConfigError(f"{path} holds no trajectories")
    for i, row in enumerate(rows, 1):
        missing = {"prompt_ids", "steps", "response", "answer", "question", "num_tokens"} - set(row)
        if missing:
            raise ConfigError(f"{path} row {i} lacks {sorted(missing)}: not a pipelines.collect trajectory file")
    collected = storage.join(os.path.dirname(cfg.trajectories.rstrip("/")), "config.yaml")
    if storage.exists(collected):
        import yaml

        target = yaml.safe_load(storage.read_text(collected))["target"]["model"]["name"]
        if zoo.load_tokenizer(target).get_vocab() != tok.get_vocab():
            raise ConfigError(f"{path} was written by {target!r}, whose tokenizer differs from the draft "
                              f"{cfg.draft.name!r}'s")
    vocab = len(tok)
    for i, row in enumerate(rows, 1):
        ids = [row["prompt_ids"], *(row.get("step_token_ids") or [])]
        if any(not isinstance(t, int) or not 0 <= t < vocab for part in ids for t in part):
            raise ConfigError(f"{path} row {i}: token ids outside the draft {cfg.draft.name!r}'s vocabulary ({vocab})")
        # the ids must spell the row's text in the draft's tokenizer (a file copied away from its collect run's
        # config.yaml, or one written with another tokenizer of a similar size, passes the checks above)
        if row.get("step_token_ids"):
            same = all(_spells(tok, ids, text) for ids, text in zip(row["step_token_ids"], row["steps"]))
        else:
            same = row["question"] in tok.decode(row["prompt_ids"])
        if not same:
            raise ConfigError(f"{path} row {i}: its token ids do not spell its text with the draft "
                              f"{cfg.draft.name!r}'s tokenizer: the file was written with another tokenizer")
    return rows


def _spells(tok, ids: list[int], text: str) -> bool:
    """Whether a step's token ids decode to its text as the engine decoded it: step by step, special tokens kept
    but the final EOS (which tokenizer's EOS ids the engine left out is not recorded: any trailing special token
    may be one)."""
    special = set(tok.all_special_ids)
    end = len(ids)
    while end and ids[end - 1] in special:
        end -= 1
    return text in (tok.decode(ids, skip_special_tokens=False), tok.decode(ids[:end], skip_special_tokens=False))


def _worker(config: dict) -> None:
    """One Ray Train worker: the process group and RANK/WORLD_SIZE are set up by Ray Train before this runs."""
    cfg = config["cfg"]
    torch.set_num_threads(max(1, int(cfg.distributed.worker_cpus)))  # Ray sets OMP_NUM_THREADS=1
    run = RunDir(config["run"])  # this node's copy of the run in storage (a resumed run's checkpoints)
    run.path.mkdir(parents=True, exist_ok=True)
    with storage.NodeLock(run.path):  # ranks on one node share the copy: one brings each thing here
        run.pull(skip=("ray_train", "warm_start"))
        restore_reported_checkpoint(run.path / "grpo")
        if config.get("warm_start") is not None:
            restore_warm_start(config["warm_start"], run.path / "warm_start")
    torch.distributed.barrier()
    train(cfg, run, config["rows"], config["hosts"], ray_train=True, stage=config["stage"])


def restore_warm_start(checkpoint, target: Path) -> None:
    """The warm start, handed to the GRPO workers as a Ray Train checkpoint, brought to this node (once)."""
    if not (target / "config.json").is_file():
        _bring(checkpoint, target)


def restore_reported_checkpoint(out: Path) -> None:
    """The last checkpoint reported to Ray Train (after Ray Train restarted the worker group, or for a run it
    continues), brought into `out` on this node unless it is there already."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    name = os.path.basename(checkpoint.path.rstrip("/")) if checkpoint is not None else ""
    target = out / name
    if not name.startswith("checkpoint-") or (target / "trainer_state.json").is_file():
        return  # none, the finished run's summary, or here already
    _bring(checkpoint, target)


def _bring(checkpoint, target: Path) -> None:
    """A Ray Train checkpoint's files into `target` on this node: written beside it, then renamed, so a worker
    killed mid-copy leaves no half directory where resume looks."""
    import shutil

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.to_directory(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def check_worker_resources(cfg: SapoConfig, per_worker: dict) -> None:
    """Ray Train waits (and retries without end) for a worker group that does not fit; on the local instance this
    job started nothing will ever free the resources, so say which keys to change instead. On a cluster (ray.address
    or RAY_ADDRESS) an autoscaler may add nodes: only warn there."""
    import ray

    free = ray.available_resources()  # after the shared actors (target, encoder) took theirs
    short = {k: (cfg.distributed.workers * v, free.get(k, 0.0)) for k, v in per_worker.items()
             if cfg.distributed.workers * v > free.get(k, 0.0) + 1e-9}
    if not short:
        return
    what = ", ".join(f"{need:g} {k} needed, {have:g} free" for k, (need, have) in short.items())
    msg = (f"distributed.workers={cfg.distributed.workers} x distributed.worker_cpus={cfg.distributed.worker_cpus:g}"
           f"{' (+1 GPU each)' if cfg.distributed.use_gpu else ''} does not fit beside the shared actors "
           f"(target, encoder): {what}; lower distributed.worker_cpus or the workers, or give Ray more (ray.num_cpus)")
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        print(f"warning: {msg}; waiting for the cluster to provide them", flush=True)
        return
    raise ConfigError(msg)


def fit_on_ray(cfg: SapoConfig, run_dir: RunDir, rows: list[dict], hosts: dict) -> dict:
    """N Ray Train workers, two fits: the warm start (unless storage holds it), then GRPO, to which the warm start
    is handed as a Ray Train checkpoint (each worker brings it to its node). Every GRPO checkpoint is reported to
    Ray Train (kept in `<run>/ray_train`), each rank with its own files, and Ray Train restarts the group from the
    last one when a worker or its node dies (`distributed.max_failures`). Returns the summary rank 0 reported."""
    import ray.train

    # Ray Train's print patch bypasses the stdout capture dill uses to hash `datasets.map` functions, and every
    # worker would print disassembled bytecode; Ray Train passes this variable on to its workers
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    d = cfg.distributed
    resources = {"CPU": d.worker_cpus, **({"GPU": 1} if d.use_gpu else {}), **d.worker_resources}
    check_worker_resources(cfg, resources)
    loop = {"cfg": cfg, "run": run_dir.location, "rows": rows, "hosts": hosts}
    warm = None
    if cfg.warm_start.enabled:
        location = storage.join(run_dir.location, "warm_start")
        if not storage.exists(storage.join(location, storage.MANIFEST)):  # published last: a whole warm start
            _fit(cfg, "sapo-warm-start", {**loop, "stage": "warm_start"}, resources, run_dir)
        warm = ray.train.Checkpoint(location)
    result = _fit(cfg, "sapo", {**loop, "stage": "grpo", "warm_start": warm}, resources, run_dir)
    return result.metrics["summary"]


def _fit(cfg: SapoConfig, name: str, loop: dict, resources: dict, run_dir: RunDir):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    backend = d.backend if d.backend != "auto" else ("nccl" if d.use_gpu else "gloo")
    result = TorchTrainer(
        _worker, train_loop_config=loop, torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=d.use_gpu, resources_per_worker=resources,
                                     placement_strategy=d.placement.upper()),
        run_config=RunConfig(name=name, storage_path=storage.join(run_dir.location, "ray_train"),
                             failure_config=FailureConfig(max_failures=d.max_failures))).fit()
    run_dir.pull(skip=("ray_train",))  # what rank 0 wrote, from wherever it ran (Ray Train's own files stay)
    return result


def needs_target(cfg: SapoConfig) -> bool:
    """The target actor runs beside the workers: online alignment asks it for its steps, a model verifier (judge,
    tbvm, score) for its verdicts."""
    return cfg.rewards.align_source == "online" or cfg.rewards.verifier in MODEL_VERIFIERS


def start_hosts(cfg: SapoConfig) -> dict:
    """Ray actors every worker shares: the target (online alignment, model verifiers) and the embedding verifier's
    encoder."""
    import ray

    from actors.encoder import EncoderHost
    from actors.hosts import init_ray, start_host

    init_ray(cfg.ray)
    hosts = {}
    if needs_target(cfg):
        hosts["target"] = start_host("target", cfg.target)
    if cfg.rewards.verifier == "embedding":
        hosts["encoder"] = ray.remote(EncoderHost).options(num_cpus=0.1).remote(1)
    ray.get([h.__ray_ready__.remote() for h in hosts.values()])  # their resources are taken before workers ask
    return hosts


def preflight(cfg: SapoConfig, tok, rows: list[dict]) -> None:
    """Checks that need the models' tokenizers or modules, before any run directory is written."""
    if cfg.grpo.unit == "step" and not step_rows(rows, tok):
        raise ConfigError(f"config key 'grpo.unit': step, but no trajectory in {cfg.trajectories} has a finished "
                          "step (each answer is one step cut at the token cap); collect with a larger "
                          "generation.max_new_tokens or use grpo.unit=answer")
    if cfg.rewards.align_source == "online":
        t = cfg.target.model
        if zoo.load_tokenizer(t.name, t.trust_remote_code).get_vocab() != tok.get_vocab():
            raise ConfigError(f"config key 'target.model.name': {t.name!r} uses another tokenizer than the draft "
                              f"{cfg.draft.name!r}; online alignment feeds it the draft's tokens")
    if cfg.lora.enabled:
        model, _ = zoo.load_model(cfg.draft.name, cfg.draft.dtype, "cpu", cfg.draft.trust_remote_code)
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = sorted(set(cfg.lora.target_modules) - names)
        if missing:
            raise ConfigError(f"config key 'lora.target_modules': {missing} are not linear modules of "
                              f"{cfg.draft.name!r} (it has {sorted(names)})")


def run(cfg: SapoConfig) -> tuple[str, dict]:
    """The exported draft's location (what `draft.model.name` takes) and the summary."""
    zoo.check_model(cfg.draft.name)
    if needs_target(cfg):
        from pipelines.evaluate import check_backend

        zoo.check_model(cfg.target.model.name)
        check_backend("target", cfg.target, cfg.ray)
    tok = zoo.load_tokenizer(cfg.draft.name, cfg.draft.trust_remote_code)
    rows = load_trajectories(cfg, tok)
    preflight(cfg, tok, rows)
    run_dir = make_run_dir(cfg, "sapo")
    save_config(cfg, run_dir, "sapo")
    # DeepSpeed needs a process group even for one process: Ray Train sets it up, so it always runs there
    in_process = cfg.distributed.workers == 1 and cfg.distributed.zero_stage is None
    hosts = start_hosts(cfg) if not in_process or needs_target(cfg) else {}
    try:
        if in_process:
            train(cfg, run_dir, rows, hosts)
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            summary = fit_on_ray(cfg, run_dir, rows, hosts)
    finally:
        if hosts:
            from actors.hosts import stop_host

            for handle in hosts.values():
                stop_host(handle)
    print(json.dumps(summary, indent=2))
    return summary["draft"], summary


def main(argv: list[str] | None = None) -> None:
    run_cli("sapo", run, argv)


if __name__ == "__main__":
    main()

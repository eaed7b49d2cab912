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

`distributed.workers=1` trains in this process. With N > 1 (or DeepSpeed), warm start, GRPO and export run inside a Ray Train
`TorchTrainer` with N workers (gloo on CPU, nccl on GPU); HF/TRL's accelerate picks up the process group and the
RANK/WORLD_SIZE variables Ray Train sets, and rank 0 writes checkpoints, the export, summary.json and W&B (the run
directory must be on storage all workers see). DeepSpeed ZeRO (`distributed.deepspeed_stage`, 2 by default with
GPUs) is refused on CPU. The target and the embedding verifier run as Ray actors shared by every worker.
Checkpoints every `grpo.save_steps` into <run_dir>/grpo; a resumed run continues from the last complete one (step
counter, optimizer and scheduler state) with the same W&B run id, and refuses a config that differs in a key that
changes training. summary.json records `grpo_samples_per_s` (completions scored over the wall time of GRPO's
`train()` on rank 0) and `grpo_wall_s`.
Not yet run here: the GPU path (nccl, DeepSpeed) and multi-node runs; this machine has no GPU, and the lent GPU
machine has no Ray, TRL or DeepSpeed. Ray Train's own checkpoint reporting (RayTrainReportCallback) is not used:
resume reads <run_dir>/grpo, so checkpoints are not copied twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from actors import zoo
from pipelines.config import ConfigError, SapoConfig, run_cli
from pipelines.runs import JsonlError, make_run_dir, read_jsonl, save_config, write_json
from pipelines.tracking import Tracker
from rewards import sapo as R
from rewards.verifiers import Exact

# keys a resumed run may change: where it runs and logs, how long it trains, the target actor's resources
RESUMABLE_KEYS = ("run.", "ray.", "wandb.", "grpo.steps", "grpo.save_steps", "distributed.worker_cpus",
                  "distributed.backend", "target.actor.", "target.engine.")
# keys added after runs were saved without them: the value those runs trained with
SAVED_BEFORE_KEY = {"grpo.unit": "answer"}
# keys that only matter when a switch is on (in the saved config or the new one)
SWITCHED_KEYS = {"lora.": "lora.enabled", "target.": "rewards.align_source", "rewards.step_max_tokens":
                 "rewards.align_source"}


def load_trajectories(cfg: SapoConfig, tok) -> list[dict]:
    """Rows of a collect run, checked against the draft's tokenizer before any training."""
    if not cfg.trajectories:
        raise ConfigError("config key 'trajectories': give the trajectories.jsonl of a pipelines.collect run")
    path = Path(cfg.trajectories)
    if not path.is_file():
        raise ConfigError(f"config key 'trajectories': {path} does not exist")
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
    collected = path.parent / "config.yaml"
    if collected.is_file():
        import yaml

        target = yaml.safe_load(collected.read_text())["target"]["model"]["name"]
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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resume(cfg: SapoConfig) -> None:
    """`run.resume` must continue the same training: every key outside RESUMABLE_KEYS must equal the saved config's
    (a key the saved config lacks counts as the value of runs saved before it existed, SAVED_BEFORE_KEY, or as its
    default; LoRA's and the online target's keys count only when LoRA
    or online alignment is on). Runs before anything is loaded or written."""
    if not cfg.run.resume:
        return
    import yaml

    saved_file = Path(cfg.run.resume) / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"config key 'run.resume': {cfg.run.resume} is not a run directory (no config.yaml)")
    saved = _flat(yaml.safe_load(saved_file.read_text()))
    if saved.get("job") != "sapo":
        raise ConfigError(f"config key 'run.resume': {cfg.run.resume} holds a {saved.get('job')!r} run, not sapo")
    new, default = _flat(asdict(cfg)), _flat(asdict(SapoConfig()))
    old = {k: saved.get(k, SAVED_BEFORE_KEY.get(k, default.get(k))) for k in new}
    on = {"lora.enabled": old["lora.enabled"] or new["lora.enabled"],
          "rewards.align_source": "online" in (old["rewards.align_source"], new["rewards.align_source"])}
    differ = {k: (old[k], v) for k, v in new.items() if old[k] != v and not k.startswith(RESUMABLE_KEYS)
              and all(on[switch] for prefix, switch in SWITCHED_KEYS.items() if k.startswith(prefix))}
    if differ:
        changes = "; ".join(f"{k}: {old!r} -> {v!r}" for k, (old, v) in differ.items())
        raise ConfigError(f"config key 'run.resume': {cfg.run.resume} was trained with another config in "
                          f"{sorted(differ)} ({changes}); resume with the saved values or start a new run")


def deepspeed_config(stage: int) -> dict:
    """The DeepSpeed config handed to the HF/TRL args; "auto" values are filled in from the Trainer's arguments."""
    zero: dict = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size="auto")
    if stage == 3:  # save_model gathers the partitioned weights into one plain checkpoint
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto")
    return {"zero_optimization": zero, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def reward_functions(cfg: SapoConfig, tok, verifier, target=None, counter: dict | None = None):
    """r_align, r_length, r_outcome over a batch of completions (dataset columns come per completion)."""
    delim, rw = cfg.step_delimiter, cfg.rewards
    counter = {} if counter is None else counter

    async def align(prompts, completions, target_steps, question, prompt_ids, **_):
        groups: dict[str, list[int]] = {}  # rollouts of one prompt: one batched target call (online)
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        if rw.align_source == "online":
            counter["target_steps"] = counter.get("target_steps", 0) + sum(
                len(R.split_steps(c, delim)) for c in completions)
            scored = await asyncio.gather(*(R.online_align(
                verifier, target, tok, question[idx[0]], prompt_ids[idx[0]], [completions[i] for i in idx], delim,
                rw.step_max_tokens, rw.align_form) for idx in groups.values()))
        else:
            scored = await asyncio.gather(*(R.offline_align(
                verifier, question[idx[0]], [completions[i] for i in idx], target_steps[idx[0]], delim, rw.align_form)
                for idx in groups.values()))
        out = [0.0] * len(completions)
        for idx, values in zip(groups.values(), scored):
            for i, v in zip(idx, values):
                out[i] = v
        return out

    def length(completions, target_tokens, target_step_tokens, **_):
        counter["completions"] = counter.get("completions", 0) + len(completions)
        sizes = [len(tok(c, add_special_tokens=False).input_ids) for c in completions]
        if rw.length_form == "answer":
            return [R.length_reward(n, ref) for n, ref in zip(sizes, target_tokens)]
        return [R.step_length_reward(n, len(R.split_steps(c, delim)), ref)
                for c, n, ref in zip(completions, sizes, target_step_tokens)]

    def outcome(completions, answer, final, **_):
        return [R.outcome_reward(c, a) if last else None for c, a, last in zip(completions, answer, final)]

    align.__name__, length.__name__, outcome.__name__ = "r_align", "r_length", "r_outcome"
    return [align, length, outcome]


def answer_rows(rows: list[dict], tok) -> list[dict]:
    """grpo.unit=answer: one training prompt per trajectory, the problem; rollouts are whole answers."""
    return [{"prompt": tok.decode(r["prompt_ids"]), "answer": r["answer"], "question": r["question"],
             "prompt_ids": r["prompt_ids"], "target_steps": r["steps"], "target_tokens": r["num_tokens"],
             "target_step_tokens": _tokens_per_step(tok, r["steps"]), "final": True} for r in rows]


def step_rows(rows: list[dict], tok) -> list[dict]:
    """grpo.unit=step: one training prompt per step d of each trajectory: the problem and the target's steps before
    d (its own tokens), so a rollout is the draft's step from a prefix the target wrote, judged against the target's
    step d (what the draft does inside lookahead reasoning). The last step of an answer cut at the token cap is no
    reference (the target did not finish it) and is skipped."""
    out = []
    for r in rows:
        steps = r["steps"]
        ids = r.get("step_token_ids") or [tok(s, add_special_tokens=False).input_ids for s in steps]
        usable = len(steps) - (r.get("finish_reason") == "length")
        prefix = list(r["prompt_ids"])
        for d in range(usable):
            n = _tokens_per_step(tok, [steps[d]])
            out.append({"prompt": tok.decode(prefix), "answer": r["answer"], "question": r["question"],
                        "prompt_ids": prefix, "target_steps": [steps[d]], "target_tokens": n,
                        "target_step_tokens": n, "final": d == len(steps) - 1})
            prefix = prefix + list(ids[d])
    return out


def cut_step(tok, ids: list[int], delimiter: str, stop_ids: set[int]) -> list[int]:
    """A rollout up to and including the token that completes its first step (the delimiter appears in the text)
    or an end-of-sequence token; tokens after it (generation overshoot, padding) are not the draft's step."""
    for i, t in enumerate(ids):
        if t in stop_ids or delimiter in tok.decode(ids[:i + 1]):
            return ids[:i + 1]
    return ids


def step_stop(tok, delimiter: str, width: int):
    """A `generate` stopping criterion: a row is done once its generated tokens (after the `width` prompt columns)
    contain the delimiter, as the engine's step requests stop (transformers' `stop_strings` also match across the
    prompt: a prompt ending in "\n\n" would stop at a first "\n")."""
    from transformers import StoppingCriteria

    class StepStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([delimiter in tok.decode(row[width:]) for row in input_ids.tolist()],
                                device=input_ids.device)

    return StepStop()


def generate_steps(model, tok, prompt_ids: list[list[int]], delimiter: str, stop_ids: set[int], **generate) -> \
        list[list[int]]:
    """One step from each prompt (exact token ids, left-padded into one batch): `model.generate(**generate)` stopped
    at the step delimiter (`step_stop`) and each row cut at its step's end (`cut_step`)."""
    width = max(map(len, prompt_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = model.device
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in prompt_ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=pad,
                             stopping_criteria=[step_stop(tok, delimiter, width)], **generate)
    return [cut_step(tok, row[width:].tolist(), delimiter, stop_ids) for row in out.cpu()]


def step_rollout(tok, delimiter: str, prompt_ids: dict[str, list[int]]):
    """TRL `rollout_func` for grpo.unit=step: samples with the trainer's generation config from the exact prompt
    token ids (the prefix the target wrote, not a re-tokenisation of its text), stops each rollout at the step
    delimiter and cuts it there; TRL then recomputes the log-probabilities of the kept tokens."""
    def rollout(prompts: list[str], trainer) -> dict:
        from trl.models.utils import unwrap_model_for_generation

        ids = [prompt_ids[p] for p in prompts]
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                         gather_deepspeed3_params=trainer.args.ds3_gather_for_generation) as model:
            completions = generate_steps(model, tok, ids, delimiter, set(trainer.eos_token_ids),
                                         generation_config=trainer.generation_config)
        return {"prompt_ids": ids, "completion_ids": completions, "logprobs": None}

    return rollout


def _tokens_per_step(tok, steps: list[str]) -> float:
    """The target trajectory's mean tokens per step (R_length's reference, form `step`)."""
    sizes = [len(tok(s, add_special_tokens=False).input_ids) for s in steps]
    return sum(sizes) / len(sizes) if sizes else 0.0


def _verifier(cfg: SapoConfig, hosts: dict):
    if cfg.rewards.verifier == "exact":
        return Exact("normalized")
    from rewards.verifiers import Embedding

    if "encoder" in hosts:
        from pipelines.evaluate import EncoderClient

        return Embedding(EncoderClient(hosts["encoder"]), cfg.rewards.threshold)
    from actors.encoder import EncoderHost

    return Embedding(EncoderHost(), cfg.rewards.threshold)


def _last_checkpoint(out: Path) -> str | None:
    """The newest complete checkpoint: trainer_state.json is written last, so a run killed mid-save is skipped."""
    done = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[1]))) if done else None


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _peft_config(cfg: SapoConfig):
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                      task_type="CAUSAL_LM")


def export(trainer, cfg: SapoConfig, base: str, out: Path, tok, rank: int) -> None:
    """A plain model directory from rank 0. save_model gathers ZeRO-partitioned weights (all ranks call it); with
    LoRA it saves the adapter (kept beside, `<out>-adapter`), merged here into a fresh copy of the base. Written
    under another name and renamed: a run killed while saving leaves no half model where resume looks."""
    partial = out.with_name(out.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    if not cfg.lora.enabled:
        trainer.save_model(str(partial))
    else:
        adapter = out.with_name(out.name + "-adapter")
        trainer.save_model(str(adapter))
        if rank == 0:
            from peft import PeftModel

            base_model, _ = zoo.load_model(base, cfg.draft.dtype, "cpu", cfg.draft.trust_remote_code)
            PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload().save_pretrained(partial)
    if rank == 0:
        tok.save_pretrained(partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    _barrier()


def train(cfg: SapoConfig, run_dir: Path, rows: list[dict], hosts: dict) -> None:
    """Warm start, GRPO and export: in this process, or as one Ray Train worker (rank 0 writes)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tracker = Tracker(cfg.wandb, run_dir, "sapo", {"job": "sapo", **asdict(cfg)}) if rank == 0 else None
    stage = cfg.distributed.zero_stage
    common = {"use_cpu": not cfg.distributed.use_gpu, "logging_steps": 1, "seed": 0,
              "bf16": cfg.distributed.use_gpu and cfg.draft.dtype == "bfloat16",
              "report_to": "wandb" if tracker and tracker.mode != "disabled" else "none",
              "deepspeed": deepspeed_config(stage) if stage is not None else None}
    tok = zoo.load_tokenizer(cfg.draft.name, cfg.draft.trust_remote_code)
    prompts = [tok.decode(r["prompt_ids"]) for r in rows]
    summary_file = run_dir / "summary.json"
    summary: dict = json.loads(summary_file.read_text()) if summary_file.is_file() else {}  # a resumed run's
    summary["trajectories"] = len(rows)

    base, warm_dir = cfg.draft.name, run_dir / "warm_start"
    if cfg.warm_start.enabled and not (warm_dir / "config.json").is_file():
        ws = cfg.warm_start
        model, _ = zoo.load_model(base, cfg.draft.dtype, "cpu", cfg.draft.trust_remote_code)
        data = Dataset.from_list([{"prompt": p, "completion": r["response"] + (tok.eos_token or "")}
                                  for p, r in zip(prompts, rows)])
        # the warm start logs under warm_start/ (HF's W&B callback would put its loss and step in GRPO's train/
        # keys, whose step counter starts again at 1)
        sft = SFTTrainer(model=model, processing_class=tok, train_dataset=data, peft_config=_peft_config(cfg),
                         callbacks=[_prefixed_log(tracker, "warm_start")] if common["report_to"] == "wandb" else None,
                         args=SFTConfig(output_dir=str(run_dir / "sft"), num_train_epochs=ws.epochs,
                                        learning_rate=ws.learning_rate, per_device_train_batch_size=ws.batch_size,
                                        max_length=ws.max_length, save_strategy="no",
                                        **{**common, "report_to": "none"}))
        summary["warm_start_loss"] = sft.train().training_loss
        export(sft, cfg, base, warm_dir, tok, rank)
        if rank == 0:  # a run killed in GRPO resumes past the warm start: its loss is kept from here
            write_json(summary_file, summary)
    if cfg.warm_start.enabled:
        base = str(warm_dir)

    model, _ = zoo.load_model(base, cfg.draft.dtype, "cpu", cfg.draft.trust_remote_code)
    g, w = cfg.grpo, cfg.rewards
    grpo_rows = step_rows(rows, tok) if g.unit == "step" else answer_rows(rows, tok)
    data = Dataset.from_list(grpo_rows)
    rollout = None
    if g.unit == "step":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL
        rollout = step_rollout(tok, cfg.step_delimiter, {r["prompt"]: r["prompt_ids"] for r in grpo_rows})
        summary["grpo_prompts"] = len(grpo_rows)
    out = run_dir / "grpo"
    counter: dict = {}
    target = None
    if w.align_source == "online":
        from speculative.clients import HostClient

        target = HostClient(hosts["target"])
    trainer = GRPOTrainer(
        model=model, processing_class=tok, train_dataset=data, peft_config=_peft_config(cfg),
        reward_funcs=reward_functions(cfg, tok, _verifier(cfg, hosts), target, counter), rollout_func=rollout,
        args=GRPOConfig(output_dir=str(out), max_steps=g.steps, per_device_train_batch_size=g.num_generations,
                        num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                        learning_rate=g.learning_rate, beta=g.beta, temperature=g.temperature,
                        reward_weights=[w.align, w.length, w.outcome], save_steps=g.save_steps, **common))
    resume = _last_checkpoint(out)
    if resume and rank == 0:
        print(f"resuming GRPO from {resume}")
    _barrier()
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    wall_s = time.perf_counter() - t0
    per_rank = [counter]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, counter)
    completions = [c.get("completions", 0) for c in per_rank]
    export(trainer, cfg, base, run_dir / "draft", tok, rank)
    if rank != 0:
        return
    history = [h for h in trainer.state.log_history if "reward" in h]
    summary.update(grpo_steps=trainer.state.global_step, grpo_loss=result.training_loss, grpo_world_size=world,
                   grpo_completions_per_rank=completions, grpo_wall_s=wall_s,
                   grpo_samples_per_s=sum(completions) / wall_s if wall_s > 0 else 0.0,
                   grpo_target_steps_per_rank=[c.get("target_steps", 0) for c in per_rank],
                   **{key: {k: [_number(h.get(f"rewards/{k}/{stat}")) for h in history]
                            for k in ("r_align", "r_length", "r_outcome")}
                      for key, stat in (("rewards", "mean"), ("rewards_std", "std"))},
                   draft=str(run_dir / "draft"))
    write_json(summary_file, summary)
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.finish()


def _prefixed_log(tracker, prefix: str):
    """A Trainer callback that logs the trainer's numbers to the tracker under `prefix/` (step: `prefix/step`)."""
    from transformers import TrainerCallback

    class PrefixedLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            numbers = {f"{prefix}/{k}": v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if numbers:
                tracker.log({**numbers, f"{prefix}/step": state.global_step})

    return PrefixedLog()


def _number(value):
    """A logged figure for JSON: NaN (TRL's mean of a reward that returned None for every rollout) becomes None."""
    return None if value is None or value != value else value


def _worker(config: dict) -> None:
    """One Ray Train worker: the process group and RANK/WORLD_SIZE are set up by Ray Train before this runs."""
    cfg = config["cfg"]
    torch.set_num_threads(max(1, int(cfg.distributed.worker_cpus)))  # Ray sets OMP_NUM_THREADS=1
    train(cfg, Path(config["run_dir"]), config["rows"], config["hosts"])


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


def fit_on_ray(cfg: SapoConfig, run_dir: Path, rows: list[dict], hosts: dict) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train's print patch bypasses the stdout capture dill uses to hash `datasets.map` functions, and every
    # worker would print disassembled bytecode; Ray Train passes this variable on to its workers
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    d = cfg.distributed
    backend = d.backend if d.backend != "auto" else ("nccl" if d.use_gpu else "gloo")
    resources = {"CPU": d.worker_cpus, **({"GPU": 1} if d.use_gpu else {})}
    check_worker_resources(cfg, resources)
    TorchTrainer(_worker, train_loop_config={"cfg": cfg, "run_dir": str(run_dir.resolve()), "rows": rows,
                                             "hosts": hosts},
                 torch_config=TorchConfig(backend=backend),
                 scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=d.use_gpu,
                                              resources_per_worker=resources),
                 run_config=RunConfig(name="sapo", storage_path=str((run_dir / "ray_train").resolve()))).fit()


def start_hosts(cfg: SapoConfig) -> dict:
    """Ray actors every worker shares: the target (online alignment) and the embedding verifier's encoder."""
    import ray

    from actors.encoder import EncoderHost
    from actors.hosts import init_ray, start_host

    init_ray(cfg.ray)
    hosts = {}
    if cfg.rewards.align_source == "online":
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


def run(cfg: SapoConfig) -> tuple[Path, dict]:
    check_resume(cfg)
    tok = zoo.load_tokenizer(cfg.draft.name, cfg.draft.trust_remote_code)
    rows = load_trajectories(cfg, tok)
    preflight(cfg, tok, rows)
    run_dir = make_run_dir(cfg, "sapo")
    save_config(cfg, run_dir, "sapo")
    # DeepSpeed needs a process group even for one process: Ray Train sets it up, so it always runs there
    in_process = cfg.distributed.workers == 1 and cfg.distributed.zero_stage is None
    hosts = start_hosts(cfg) if not in_process or cfg.rewards.align_source == "online" else {}
    try:
        if in_process:
            train(cfg, run_dir, rows, hosts)
        else:
            fit_on_ray(cfg, run_dir, rows, hosts)
    finally:
        if hosts:
            import ray

            for handle in hosts.values():
                ray.kill(handle)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(json.dumps(summary, indent=2))
    return run_dir / "draft", summary


def main(argv: list[str] | None = None) -> None:
    run_cli("sapo", run, argv)


if __name__ == "__main__":
    main()

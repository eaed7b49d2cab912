"""SAPO's training loop: the draft's warm start (TRL SFT) and GRPO on SAPO's rewards, and the export.

`train` runs in the job's process or as one Ray Train worker (`pipelines.sapo` decides); rank 0 writes. Prompts come
from a collect run's trajectories: `step_rows` (grpo.unit=step: the problem plus the target's first d steps, a
rollout is one step, `step_rollout` stops it at the delimiter) or `answer_rows` (whole answers). `reward_functions`
gives TRL r_align, r_length and r_outcome (`rewards.sapo`), judged by the exact or the embedding verifier.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from actors import storage, zoo
from pipelines.runs import RunDir, write_json
from pipelines.schema import MODEL_VERIFIERS, SapoConfig
from pipelines.tracking import Tracker
from rewards import sapo as R
from rewards.verifiers import Exact


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


def vllm_steps(llm, tok, prompt_ids: list[list[int]], delimiter: str, stop_ids: set[int], generation_config) -> \
        tuple[list[list[int]], list[list[float | None]]]:
    """`generate_steps` on a vLLM `LLM`: sampled with the generation config's temperature, top-p, top-k, min-p,
    repetition penalty and token cap, stopped at the step delimiter by vLLM and cut there the same way (`cut_step`).
    Also returns each kept token's log-probability as vLLM sampled it (None where vLLM gives NaN), which TRL's
    importance-sampling correction needs."""
    from vllm import SamplingParams

    g = generation_config
    params = SamplingParams(temperature=(g.temperature if g.temperature is not None else 1.0) if g.do_sample else 0.0,
                            top_p=g.top_p or 1.0, top_k=g.top_k or 0, min_p=g.min_p or 0.0,
                            repetition_penalty=g.repetition_penalty or 1.0, max_tokens=g.max_new_tokens,
                            stop=[delimiter], include_stop_str_in_output=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": i} for i in prompt_ids], params, use_tqdm=False)
    steps, logprobs = [], []
    for o in outs:
        out = o.outputs[0]
        ids = cut_step(tok, list(out.token_ids), delimiter, stop_ids)
        steps.append(ids)
        logprobs.append([None if math.isnan(lp[t].logprob) else lp[t].logprob for t, lp in zip(ids, out.logprobs)])
    return steps, logprobs


def trainer_sampling(trainer):
    """A GRPO trainer's sampling settings as a GenerationConfig. TRL keeps one only when it generates with
    transformers; with vLLM (grpo.use_vllm) the trainer holds the bare values."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=trainer.temperature, top_p=trainer.top_p, top_k=trainer.top_k,
                            min_p=trainer.min_p, repetition_penalty=trainer.repetition_penalty,
                            max_new_tokens=trainer.max_completion_length)


def point_vllm_at_model(model, base: str) -> None:
    """TRL's colocated vLLM (grpo.use_vllm) builds its engine from `model.name_or_path`, then copies the trainer's
    weights into it by name each step. An early-exit draft (`<model>-draft-l<N>`) is its source model cut to N
    layers, and its name_or_path is still the source's directory: vLLM would build every layer, take the trained
    weights into the first N and roll out from another model. Point it at the truncated model written once to the
    cache instead (what the vLLM backend serves for that name)."""
    if zoo._DRAFT.match(base):
        from actors.vllm_host import model_dir

        model.name_or_path = model.config._name_or_path = str(model_dir(base))


def step_rollout(tok, delimiter: str, prompt_ids: dict[str, list[int]]):
    """TRL `rollout_func` for grpo.unit=step: samples with the trainer's generation config from the exact prompt
    token ids (the prefix the target wrote, not a re-tokenisation of its text), stops each rollout at the step
    delimiter and cuts it there; TRL then recomputes the log-probabilities of the kept tokens."""
    def rollout(prompts: list[str], trainer) -> dict:
        from trl.models.utils import unwrap_model_for_generation

        ids = [prompt_ids[p] for p in prompts]
        if trainer.use_vllm:  # TRL's colocated vLLM, its weights synced to this step's by the trainer
            completions, logprobs = vllm_steps(trainer.vllm_generation.llm, tok, ids, delimiter,
                                               set(trainer.eos_token_ids), trainer_sampling(trainer))
            return {"prompt_ids": ids, "completion_ids": completions, "logprobs": logprobs}
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
    rw = cfg.rewards
    if rw.verifier == "exact":
        return Exact("normalized")
    if rw.verifier in MODEL_VERIFIERS:  # evaluation's model verifiers, asked through the target actor
        from rewards import verifiers as V
        from speculative.clients import HostClient

        client, t = HostClient(hosts["target"]), cfg.target.model
        vtok = zoo.load_tokenizer(t.name, t.trust_remote_code)
        inner = {"judge": lambda: V.Judge(client, vtok), "tbvm": lambda: V.TBVM(client, vtok, rw.alpha),
                 "score": lambda: V.Score(client, vtok, rw.min_score)}[rw.verifier]()
        return V.ShortCircuit(inner)
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


def train(cfg: SapoConfig, run: RunDir, rows: list[dict], hosts: dict, ray_train: bool = False,
          stage: str = "all") -> None:
    """Warm start, GRPO and export (`stage`: all, or warm_start / grpo alone): in this process, or as one Ray Train
    worker. Rank 0 writes the run and syncs it to run storage (warm start, every checkpoint, the draft). Under Ray
    Train the two stages are two fits: the GRPO workers find the warm start on their node (`pipelines.sapo` hands
    it to them as a Ray Train checkpoint), every rank reports its own files of each GRPO checkpoint, and rank 0
    reports the summary at the end."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    run_dir = run.path
    tracker = Tracker(cfg.wandb, run_dir, "sapo", {"job": "sapo", **asdict(cfg)}) if rank == 0 else None
    zero = cfg.distributed.zero_stage
    common = {"use_cpu": not cfg.distributed.use_gpu, "logging_steps": 1, "seed": 0,
              "bf16": cfg.distributed.use_gpu and cfg.draft.dtype == "bfloat16",
              "report_to": "wandb" if tracker and tracker.mode != "disabled" else "none",
              "deepspeed": deepspeed_config(zero) if zero is not None else None}
    tok = zoo.load_tokenizer(cfg.draft.name, cfg.draft.trust_remote_code)
    prompts = [tok.decode(r["prompt_ids"]) for r in rows]
    summary_file = run_dir / "summary.json"
    summary: dict = json.loads(summary_file.read_text()) if summary_file.is_file() else {}  # a resumed run's
    summary["trajectories"] = len(rows)

    base, warm_dir = cfg.draft.name, run_dir / "warm_start"
    if stage != "grpo" and cfg.warm_start.enabled and not (warm_dir / "config.json").is_file():
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
            run.publish("warm_start")
        _barrier()
    if stage == "warm_start":
        if tracker:
            tracker.finish()
        return
    if cfg.warm_start.enabled:  # rank 0's export, on this node (brought here from its checkpoint under Ray Train)
        base = str(warm_dir)

    model, _ = zoo.load_model(base, cfg.draft.dtype, "cpu", cfg.draft.trust_remote_code)
    g, w = cfg.grpo, cfg.rewards
    if g.use_vllm:
        point_vllm_at_model(model, base)
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
        callbacks=[_ReportToRayTrain(run, rank)] if ray_train else [_SyncOnSave(run)] if rank == 0 else None,
        args=GRPOConfig(output_dir=str(out), max_steps=g.steps, per_device_train_batch_size=g.num_generations,
                        num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                        learning_rate=g.learning_rate, beta=g.beta, temperature=g.temperature,
                        reward_weights=[w.align, w.length, w.outcome], save_steps=g.save_steps,
                        **(dict(use_vllm=True, vllm_mode="colocate",
                                vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization) if g.use_vllm else {}),
                        **common))
    resume = _last_checkpoint(out)
    if resume and rank == 0:
        print(f"resuming GRPO from {resume}")
    summary["grpo_resumed_from_step"] = int(resume.rsplit("-", 1)[1]) if resume else 0
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
        if ray_train:
            import ray.train

            ray.train.report({})  # every worker reports as often as rank 0
        return
    draft = run.publish("draft")
    history = [h for h in trainer.state.log_history if "reward" in h]
    summary.update(grpo_steps=trainer.state.global_step, grpo_loss=result.training_loss, grpo_world_size=world,
                   grpo_completions_per_rank=completions, grpo_wall_s=wall_s,
                   grpo_samples_per_s=sum(completions) / wall_s if wall_s > 0 else 0.0,
                   grpo_target_steps_per_rank=[c.get("target_steps", 0) for c in per_rank],
                   **{key: {k: [_number(h.get(f"rewards/{k}/{stat}")) for h in history]
                            for k in ("r_align", "r_length", "r_outcome")}
                      for key, stat in (("rewards", "mean"), ("rewards_std", "std"))},
                   draft=draft)
    write_json(summary_file, summary)
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.finish()
    run.sync()
    if ray_train:  # the driver takes the summary from the result's metrics (those of the last checkpoint reported)
        import ray.train

        with tempfile.TemporaryDirectory() as final:
            write_json(Path(final) / "summary.json", summary)
            ray.train.report({"summary": summary}, checkpoint=ray.train.Checkpoint.from_directory(final),
                             checkpoint_dir_name="summary")


class _SyncOnSave:
    """A Trainer callback: every checkpoint goes to run storage once written (a resumed run, on any node, starts
    from the last one)."""

    def __new__(cls, run: RunDir):
        from transformers import TrainerCallback

        class SyncOnSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                run.sync()

        return SyncOnSave()


def file_owner(name: str) -> int | None:
    """The rank that writes a checkpoint file of its own (HF's `rng_state_<rank>.pth`, DeepSpeed's ZeRO shards
    `*zero_pp_rank_<rank>_*`); None for the files rank 0 writes for all."""
    m = re.fullmatch(r"rng_state_(\d+)\.pth", name) or re.search(r"zero_pp_rank_(\d+)_", name)
    return int(m.group(1)) if m else None


def rank_files(directory: Path, rank: int, dest: Path) -> Path:
    """`dest` holding links to the files of a checkpoint directory that `rank` reports: its own (file_owner), and
    for rank 0 every file no other rank owns. Each file is reported by exactly one rank, so ranks whose nodes do not
    share a disk together report the whole checkpoint, and ranks that do never write one file twice."""
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        owner = file_owner(file.name)
        if owner == rank or (rank == 0 and owner is None):
            target = dest / file.relative_to(directory)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, target)
            except OSError:
                shutil.copy2(file, target)
    return dest


class _ReportToRayTrain:
    """A Trainer callback (every rank) under Ray Train: each checkpoint, once written, is synced to run storage by
    rank 0 and reported to Ray Train by every rank, each with its own files (`rank_files`; Ray Train puts them in
    one directory; `ray.train.report` is also the ranks' barrier). Ray Train restarts a failed worker group from
    the last one."""

    def __new__(cls, run: RunDir, rank: int):
        from transformers import TrainerCallback

        class ReportToRayTrain(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                import ray.train

                directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                _barrier()  # every rank's files are written (HF saves each rank's RNG state after rank 0's model)
                if rank == 0:
                    run.sync()
                scratch = storage.cache_root() / "reports"  # outside the run (rank 0 syncs it); on the same disk
                scratch.mkdir(parents=True, exist_ok=True)  # as a remote run's staging copy, so links, not copies
                with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                    files = rank_files(directory, rank, Path(tmp))
                    checkpoint = ray.train.Checkpoint.from_directory(str(files)) if any(files.iterdir()) else None
                    ray.train.report({"grpo_step": state.global_step}, checkpoint=checkpoint,
                                     checkpoint_dir_name=directory.name)

        return ReportToRayTrain()


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

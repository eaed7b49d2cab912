"""SAPO: train the draft to write the steps the target would write, briefly (DREAM-R).

    python -m pipelines.sapo trajectories=runs/collect/<dir>/trajectories.jsonl
    python -m pipelines.sapo tiny trajectories=...           # random tiny draft, seconds
    python -m pipelines.sapo run.resume=runs/sapo/<dir>       # continue from the last checkpoint

1. warm start: TRL's SFT trainer on the target's answers (prompt -> completion, loss on the completion);
2. GRPO (TRL) on three rewards from `rewards.sapo`: R_align (the share, or accepted prefix, of the rollout's
   steps that the verifier accepts against the target trajectory's steps), R_length (min(1, L_target /
   L_rollout)), R_outcome (math-verify); weights 1:1:1 by default; TRL logs each reward's mean and std per step;
3. the trained draft is saved as a model directory (<run_dir>/draft) that `pipelines.evaluate` loads by path.
Checkpoints every `grpo.save_steps`; a resumed run continues the step counter and optimizer state.
Not yet: the online alignment mode through the target actor, Ray Train workers and DeepSpeed, LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from actors import zoo
from pipelines.config import ConfigError, SapoConfig, run_cli
from pipelines.runs import make_run_dir, read_jsonl, save_config, write_json
from pipelines.tracking import Tracker
from rewards import sapo as R
from rewards.verifiers import Exact


def load_trajectories(cfg: SapoConfig, tok) -> list[dict]:
    """Rows of a collect run, checked against the draft's tokenizer before any training."""
    if not cfg.trajectories:
        raise ConfigError("config key 'trajectories': give the trajectories.jsonl of a pipelines.collect run")
    path = Path(cfg.trajectories)
    if not path.is_file():
        raise ConfigError(f"config key 'trajectories': {path} does not exist")
    rows = read_jsonl(path)
    if not rows:
        raise ConfigError(f"{path} holds no trajectories")
    for i, row in enumerate(rows, 1):
        missing = {"prompt_ids", "steps", "response", "answer", "question"} - set(row)
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
    if any(t >= vocab for row in rows for t in row["prompt_ids"]):
        raise ConfigError(f"{path}: token ids beyond the draft's vocabulary ({vocab})")
    return rows


def reward_functions(cfg: SapoConfig, tok, verifier):
    delim = cfg.step_delimiter

    async def align(completions, target_steps, question, **_):
        out = []
        for c, steps, q in zip(completions, target_steps, question):
            out += await R.offline_align(verifier, q, [c], steps, delim, cfg.rewards.align_form)
        return out

    def length(completions, target_tokens, **_):
        return [R.length_reward(len(tok(c, add_special_tokens=False).input_ids), n)
                for c, n in zip(completions, target_tokens)]

    def outcome(completions, answer, **_):
        return [R.outcome_reward(c, a) for c, a in zip(completions, answer)]

    align.__name__, length.__name__, outcome.__name__ = "r_align", "r_length", "r_outcome"
    return [align, length, outcome]


def _verifier(cfg: SapoConfig):
    if cfg.rewards.verifier == "exact":
        return Exact("normalized")
    from actors.encoder import EncoderHost
    from rewards.verifiers import Embedding

    return Embedding(EncoderHost(), cfg.rewards.threshold)


def _last_checkpoint(out: Path) -> str | None:
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(ckpts[-1]) if ckpts else None


def run(cfg: SapoConfig) -> tuple[Path, dict]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    cfg.rewards.check()
    model, tok = zoo.load_model(cfg.draft.name, cfg.draft.dtype, "cpu", cfg.draft.trust_remote_code)
    rows = load_trajectories(cfg, tok)
    run_dir = make_run_dir(cfg, "sapo")
    resolved = save_config(cfg, run_dir, "sapo")
    tracker = Tracker(cfg.wandb, run_dir, "sapo", resolved)
    report = "wandb" if tracker.mode != "disabled" else "none"
    prompts = [tok.decode(r["prompt_ids"]) for r in rows]
    summary: dict = {"trajectories": len(rows)}

    warm_dir = run_dir / "warm_start"
    if cfg.warm_start.enabled and not (warm_dir / "config.json").is_file():
        data = Dataset.from_list([{"prompt": p, "completion": r["response"] + (tok.eos_token or "")}
                                  for p, r in zip(prompts, rows)])
        sft = SFTTrainer(model=model, processing_class=tok, train_dataset=data, args=SFTConfig(
            output_dir=str(run_dir / "sft"), num_train_epochs=cfg.warm_start.epochs,
            learning_rate=cfg.warm_start.learning_rate, per_device_train_batch_size=cfg.warm_start.batch_size,
            max_length=cfg.warm_start.max_length, use_cpu=True, report_to=report, logging_steps=1,
            save_strategy="no", bf16=False))
        result = sft.train()
        summary["warm_start_loss"] = result.training_loss
        sft.model.save_pretrained(warm_dir)
        tok.save_pretrained(warm_dir)
    if cfg.warm_start.enabled:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(warm_dir), dtype=torch.float32)

    data = Dataset.from_list([{"prompt": p, "answer": r["answer"], "question": r["question"],
                               "target_steps": r["steps"], "target_tokens": r["num_tokens"]}
                              for p, r in zip(prompts, rows)])
    g = cfg.grpo
    w = cfg.rewards
    out = run_dir / "grpo"
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=reward_functions(cfg, tok, _verifier(cfg)),
                          train_dataset=data, args=GRPOConfig(
                              output_dir=str(out), max_steps=g.steps, per_device_train_batch_size=g.num_generations,
                              num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                              learning_rate=g.learning_rate, beta=g.beta, temperature=g.temperature,
                              reward_weights=[w.align, w.length, w.outcome], use_cpu=True, report_to=report,
                              logging_steps=1, save_steps=g.save_steps, bf16=False, seed=0))
    resume = _last_checkpoint(out)
    if resume:
        print(f"resuming GRPO from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "reward" in h]
    summary.update(grpo_steps=trainer.state.global_step, grpo_loss=result.training_loss,
                   rewards={k: [h.get(f"rewards/{k}/mean") for h in history] for k in ("r_align", "r_length",
                                                                                       "r_outcome")})
    draft_dir = run_dir / "draft"
    trainer.model.save_pretrained(draft_dir)
    tok.save_pretrained(draft_dir)
    summary["draft"] = str(draft_dir)
    write_json(run_dir / "summary.json", summary)
    tracker.finish()
    print(json.dumps(summary, indent=2))
    return draft_dir, summary


def main(argv: list[str] | None = None) -> None:
    run_cli("sapo", run, argv)


if __name__ == "__main__":
    main()

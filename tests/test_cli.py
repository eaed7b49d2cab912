"""First contact with bad input: every job refuses a user's mistake with one line (`error: ...`, exit code 2), before
any model loads, and leaves the runs tree byte-identical; `--debug` shows the traceback instead."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad inputs on disk, and a runs tree holding runs of two jobs (their configs, as the jobs save them)."""
    from actors import zoo
    from pipelines.config import load_config
    from pipelines.runs import RunDir, save_config
    from pipelines.schema import EvaluateConfig, QuantizeConfig
    from quant.apply import QuantSpec, plan, quantize_tensor
    from quant.checkpoint import save

    d = tmp_path_factory.mktemp("inputs")
    (d / "no-config").mkdir()
    (d / "rows.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n{"question": 7}\n')
    (d / "broken.yaml").write_text("data: {num_problems: 3\ngeneration: [\n")
    runs = d / "runs"
    rtn = runs / "quantize" / "20260101-000000-rtn"
    rtn.mkdir(parents=True)
    save_config(load_config(QuantizeConfig, "quantize", ["tiny", "method=rtn"]), RunDir(str(rtn)), "quantize")
    ev = runs / "evaluate" / "20260101-000000-ev"
    ev.mkdir(parents=True)
    save_config(load_config(EvaluateConfig, "evaluate", ["tiny"]), RunDir(str(ev)), "evaluate")
    model, tok = zoo.load_model("tiny-llama", device="cpu")  # a quantized checkpoint with a corrupt shard
    spec = QuantSpec("rtn", 4, 32)
    ckpt = save(d / "ckpt", model, tok, {t.name: quantize_tensor(t.get(), spec, r) for t, r in plan(model, spec)},
                {"method": "rtn"})
    shard = next(ckpt.glob("quantized-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    return {"dir": d, "runs": runs, "rtn": rtn, "ev": ev}


# (job, arguments, a phrase the one-line message must hold); {d}: the inputs, {runs}: the runs tree
REFUSALS = [
    ("evaluate", ["tiny", "target.model.name=/no/such/dir"], "'/no/such/dir' does not exist"),
    ("evaluate", ["tiny", "target.model.name={d}/no-config"], "has no config.json"),
    ("evaluate", ["tiny", "draft.model.name=tiny-llama-draft-l9"], "first 9 layers of 'tiny-llama', which has 2"),
    ("evaluate", ["tiny", "verifier.kind=embedding", "verifier.threshold=2.0"], "verifier.threshold"),
    ("evaluate", ["tiny", "target.model.name={d}/ckpt"], "does not match its hash"),
    ("evaluate", ["run.resume={ev}", "generation.max_new_tokens=8", "data.num_problems=3"],
     "['data.num_problems', 'generation.max_new_tokens']"),
    ("collect", ["tiny", "data.source=jsonl", "data.path={d}/rows.jsonl"], "row 2 has no text field 'question'"),
    ("collect", ["tiny", "data.source=jsonl", "data.path={d}/missing.jsonl"], "does not exist"),
    ("collect", ["tiny", "data.name=no_such_gym"], "reasoning-gym dataset 'no_such_gym'"),
    ("collect", ["tiny", "data.source=hub", "data.name=gsm8k"], "cannot load hub dataset 'openai/gsm8k'"),
    ("collect", ["{d}/broken.yaml"], "not valid YAML"),
    ("collect", ["tiny", "run.resume={runs}/collect/nothing-here"], "does not exist"),
    ("collect", ["tiny", "run.resume={rtn}"], "holds a 'quantize' run, not collect"),
    ("quantize", ["tiny", "run.resume={rtn}", "method=hqq"], "['method']"),
    ("quantize", ["tiny", "method=codequant", "bits=3"], "codebooks have 16 centroids"),
    ("quantize", ["tiny", "bits=5"], "MiLo is 3-bit"),
    ("quantize", ["tiny", "compare=[rtn]", "ppl_tokens=0"], "config key 'compare'"),
    ("sweep", ["tiny", "base=no_such_base"], "unknown preset 'no_such_base'"),
    ("sweep", ["tiny", "metric=lr_async/speedup"], "config key 'metric': 'lr_async/speedup' is not"),
    ("sweep", ["tiny", "grid={{draft.model.name: [tiny-llama-draft-l1, tiny-llama-draft-l7]}}"], "first 7 layers"),
    ("sapo", ["tiny", "trajectories={d}/missing.jsonl"], "does not exist"),
    ("sapo", ["tiny", "trajectories={d}/rows.jsonl", "draft.name=/no/such/draft"], "does not exist"),
    ("demo", ["tiny", "collect.target.model.name={d}/no-config"], "has no config.json"),
]


@pytest.mark.parametrize("job, args, phrase", REFUSALS, ids=[f"{j}:{' '.join(a)[:60]}" for j, a, _ in REFUSALS])
def test_a_refused_job_says_one_line_and_leaves_nothing_behind(job, args, phrase, inputs, capsys):
    import importlib

    runs = inputs["runs"]
    args = [a.format(d=inputs["dir"], runs=runs, rtn=inputs["rtn"], ev=inputs["ev"]) for a in args]
    args.append(f"run.storage={runs}")
    before = _tree(runs)
    main = importlib.import_module(f"pipelines.{job}").main
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert phrase in err[0], err[0]
    assert _tree(runs) == before  # no new run directory, no config.yaml rewritten


def test_the_command_line_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SPECMOE_DEBUG", None)
    cmd = [sys.executable, "-m", "pipelines.collect", "tiny", "target.model.name=/no/such/dir",
           f"run.storage={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: model path '/no/such/dir' does not exist", out.stderr
    out = subprocess.run(cmd + ["--debug"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1 and "Traceback" in out.stderr and "ModelNotFound" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_may_change_only_its_resumable_keys(inputs):
    """A resumed evaluation may move its actors; anything that changes results is refused, naming the keys."""
    from pipelines.config import load_config
    from pipelines.schema import ConfigError, EvaluateConfig, QuantizeConfig

    cfg = load_config(EvaluateConfig, "evaluate", [f"run.resume={inputs['ev']}", "target.actor.num_cpus=1",
                                                   "wandb.mode=disabled"])
    assert cfg.target.actor.num_cpus == 1 and cfg.run.resume == str(inputs["ev"])
    with pytest.raises(ConfigError, match=r"lookahead.gamma: 2 -> 3"):
        load_config(EvaluateConfig, "evaluate", ["tiny", f"run.resume={inputs['ev']}", "lookahead.gamma=3"])
    assert load_config(QuantizeConfig, "quantize", [f"run.resume={inputs['rtn']}", "num_workers=4"]).num_workers == 4

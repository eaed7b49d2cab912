"""pipelines.quantize under real Ray: a killed run resumes without redoing finished tensors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.runs import read_jsonl
from quant.checkpoint import load_quantized

ROOT = Path(__file__).resolve().parent.parent


def _job(args, env_extra=None, **kw):
    # WANDB_SERVICE (set by an earlier in-process W&B run) would attach the job to this process's W&B service
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_MODE": "offline"} | (env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "pipelines.quantize", "tiny", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


@pytest.mark.slow
def test_killed_quantize_job_resumes(tmp_path):
    args = [f"run.storage={tmp_path}", "rounds=40", "ppl_tokens=0"]
    job = _job(args)
    run_dir = None
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        # a tensor is done when its line is in tensors.jsonl (its file is written before that line)
        found = [r for r in tmp_path.glob("quantize/*/tensors.jsonl") if len(r.read_text().splitlines()) >= 4]
        if found:
            run_dir = found[0].parent
            break
        time.sleep(0.01)
    assert run_dir is not None, job.communicate()[0][-3000:]
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    recorded = [row["file"] for row in read_jsonl(run_dir / "tensors.jsonl")]  # as the resume reads it
    before = {f: (run_dir / "model" / f).stat().st_mtime_ns for f in recorded}
    assert 4 <= len(before) < 24, f"{len(before)} of 24 tensors recorded when the job was killed"
    resumed = _job([f"run.resume={run_dir}", "rounds=40", "ppl_tokens=0"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert f"resuming: {len(before)} of 24 tensors" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tensors_resumed"] == len(before) and summary["tensors_quantized"] == 24 - len(before)  # none redone
    assert {f: (run_dir / "model" / f).stat().st_mtime_ns for f in before} == before  # not rewritten
    # the resumed checkpoint equals an uninterrupted run
    fresh = _job([f"run.storage={tmp_path / 'fresh'}", "rounds=40", "ppl_tokens=0"])
    out2, _ = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, out2[-3000:]
    [fresh_model] = list((tmp_path / "fresh").glob("quantize/*/model"))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    a, b = load_quantized(run_dir / "model")(ids).logits, load_quantized(fresh_model)(ids).logits
    assert torch.equal(a, b)
    assert 3.5 < summary["bits_per_weight"] < 5.5


def test_a_resume_with_another_model_or_bad_settings_is_refused(tmp_path):
    first = _job([f"run.storage={tmp_path}", "rounds=1", "ppl_tokens=0"])
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    [run_dir] = list(tmp_path.glob("quantize/*"))
    manifest = (run_dir / "model" / "specmoe_quant.json").read_text()
    assert len(list((run_dir / "model" / "tensors").glob("*.safetensors"))) == 24  # the checkpoint's, one each
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tensors_quantized"] == summary["tensors"] == 24 and summary["tensors_resumed"] == 0
    assert summary["checkpoint"] == str(run_dir / "model")
    other = _job([f"run.resume={run_dir}", "rounds=1", "ppl_tokens=0", "model.name=tiny-qwen3-moe"])
    out, _ = other.communicate(timeout=600)
    assert other.returncode == 2 and "['model.name']" in out and "Traceback" not in out, out[-2000:]
    assert (run_dir / "model" / "specmoe_quant.json").read_text() == manifest  # nothing lost
    # the other bad inputs: a clear error, no traceback, no run directory
    for args, message in ((["bits=5"], "3-bit"), (["group_size=48"], "does not divide"),
                          (["model.name=tiny-llama", "rank_policy=frequency"], "needs a model with MoE")):
        bad = _job([f"run.storage={tmp_path / 'bad'}", "rounds=1", *args])
        out, _ = bad.communicate(timeout=600)
        assert bad.returncode == 2 and message in out and "Traceback" not in out, (args, out[-2000:])
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_codequant_job_block_finetuning_with_router_kl(tmp_path):
    """method=codequant with block_finetune_steps: the block stage (layer output MSE + router KL) runs, lowers
    the last layer's loss, is recorded in the summary and the manifest, and the checkpoint loads."""
    args = [f"run.storage={tmp_path}", "method=codequant", "bits=4", "rotation_steps=2", "finetune_steps=1",
            "block_finetune_steps=2", "router_kl_weight=2.0", "calib_tokens=64", "ppl_tokens=128",
            "ppl_window=64", "compare=[rtn,kmeans]"]
    job = _job(args)
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-3000:]
    run_dir = next(tmp_path.glob("quantize/*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    before = summary["block_mse_before"] + 2.0 * summary["block_kl_before"]
    after = summary["block_mse_after"] + 2.0 * summary["block_kl_after"]
    assert after < before
    manifest = json.loads((run_dir / "model" / "specmoe_quant.json").read_text())
    assert manifest["block_finetune_steps"] == 2 and manifest["router_kl_weight"] == 2.0
    model = load_quantized(run_dir / "model")
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()
    # CodeQuant scales the LM head by the final norm, so the tied source's head is its own in the checkpoint
    files = {f: (run_dir / "model" / f).read_bytes() for f in ("config.json", "rest.safetensors")}
    config = json.loads(files["config.json"])
    assert config["tie_word_embeddings"] is False
    # a checkpoint written before that was fixed (the source's tied config.json) still loads its own head (here
    # made to differ from the embeddings: the tiny model's norms are ones)
    from safetensors.torch import load_file, save_file

    rest = load_file(run_dir / "model" / "rest.safetensors")
    save_file({**rest, "lm_head.weight": 2 * rest["lm_head.weight"]}, run_dir / "model" / "rest.safetensors")
    (run_dir / "model" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    old = load_quantized(run_dir / "model", verify=False)
    assert torch.equal(old.lm_head.weight, 2 * rest["lm_head.weight"])
    assert torch.equal(old.model.embed_tokens.weight, rest["model.embed_tokens.weight"])
    for f, data in files.items():
        (run_dir / "model" / f).write_bytes(data)
    # the comparison table: fp, the two baselines and this checkpoint, in W&B and comparison.md
    from pipelines.tracking import offline_summary

    logged = offline_summary(run_dir)
    assert logged["quant_comparison/nrows"] == 4 and logged["quant_comparison/ncols"] == 6
    for method in ("rtn", "kmeans", "codequant"):
        assert logged[f"compare/{method}/ppl_delta"] == pytest.approx(
            logged[f"compare/{method}/ppl"] - summary["ppl_source"])
    assert summary["compare/codequant/ppl"] == summary["ppl_quantized"]
    table = (run_dir / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in ("fp", "rtn", "kmeans", "codequant")) and "delta vs fp" in table
    # CodeQuant's own settings are part of the run's identity: resuming it with another expert calibration is refused
    again = _job(args + [f"run.resume={run_dir}", "expert_tokens=all"])
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 2 and "['expert_tokens']" in out, out[-2000:]
    assert json.loads((run_dir / "model" / "specmoe_quant.json").read_text()) == manifest


@pytest.mark.slow
def test_hub_perplexity_text_offline_stops_before_work(tmp_path):
    job = _job([f"run.storage={tmp_path}", "ppl_text=wikitext2", "ppl_protocol=sliding"],
               env_extra={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 2, out[-3000:]
    assert "wikitext" in out and "HF_DATASETS_OFFLINE" in out and "Traceback" not in out
    assert not (tmp_path / "quantize").exists()  # no run directory, no work
    job = _job([f"run.storage={tmp_path}", "compare=[gptq]"])
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 2 and "config key 'compare': unknown methods ['gptq']" in out

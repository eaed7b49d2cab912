"""Real Ray: engine hosts as async actors, the collect job, and `ray job submit` against a real head."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from actors.engine import Request
from actors.hosts import EngineHost, init_ray, start_host
from pipelines.config import load_config
from pipelines.schema import CollectConfig, RayConfig, RoleConfig
from tests.test_engine import PROMPT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def local_ray():
    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


def _tiny_role(**engine):
    role = RoleConfig()
    role.model.name = "tiny-llama"
    role.actor.num_cpus = 0.25
    for k, v in engine.items():
        setattr(role.engine, k, v)
    return role


def test_concurrent_callers_are_batched_and_match_sequential(local_ray):
    role = _tiny_role(torch_threads=1)  # the same threads in the actor and here
    host = start_host("target", role)
    info = ray.get(host.info.remote())
    assert info["role"] == "target" and info["model"] == "tiny-llama" and info["torch_threads"] == 1
    prompts = [PROMPT, PROMPT[:6], PROMPT + [50, 51], PROMPT[:3]]
    local = EngineHost("target", role).engine
    want = [r.token_ids for r in local.generate([Request(p, max_new_tokens=10) for p in prompts])]
    refs = [host.generate.remote([Request(p, max_new_tokens=10)]) for p in prompts]  # four callers at once
    got = [ray.get(r)[0].token_ids for r in refs]
    assert got == want
    # Not bit-identical across processes: MKL's sgemm picks its code path per process (the same process gives the
    # same bits every call; MKL_CBWR=COMPATIBLE makes every process agree), so two processes differ in the last bits.
    probs = ray.get(host.next_token_probs.remote([PROMPT], [5, 6]))
    torch.testing.assert_close(torch.tensor(probs), torch.tensor(local.next_token_probs([PROMPT], [5, 6])),
                               rtol=1e-5, atol=0)
    ray.kill(host)
    torch.set_num_threads(os.cpu_count())  # the in-process engine set this process's threads


def test_an_actor_without_torch_threads_uses_the_cpus_ray_gave_it(local_ray):
    """engine.torch_threads=0 outside a job's split: the actor's CPU request, not every core of its node (a 4-CPU
    actor on a 64-core node must not spin 64 threads); fractions round up to one thread. Its own instance with 8
    logical CPUs, so that the other tests' actors leave room for a 3-CPU one."""
    ray.shutdown()
    init_ray(RayConfig(num_cpus=8))
    try:
        threads = {}
        for cpus in (0.25, 3.0):
            role = _tiny_role()
            role.actor.num_cpus = cpus
            host = start_host("target", role)
            threads[cpus] = ray.get(host.info.remote(), timeout=300)["torch_threads"]
            ray.kill(host)
        assert threads == {0.25: 1, 3.0: 3}
    finally:
        ray.shutdown()
        init_ray(RayConfig(num_cpus=2))  # the module's instance, for the tests after this one


def test_cancelling_a_call_cancels_its_requests(local_ray):
    host = start_host("target", _tiny_role())
    ray.get(host.info.remote())
    ref = host.generate.remote([Request(PROMPT, max_new_tokens=3000)])
    time.sleep(1.0)
    ray.cancel(ref)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
        ray.get(ref, timeout=60)
    for _ in range(50):
        stats = ray.get(host.stats.remote())
        if stats["live"] == 0 and stats["pending"] == 0 and stats["waiting"] == 0:  # the engine step that drops
            break  # the request returns before its caller's future is popped: wait for all three
        time.sleep(0.2)
    assert stats["live"] == 0 and stats["pending"] == 0 and stats["waiting"] == 0
    [res] = ray.get(host.generate.remote([Request(PROMPT, max_new_tokens=4)]))  # still serving
    assert len(res.token_ids) == 4
    ray.kill(host)


def test_collect_job_writes_a_datasets_loadable_run_and_resumes(local_ray, tmp_path):
    import datasets

    from pipelines import collect

    cfg = load_config(CollectConfig, "collect", ["tiny", f"run.storage={tmp_path}"])
    run_dir = collect.run(cfg)
    rows = datasets.load_dataset("json", data_files=str(run_dir / "trajectories.jsonl"), split="train")
    assert len(rows) == 2 and set(rows.column_names) >= {"question", "answer", "steps", "step_token_ids", "correct"}
    for row in rows:
        assert "".join(row["steps"]) == row["response"]
        assert sum(len(t) for t in row["step_token_ids"]) == row["num_tokens"] <= 24
        assert all(len(t) <= 8 for t in row["step_token_ids"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_problems"] == 2 and summary["accuracy"] is not None
    # resume: finished problems are skipped, nothing is appended twice
    lines = (run_dir / "trajectories.jsonl").read_text()
    cfg2 = load_config(CollectConfig, "collect", ["tiny", f"run.resume={run_dir}"])
    collect.run(cfg2, collect.make_run_dir(cfg2, "collect"))
    assert (run_dir / "trajectories.jsonl").read_text() == lines
    from pipelines.tracking import offline_summary

    assert offline_summary(run_dir)["num_problems"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_ray_job_submit_against_a_real_head(tmp_path):
    ray.shutdown()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    # secrets live in the node's environment (set before `ray start`); a job names them, never holds them
    secrets = {"HF_TOKEN": "hf_specmoeTestSecret0123456789", "WANDB_API_KEY": "specmoe0test0wandb0key0abcdef"}
    env.update(secrets)
    env.pop("RAY_ADDRESS", None)
    env.pop("WANDB_SERVICE", None)  # the job must start its own W&B service, not attach to this process's
    ray_cli = shutil.which("ray", path=str(bin_dir)) or "ray"
    gcs, dash, agent = _free_port(), _free_port(), _free_port()
    temp = Path("/tmp") / f"ray-test-{os.getpid()}"
    # --block keeps the head in this process group: stopping it stops only this head, not the user's clusters
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}", "--num-cpus=2",
                             f"--temp-dir={temp}", "--include-dashboard=true"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        # ready to take a job: the head node's job agent is up (a submit before it registers fails with "No
        # available agent to submit job" on a busy machine) and the head's job API answers (with the token)
        deadline = time.time() + 300
        while not (_answers(f"http://127.0.0.1:{agent}/api/healthz") and subprocess.run(
                [ray_cli, "job", "list", "--address", address], env=env, capture_output=True, timeout=60).returncode == 0):
            assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
            time.sleep(1)
        out_dir = tmp_path / "runs"

        runtime_env = json.dumps({"env_vars": {k: "${" + k + "}" for k in secrets}})  # references, expanded per node
        probe = ("import os, sys; sys.exit(0 if all(os.environ.get(k) == v for k, v in "
                 + repr(secrets) + ".items()) else 3)")

        def submit(*args, entry=None):
            command = entry or ["python", "-m", "pipelines.collect", "tiny", "data.num_problems=1", *args]
            return subprocess.run([ray_cli, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                                   "--runtime-env-json", runtime_env, "--", *command],
                                  env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)

        seen = submit(entry=["python", "-c", probe])  # the job's processes do get the secrets
        assert seen.returncode == 0, (seen.stdout + seen.stderr)[-2000:]
        done = submit(f"run.storage={out_dir}", "wandb.mode=offline")
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        assert "succeeded" in done.stdout.lower()
        [run_dir] = list((out_dir / "collect").iterdir())
        assert json.loads((run_dir / "summary.json").read_text())["num_problems"] == 1
        assert any(run_dir.rglob("*.wandb"))  # the W&B run is there, and holds no secret either
        for f in [p for p in run_dir.rglob("*") if p.is_file()]:
            data = f.read_bytes()
            assert not any(v.encode() in data for v in secrets.values()), f"a secret is in {f}"
        assert not any(v in done.stdout + done.stderr for v in secrets.values())  # nor in the job's log
        # a relative run.storage would land in Ray's copy of the working directory: refused, one line, nothing written
        refused = submit("run.storage=runs")
        assert refused.returncode != 0 and "run.storage='runs' is relative" in refused.stdout + refused.stderr
        # the job wrote nothing into Ray's copy of the working directory (only what was uploaded is there)
        shipped = set(subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout.split())
        copies = list(temp.glob("session_*/runtime_resources/working_dir_files/*"))
        assert copies, "no working-dir copy found"
        for copy in copies:
            found = {str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
            assert found <= shipped, sorted(found - shipped)[:10]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_demo_tiny_end_to_end(local_ray, tmp_path):
    from pipelines import demo
    from pipelines.schema import DemoConfig

    run_dir = demo.run(load_config(DemoConfig, "demo", ["tiny", f"run.storage={tmp_path}"]))
    text = (run_dir / "report.md").read_text()
    assert "## Models" in text and "## Collected trajectories" in text and "| lr_async+sd |" in text
    assert "| milo |" in text and "| codequant |" in text
    assert "| rtn (baseline) |" in text and "delta vs fp" in text  # the quantize run's compare=[rtn]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["models"]["moe"]["ppl"] > 0 and summary["evaluate"]["methods"]["fpsr"]["answer_agreement"] == 1.0
    assert (run_dir / "demo.png").stat().st_size > 1000
    # the SAPO stage: the draft trained on the collected trajectories, evaluated beside the unaligned one
    assert "## SAPO: the aligned draft" in text
    assert [a["draft"] for a in summary["draft_comparison"]] == ["unaligned", "SAPO"]
    assert summary["evaluate_sapo"]["draft"] == summary["sapo"]["draft"]

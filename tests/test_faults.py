"""Failures on a real multi-node Ray (`ray.cluster_utils.Cluster`: a head and two workers on this machine): a model
actor killed mid-evaluate, a worker node removed mid-quantize and mid-sweep. Each job finishes, keeps what it had
stored, and loses nothing."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.schema import EvaluateConfig, QuantizeConfig, SweepConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from actors.hosts import PROCESS_ENV, without_env

    ray.shutdown()
    with without_env(*PROCESS_ENV):  # the nodes' processes must not attach to this process's W&B service
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
        for name in ("w1", "w2"):
            c.add_node(num_cpus=1, resources={"worker": 1, name: 1})
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="specmoe")
    yield c
    ray.shutdown()
    c.shutdown()


def _in_thread(fn, *args):
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test)
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _wait_for(condition, thread, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and thread.is_alive():
        if condition():
            return True
        time.sleep(0.05)
    return False


def _finish(thread, box, timeout=600):
    thread.join(timeout)
    assert not thread.is_alive(), "the job did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


def _actors(class_name: str, detail: bool = False) -> list[dict]:
    """The actors of a class on this test's cluster (named by its address: other Ray instances may run here)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", class_name)],
                       detail=detail)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_model_actor_killed_mid_evaluate_restarts_and_every_problem_is_done_once(cluster, tmp_path):
    from pipelines.evaluate import evaluate

    cfg = load_config(EvaluateConfig, "evaluate", [
        "tiny", f"run.storage={tmp_path}", "data.num_problems=6", "methods=[ar,lr_sync]",
        "generation.max_new_tokens=48", "target.actor.max_restarts=1", "draft.actor.max_restarts=1",
        "target.actor.resources={worker: 0.01}", "draft.actor.resources={worker: 0.01}"])
    thread, box = _in_thread(evaluate, cfg)
    traces = lambda: next(iter(tmp_path.glob("evaluate/*/traces/ar.jsonl")), Path("/nonexistent"))  # noqa: E731
    assert _wait_for(lambda: len(_rows(traces())) >= 1, thread), box
    [victim] = [a for a in _actors("EngineHost") if a["state"] == "ALIVE" and a.get("pid")][:1]
    os.kill(victim["pid"], signal.SIGKILL)  # the process dies as on an OOM kill or a crash
    run_dir, summary = _finish(thread, box)
    for method in ("ar", "lr_sync"):
        ids = [r["problem_id"] for r in _rows(Path(run_dir.path) / "traces" / f"{method}.jsonl")]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 6, (method, ids)
    restarted = [a for a in _actors("EngineHost", detail=True) if a["actor_id"] == victim["actor_id"]]
    assert restarted and restarted[0].get("num_restarts", 1) >= 1
    assert summary["methods"]["ar"]["num_problems"] == 6


def test_a_worker_node_removed_mid_quantize_loses_and_redoes_nothing(cluster, tmp_path):
    from pipelines import quantize

    cfg = load_config(QuantizeConfig, "quantize", ["tiny", f"run.storage={tmp_path}", "rounds=40", "ppl_tokens=0",
                                                   "task_resources={worker: 0.01}", "num_workers=2"])
    thread, box = _in_thread(quantize.run, cfg)
    ledger = lambda: next(iter(tmp_path.glob("quantize/*/tensors.jsonl")), Path("/nonexistent"))  # noqa: E731
    assert _wait_for(lambda: len(_rows(ledger())) >= 4, thread), box
    victim = [n for n in cluster.worker_nodes if "w2" in (n._ray_params.resources or {})][0]
    run_dir = ledger().parent
    stored = {r["file"]: (run_dir / "model" / r["file"]).stat().st_mtime_ns for r in _rows(ledger())}
    cluster.remove_node(victim)
    checkpoint, summary = _finish(thread, box)
    assert summary["tensors_quantized"] == summary["tensors"] == 24
    assert {f: (run_dir / "model" / f).stat().st_mtime_ns for f in stored} == stored  # none rewritten
    rows = _rows(ledger())
    assert sorted(r["name"] for r in rows) == sorted({r["name"] for r in rows})  # each recorded once
    from quant.checkpoint import load_quantized, verify_files

    assert len(verify_files(checkpoint)["tensors"]) == 24  # nothing lost: every file there, every hash right
    import torch

    assert torch.isfinite(load_quantized(checkpoint)(torch.tensor([[1, 2, 3]])).logits).all()
    from actors.hosts import PROCESS_ENV, without_env

    with without_env(*PROCESS_ENV):
        cluster.add_node(num_cpus=1, resources={"worker": 1, "w2": 1})  # for the next test
    cluster.wait_for_nodes()


def test_a_worker_node_removed_mid_sweep_finishes_every_trial_keeping_finished_problems(cluster, tmp_path):
    from pipelines import sweep

    cfg = load_config(SweepConfig, "sweep", ["tiny", f"run.storage={tmp_path}"])
    cfg.grid, cfg.metric = {"lookahead.gamma": [1, 2]}, "lr_sync/speedup"
    cfg.overrides = ["methods=[ar,lr_sync]", "data.num_problems=4", "generation.max_new_tokens=32",
                     "target.actor.resources={worker: 0.01}", "draft.actor.resources={worker: 0.01}"]
    thread, box = _in_thread(sweep.run, cfg)
    traces = lambda: list(tmp_path.glob("sweep/*/trials/evaluate/*/traces/ar.jsonl"))  # noqa: E731
    assert _wait_for(lambda: any(len(_rows(t)) >= 1 for t in traces()), thread), box
    [first] = [t for t in traces() if _rows(t)]
    before = _rows(first)

    hosts = [a for a in _actors("EngineHost") if a["state"] == "ALIVE"]
    node_ids = {a["node_id"] for a in hosts}
    victim = [n for n in cluster.worker_nodes if n.node_id in node_ids][0]
    cluster.remove_node(victim)
    sweep_dir = _finish(thread, box, timeout=900)
    summary = json.loads((Path(sweep_dir.path) / "summary.json").read_text())
    assert len(summary["trials"]) == 2 and not any("error" in t for t in summary["trials"]), summary
    runs = list(Path(sweep_dir.path).glob("trials/evaluate/*"))
    assert len(runs) == 2  # the restarted trial continued its own run, not a new one
    for run in runs:
        for method in ("ar", "lr_sync"):
            ids = [r["problem_id"] for r in _rows(run / "traces" / f"{method}.jsonl")]
            assert sorted(ids) == sorted(set(ids)) and len(ids) == 4, (run, method, ids)
    assert _rows(first)[:len(before)] == before  # what was stored before the node died was kept, not redone

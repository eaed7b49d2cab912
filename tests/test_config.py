import pytest

from pipelines.config import load_config
from pipelines.schema import CollectConfig, ConfigError


def test_demo_preset_and_overrides():
    cfg = load_config(CollectConfig, "collect", ["data.num_problems=7", "generation.sampling.temperature=0.5"])
    assert cfg.data.num_problems == 7
    assert cfg.generation.sampling.temperature == 0.5
    assert cfg.target.model.name == "smollm2-135m-instruct"
    assert cfg.generation.step_delimiter == "\n\n"


def test_named_preset_and_file(tmp_path):
    assert load_config(CollectConfig, "collect", ["tiny"]).target.model.name == "tiny-llama"
    f = tmp_path / "mine.yaml"
    f.write_text("data: {num_problems: 3}\ntarget: {engine: {speculation: {method: ngram, num_tokens: 6}}}\n")
    cfg = load_config(CollectConfig, "collect", [str(f), "run.name=x"])
    assert cfg.data.num_problems == 3 and cfg.target.engine.speculation.num_tokens == 6 and cfg.run.name == "x"


@pytest.mark.parametrize("args, needle", [
    (["data.num_problemz=3"], "data.num_problemz"),
    (["target.model.nmae=x"], "target.model.nmae"),
    (["data.num_problems=three"], "data.num_problems"),
    (["generation.sampling.top_p=1.5"], "generation.sampling.top_p"),
    (["data.source=s3"], "data.source"),
    (["target.engine.speculation.method=eagle"], "target.engine.speculation.method"),
    (["target.engine.speculation.num_tokens=0"], "target.engine.speculation.num_tokens"),
    (["nope"], "unknown preset"),
    (["data.num_problems"], "unknown preset"),
])
def test_bad_config_names_the_key(args, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CollectConfig, "collect", args)
    assert needle in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("generation: {max_new_tokenz: 5}\n")
    with pytest.raises(ConfigError, match="max_new_tokenz"):
        load_config(CollectConfig, "collect", [str(f)])
    with pytest.raises(ConfigError, match="not found"):
        load_config(CollectConfig, "collect", [str(tmp_path / "missing.yaml")])


def test_demo_sapo_stage_keys():
    from pipelines.schema import DemoConfig

    cfg = load_config(DemoConfig, "demo", [])
    assert cfg.sapo == "demo" and cfg.sapo_methods == ["lr_async+sd"]
    assert cfg.evaluate.data.offset >= cfg.collect.data.offset + cfg.collect.data.num_problems  # held out
    assert load_config(DemoConfig, "demo", ["sapo=null"]).sapo is None
    with pytest.raises(ConfigError, match="sapo_methods"):
        load_config(DemoConfig, "demo", ["sapo_methods=[lr_fast]"])


def test_config_page_is_generated_from_the_schema():
    """docs/config.md is what `python -m pipelines.config_doc` writes from the typed configs: a key added, renamed or
    re-documented without regenerating the page fails here."""
    from pipelines import config_doc

    assert config_doc.PAGE.read_text() == config_doc.page(), "run `python -m pipelines.config_doc`"
    text = config_doc.page()
    for job in config_doc.ORDER:
        assert f"## {job}" in text
    assert "| `lookahead.gamma` | int | `4` | >= 1 |" in text
    assert "| `verifier.kind` | str | `\"tbvm\"` | `exact` / `embedding`" in text
    assert "|  |\n" not in text  # every key says what it does


def test_a_sweep_grid_given_on_the_command_line_replaces_the_presets():
    from pipelines.schema import SweepConfig

    cfg = load_config(SweepConfig, "sweep", ["tiny", "grid={draft.model.name: [tiny-llama-draft-l1]}"])
    assert cfg.grid == {"draft.model.name": ["tiny-llama-draft-l1"]}
    assert load_config(SweepConfig, "sweep", ["tiny"]).grid == {"lookahead.gamma": [1, 2],
                                                                 "verifier.kind": ["exact", "always"]}


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("data:\n  num_problems: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+, column \d+: not valid YAML"):
        load_config(CollectConfig, "collect", [str(f)])

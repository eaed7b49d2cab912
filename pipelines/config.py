"""Loading configs: a preset (or YAML file), then `key.path=value` overrides, then validation; resume rules.

Every job is `python -m pipelines.<job> [PRESET | FILE.yaml] [key.path=value ...]`. The schema (`pipelines.schema`)
gives the keys and defaults; `conf/<job>/<preset>.yaml` holds what a preset changes. OmegaConf's struct mode rejects
unknown keys and wrong types; `validate` then checks choices and bounds, naming the key path. A `run.resume=DIR` is
checked here too, before a job creates or touches anything: DIR must hold a run of the same job whose saved config
agrees with this one in every key that changes results (`ResumeRule` of each schema).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

from pipelines.schema import ConfigError, ResumeRule

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def presets(job: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / job).glob("*.yaml"))


def _preset_path(job: str, preset: str) -> Path:
    if preset.endswith((".yaml", ".yml")) or "/" in preset:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file not found: {preset}")
        return path
    path = CONF_DIR / job / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r} for job {job!r}; known: {presets(job)}")
    return path


def _load_yaml(path: Path):
    """A preset or config file, read with OmegaConf's YAML loader (which reads 1e-5 as a float)."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path}: holds a list, not a mapping of keys")
    return data


def load_config(schema: type, job: str, args: list[str] | None = None, preset: str = "demo"):
    """Build a validated config object from a preset (or YAML file) and `key.path=value` overrides. With
    `run.resume=DIR` and no preset, the base is the config DIR's run saved (so `python -m pipelines.<job>
    run.resume=DIR` continues that run as it was configured); with a preset, the result must agree with the saved
    config wherever the job's `ResumeRule` says (else a ConfigError names the keys)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args = list(args or [])
    named = bool(args) and "=" not in args[0]
    if named:
        preset = args.pop(0)
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(f"expected key.path=value overrides, got {bad}")
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("run.resume=")), None)
    saved = saved_config(job, resume) if resume else None
    base = None if saved is not None and not named else _load_yaml(_preset_path(job, preset))
    try:
        base = OmegaConf.create(saved) if base is None else base
        cfg = OmegaConf.structured(schema)
        OmegaConf.set_struct(cfg, True)
        for layer in (base, OmegaConf.from_dotlist(args)):
            _replace_mappings(cfg, layer, schema)
            cfg = OmegaConf.merge(cfg, layer)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    validate(obj)
    if saved is not None:
        check_resume(obj, saved, resume)
    return obj


def _mapping_keys(schema: type, prefix: str = "") -> list[str]:
    """Paths of the schema's free-form mappings (e.g. a sweep's `grid`: {any evaluate key: [values]})."""
    import typing

    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _mapping_keys(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is dict:
            out.append(prefix + f.name)
    return out


def _replace_mappings(cfg, layer, schema: type) -> None:
    """A free-form mapping given by a preset or an override replaces the one before (merging would keep the old
    keys, and struct mode would refuse new ones)."""
    from omegaconf import OmegaConf, open_dict

    for key in _mapping_keys(schema):
        value = OmegaConf.select(layer, key, throw_on_missing=False)
        if value is None:
            continue
        with open_dict(cfg):
            OmegaConf.update(cfg, key, OmegaConf.to_container(value), merge=False)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(layer, parent) if parent else layer
        with open_dict(node):
            node.pop(leaf)


def saved_config(job: str, run_dir: str) -> dict:
    """The resolved config a run of `job` saved in its directory (without the job name)."""
    import yaml

    from actors import storage

    saved = storage.join(run_dir, "config.yaml")
    try:
        if not storage.exists(run_dir):
            raise ConfigError(f"config key 'run.resume': {run_dir} does not exist")
        if not storage.exists(saved):
            raise ConfigError(f"config key 'run.resume': {run_dir} is not a run directory (no config.yaml)")
        text = storage.read_text(saved)
    except (OSError, storage.StorageError) as exc:
        raise ConfigError(f"config key 'run.resume': cannot read {saved}: {exc}") from None
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        raise ConfigError(f"config key 'run.resume': {saved} is not valid YAML (a damaged run directory)") from None
    found = config.pop("job", None) if isinstance(config, dict) else None
    if found != job:
        raise ConfigError(f"config key 'run.resume': {run_dir} holds a {found!r} run, not {job}")
    run = config.get("run")
    if isinstance(run, dict) and "out_dir" in run:  # runs saved before run.storage: where they are is run.resume
        run.pop("out_dir")
    return config


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict stays a value."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def check_resume(cfg, saved: dict, run_dir: str) -> None:
    """A resumed run continues the same work: every key outside its job's `ResumeRule.free` must equal the saved
    config's (a key the saved config lacks counts as the value runs saved before it existed had,
    `ResumeRule.saved_before`, or as its default; keys under a switch count only while the switch is on in the saved
    config or the new one, `ResumeRule.switched`)."""
    rule: ResumeRule = getattr(type(cfg), "RESUME", ResumeRule())
    new, default = flat(dataclasses.asdict(cfg)), flat(dataclasses.asdict(type(cfg)()))
    old_flat = flat(saved)
    old = {k: old_flat.get(k, rule.saved_before.get(k, default.get(k))) for k in new}

    def switched_on(key: str) -> bool:
        return all(on in (old[switch], new[switch]) for prefix, (switch, on) in rule.switched.items()
                   if key.startswith(prefix))

    differ = {k: (old[k], v) for k, v in new.items()
              if old[k] != v and not k.startswith(rule.free) and switched_on(k)}
    if differ:
        changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(f"config key 'run.resume': {run_dir} ran with another config in {sorted(differ)} "
                          f"({changes}); resume with the saved values (run.resume alone) or start a new run")


def _omegaconf_message(exc) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    first = str(exc).splitlines()[0]
    kind = "unknown key" if "not in struct" in first or "Key '" in first and "not" in first else "bad value"
    return f"config key {key!r}: {kind}: {first}" if key else f"config: {first}"


def validate(obj: Any, path: str = "") -> None:
    """Check `choices` and bounds declared in field metadata, recursively; errors name the key path."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {list(meta['choices'])}")
        bounds = [meta.get(b) for b in ("ge", "le", "gt") if meta.get(b) is not None]
        if bounds and isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
            raise ConfigError(f"config key {key!r}: {value!r} must be a finite number")
        if meta.get("gt") is not None and value is not None and value <= meta["gt"]:
            raise ConfigError(f"config key {key!r}: {value!r} must be > {meta['gt']}")
        if meta.get("ge") is not None and value is not None and value < meta["ge"]:
            raise ConfigError(f"config key {key!r}: {value!r} must be >= {meta['ge']}")
        if meta.get("le") is not None and value is not None and value > meta["le"]:
            raise ConfigError(f"config key {key!r}: {value!r} must be <= {meta['le']}")
    check = getattr(obj, "check", None)
    if callable(check):
        check(path) if "path" in inspect.signature(check).parameters else check()


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)

"""A Ray Tune grid of evaluations: every trial is one `pipelines.evaluate` run with some keys changed.

    python -m pipelines.sweep                                   # demo: gamma x verifier on the demo evaluation
    python -m pipelines.sweep tiny                              # a 2x2 grid on random tiny models
    python -m pipelines.sweep run.resume=runs/sweep/<dir>       # finish an interrupted sweep (Tuner.restore)

The grid is `grid: {key.path: [values]}` over any evaluate key (method list, gamma, verifier kind, thresholds,
models). Each trial reserves its actors through a placement-group factory (one bundle for the trial's driver, one
per model actor, sized from the evaluate config), writes its own evaluate run directory and a W&B run in the
sweep's group, and reports every `<method>/<metric>` to Tune. The sweep writes summary.csv, report.md and a plot.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from pipelines.cli import run_cli
from pipelines.config import load_config
from pipelines.schema import ConfigError, EvaluateConfig, SweepConfig, own_verifier_model
from actors import storage
from pipelines.runs import RunDir, make_run_dir, save_config, write_json


def trial_config(sweep: SweepConfig, params: dict, trials: str, group: str) -> EvaluateConfig:
    """A trial's evaluate config: the sweep's base and overrides, its grid point, its run under `trials`."""
    overrides = list(sweep.overrides) + [f"{k}={_as_override(v)}" for k, v in params.items()]
    cfg = load_config(EvaluateConfig, "evaluate", [sweep.base] + overrides)
    name = "-".join(f"{k.split('.')[-1]}={_as_override(v)}" for k, v in params.items()) or "trial"
    cfg.run.storage, cfg.run.name = trials, name.replace("/", "_").replace(" ", "")
    cfg.wandb.group = group
    return cfg


def _as_override(v) -> str:
    return "[" + ",".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else str(v)


def bundles(cfg: EvaluateConfig, driver_cpus: float) -> list[dict]:
    out = [{"CPU": driver_cpus}]
    roles = [cfg.target, cfg.draft] + ([cfg.verifier_role] if own_verifier_model(cfg) else [])
    for role in roles:
        b = {"CPU": role.actor.num_cpus, **role.actor.resources}
        if role.actor.num_gpus:
            b["GPU"] = role.actor.num_gpus
        out.append(b)
    if cfg.verifier.kind == "embedding":
        out.append({"CPU": 0.1})
    return out


def earlier_run(trials: str, name: str) -> str | None:
    """The evaluate run an earlier attempt of this trial left in storage (`<trials>/evaluate/<time>-<name>`), if any."""
    runs = [r for r in storage.listdir(storage.join(trials, "evaluate")) if r.split("-", 2)[-1] == name]
    for run in sorted(runs, reverse=True):
        location = storage.join(trials, "evaluate", run)
        if storage.exists(storage.join(location, "config.yaml")):
            return location
    return None


def flatten(summary: dict) -> dict:
    return {f"{m}/{k}": v for m, s in summary["methods"].items() for k, v in s.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run(sweep: SweepConfig) -> RunDir:
    import ray
    from ray import tune

    from actors.hosts import init_ray

    from pipelines.evaluate import preflight

    for key, values in sweep.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"config key 'grid.{key}': give a non-empty list of values")
    keys = list(sweep.grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(sweep.grid[k] for k in keys))]
    for params in combos:  # every trial config loads and passes evaluate's checks before anything is written
        trial = trial_config(sweep, params, "trials", "")
        preflight(trial)
        method = sweep.metric.split("/", 1)[0]
        if "/" not in sweep.metric or method not in trial.methods:
            raise ConfigError(f"config key 'metric': {sweep.metric!r} is not <method>/<metric> for a method every "
                              f"trial runs (this one runs {trial.methods})")
    sweep_dir = make_run_dir(sweep, "sweep")
    save_config(sweep, sweep_dir, "sweep")
    trials = storage.join(sweep_dir.location, "trials")  # each trial's evaluate run, synced from its own node
    first = trial_config(sweep, combos[0], trials, sweep_dir.name)

    def trainable(params: dict) -> None:
        from pipelines.evaluate import evaluate

        cfg = trial_config(sweep, params, trials, sweep_dir.name)
        cfg.run.resume = earlier_run(trials, cfg.run.name)  # a restarted trial keeps its finished problems
        run_dir, summary = evaluate(cfg)
        tune.report({**flatten(summary), "run_dir": run_dir.location})

    init_ray(sweep.ray)
    resources = tune.PlacementGroupFactory(bundles(first, sweep.trial_cpus))
    metric_mode = dict(metric=sweep.metric, mode=sweep.mode)
    tune_location = storage.join(sweep_dir.location, "tune")  # Tune's experiment state, in run storage
    if sweep.run.resume and tune.Tuner.can_restore(tune_location):
        tuner = tune.Tuner.restore(tune_location, tune.with_resources(trainable, resources), resume_errored=True)
    else:
        tuner = tune.Tuner(tune.with_resources(trainable, resources),
                           param_space={k: tune.grid_search(v) for k, v in sweep.grid.items()},
                           tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials,
                                                       **metric_mode),
                           run_config=tune.RunConfig(name="tune", storage_path=sweep_dir.location, verbose=1,
                                                     failure_config=tune.FailureConfig(max_failures=sweep.max_failures)))
    results = tuner.fit()
    rows = []
    for r in results:
        if r.error:
            rows.append({**r.config, "error": str(r.error).splitlines()[0]})
        else:
            rows.append({**r.config, **{k: v for k, v in r.metrics.items() if "/" in k or k == "run_dir"}})
    write_json(sweep_dir / "summary.json", {"metric": sweep.metric, "mode": sweep.mode, "trials": rows})
    _report(sweep_dir.path, sweep, keys, rows)
    sweep_dir.sync()
    ray.shutdown()
    print((sweep_dir / "report.md").read_text())
    return sweep_dir


def _report(sweep_dir: Path, sweep: SweepConfig, keys: list[str], rows: list[dict]) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({k for r in rows for k in r if k.endswith(("/speedup", "/step_accept_rate", "/accuracy"))})
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + metrics + ["error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    labels = [", ".join(f"{k.split('.')[-1]}={r.get(k)}" for k in keys) for r in rows]
    values = [r.get(sweep.metric) or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4))
    ax.bar(range(len(rows)), values, color="#4c72b0")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax.set_ylabel(sweep.metric)
    fig.tight_layout()
    fig.savefig(sweep_dir / "sweep.png", dpi=110)
    plt.close(fig)
    shown = [m for m in metrics if m.split("/")[0] in {sweep.metric.split("/")[0], "fpsr", "lr_async"}][:6]
    lines = [f"# Sweep: {len(rows)} trials, metric {sweep.metric} ({sweep.mode})", "",
             "| " + " | ".join(keys + shown) + " |", "|---" * (len(keys) + len(shown)) + "|"]
    for r in rows:
        cells = [str(r.get(k)) for k in keys] + [f"{r[m]:.3f}" if isinstance(r.get(m), float) else str(r.get(m, "-"))
                                                 for m in shown]
        lines.append("| " + " | ".join(cells) + " |" + (f" error: {r['error']}" if r.get("error") else ""))
    lines += ["", "![sweep](sweep.png)", ""]
    (sweep_dir / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    run_cli("sweep", run, argv)


if __name__ == "__main__":
    main()

"""Run directories: runs/<job>/<time>-<name>/ with the resolved config, per-item JSONL, summary and report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import yaml


class RunDirError(ValueError):
    pass


def make_run_dir(cfg, job: str) -> Path:
    """A new run directory, or `run.resume` (which must hold a run of the same job)."""
    if cfg.run.resume:
        path = Path(cfg.run.resume)
        saved = path / "config.yaml"
        if not saved.is_file():
            raise RunDirError(f"run.resume={cfg.run.resume!r} is not a run directory (no config.yaml)")
        if yaml.safe_load(saved.read_text()).get("job") != job:
            raise RunDirError(f"run.resume={cfg.run.resume!r} holds a run of another job")
        return path
    path = Path(cfg.run.out_dir) / job / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.run.name}"
    while path.exists():  # two runs in the same second
        path = path.with_name(path.name + "x")
    path.mkdir(parents=True)
    return path


def save_config(cfg, run_dir: Path, job: str) -> dict:
    resolved = {"job": job, **asdict(cfg)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return resolved


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a killed run: everything after it is redone
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")

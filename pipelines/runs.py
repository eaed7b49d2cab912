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


class JsonlError(ValueError):
    pass


def read_jsonl(path: Path, strict: bool = False) -> list[dict]:
    """The rows of a JSONL file that `append_jsonl` writes. Text after the last newline is a row a killed run cut
    short: left out with a warning (a complete JSON object there, from a file written by hand, is kept). A line in the middle that
    is not JSON raises JsonlError naming it when `strict` (a job reading its input: training on part of a file is no
    result); otherwise it is left out with a warning (a resumed job redoes its item)."""
    import warnings

    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    rows = []
    for i, line in enumerate(lines + [tail], 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i > len(lines):  # the cut last row
                warnings.warn(f"{path} line {i} was cut short (a killed run): left out", stacklevel=2)
                continue
            if strict:
                raise JsonlError(f"{path} line {i} is not JSON ({exc.msg}): a corrupt file") from None
            warnings.warn(f"{path} line {i} is not JSON ({exc.msg}): left out", stacklevel=2)
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    """Appends one row. A row a killed run cut short at the end of the file is cut off first, so that the new row
    starts a line of its own (appending after it would corrupt both)."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                keep = data.rfind(b"\n") + 1
                try:  # a complete row without its newline (written by hand): keep it
                    json.loads(data[keep:])
                    f.write(b"\n")
                except ValueError:
                    f.truncate(keep)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")

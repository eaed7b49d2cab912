"""W&B tracking: offline unless the environment provides a key or a mode; one run id per run directory.

The run id is saved in `<run_dir>/wandb_run_id` and reused on resume (`resume="allow"`). The API key is read by
wandb from WANDB_API_KEY; it is never written to a config, a log or the run directory.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def wandb_mode(cfg) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    def __init__(self, cfg, run_dir: Path, job: str, config: dict):
        import wandb

        self.run_dir = Path(run_dir)
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.mode = wandb_mode(cfg)
        if wandb.run is not None:  # an attempt that failed in this process (a Tune actor reused for the retry) left
            wandb.run.finish(exit_code=1)  # its run open: W&B refuses to open that id again while it is
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or job, job_type=job,
                              tags=list(cfg.tags), name=self.run_dir.name, id=run_id, resume="allow",
                              dir=str(self.run_dir), mode=self.mode, config=config,
                              settings=wandb.Settings(console="off", quiet=True))
        self.run_id = run_id

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def image(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


def _offline_records(path: Path):
    """Protobuf records of a `.wandb` file: a 7-byte header (':W&B', magic, version), then LevelDB-log chunks
    (crc32, length, type) in 32 KiB blocks; types FULL=1, FIRST=2, MIDDLE=3, LAST=4."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, block, parts = 7, 32768, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts.append(chunk)
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def offline_summary(run_dir: Path) -> dict:
    """Read back the summary of the latest offline W&B run under a run directory (from its `.wandb` files): every
    segment written under that run's id (a resumed run, a job whose stages each opened it), in order, as W&B shows
    the run once synced: summary keys from the last segment that set them, history keys from the first."""
    import json

    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {run_dir}/wandb")
    segments = [f for f in files if f.name == files[-1].name]
    summary: dict = {}
    for record in (r for f in segments for r in _offline_records(f)):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                summary[key] = json.loads(item.value_json)
        elif record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                summary.setdefault(key, json.loads(item.value_json))
    return summary

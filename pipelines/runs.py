"""Run directories: `<run.storage>/<job>/<time>-<name>/` with the resolved config, per-item JSONL, summary, report.

`run.storage` is a local directory (default `~/specmoe/runs`) or a URI every node reads (`s3://bucket/runs`, ...).
A job writes its run in a local directory on its own node (`RunDir.path`: the run itself when storage is local, else
a staging copy under the node cache) and `sync`s it to storage as it goes (after each finished item, at most every
`run.sync_s` seconds, and at the end), so a resumed run, the next job and the user find everything in storage, from
any node. Artifact directories (a checkpoint, a draft) are `publish`ed with a manifest, which `actors.storage.fetch`
checks on the node that loads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from actors import storage


class RunDirError(ValueError):
    pass


def storage_root(cfg) -> str:
    """`run.storage` as a location: a URI as given, a local path made absolute. Under `ray job submit --working-dir`
    the job runs inside Ray's temporary copy of that directory, which is lost on restart and renamed on every code
    change: a storage path inside it is refused before anything is written."""
    root = cfg.run.storage
    if storage.is_uri(root):
        return root.rstrip("/")
    path = Path(os.path.expanduser(root))
    if not path.is_absolute() and _in_submitted_working_dir():
        raise RunDirError(f"run.storage={root!r} is relative, and this job runs inside Ray's copy of its working "
                          "directory (ray job submit --working-dir), which is deleted with the job's session: set "
                          "run.storage to an absolute path every node reads, or to a URI (s3://bucket/runs)")
    path = path.resolve()
    if _in_submitted_working_dir() and path.is_relative_to(Path.cwd().resolve()):
        raise RunDirError(f"run.storage={root!r} is inside Ray's copy of the job's working directory, which is "
                          "deleted with the job's session: set run.storage outside it, or to a URI (s3://bucket/runs)")
    return str(path)


def _in_submitted_working_dir() -> bool:
    """Whether this process is a job that `ray job submit --working-dir` started (its runtime env names one)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        return bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except ValueError:
        return False


class RunDir:
    """One run: `location` in storage, `path` where this process writes it. Local storage: the same directory."""

    def __init__(self, location: str, path: Path | None = None):
        self.location = location
        remote = storage.is_uri(location) and not location.startswith("file://")
        if path is None:
            path = _staging(location) if remote else Path(storage.filesystem(location)[1])
        self.path = Path(path)
        self.remote = remote
        self._synced: dict[str, tuple[int, int]] = {}
        self._last_sync = 0.0

    @property
    def name(self) -> str:
        return self.path.name

    def child(self, *parts: str) -> "RunDir":
        """A run directory inside this one (the demo's stages), synced on its own."""
        sub = RunDir(storage.join(self.location, *parts), self.path.joinpath(*parts))
        sub.path.mkdir(parents=True, exist_ok=True)
        return sub

    def pull(self, skip: tuple[str, ...] = ()) -> None:
        """Bring the stored run into `path` (a resumed run on any node starts from what storage holds), but for the
        top-level entries named in `skip`."""
        if not self.remote:
            return
        fs, root = storage.filesystem(self.location)
        found = fs.find(root, detail=True)
        # object stores may hold a directory's marker (an empty key; pyarrow writes them) beside its files
        parents = {os.path.dirname(p) for p in found}
        for remote_file, info in sorted(found.items()):
            rel = os.path.relpath(remote_file, root)
            if rel.split("/", 1)[0] in skip or info.get("type") == "directory" or remote_file in parents:
                continue
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote_file, str(target))
            st = target.stat()
            self._synced[rel] = (st.st_size, st.st_mtime_ns)

    def sync(self, every_s: float = 0.0) -> None:
        """Upload what changed since the last sync (every file when storage is remote; nothing when it is local).
        With `every_s`, only if that long has passed since the last one."""
        if not self.remote or time.time() - self._last_sync < every_s:
            return
        fs, root = storage.filesystem(self.location)
        # manifests last: a reader that finds one finds every file it lists
        for file in sorted((p for p in self.path.rglob("*") if p.is_file()), key=lambda p: (p.name == storage.MANIFEST, p)):
            rel = str(file.relative_to(self.path))
            if rel.endswith(".lock") or "/.lock" in rel:
                continue
            st = file.stat()
            if self._synced.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            fs.makedirs(os.path.dirname(f"{root}/{rel}"), exist_ok=True)
            fs.put_file(str(file), f"{root}/{rel}")
            self._synced[rel] = (st.st_size, st.st_mtime_ns)
        self._last_sync = time.time()

    def publish(self, *parts: str, written: dict | None = None) -> str:
        """Write an artifact directory's manifest (files with sizes and sha256), sync, and return its location: what
        another job or actor loads (`target.model.name=<location>`). `written`: files that tasks wrote into the
        artifact's storage directly ({file: {size, sha256}})."""
        local = self.path.joinpath(*parts)
        local.mkdir(parents=True, exist_ok=True)
        (local / storage.MANIFEST).write_text(json.dumps(storage.manifest_of(local, written), indent=1))
        self.sync()
        return storage.join(self.location, *parts) if self.remote else str(local)

    def remove(self, *parts: str) -> None:
        """Delete a file or directory of the run, here and in storage."""
        import shutil

        local = self.path.joinpath(*parts)
        shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
        prefix = str(Path(*parts))
        self._synced = {k: v for k, v in self._synced.items() if k != prefix and not k.startswith(prefix + "/")}
        if self.remote:
            fs, root = storage.filesystem(self.location)
            if fs.exists(f"{root}/{prefix}"):
                fs.rm(f"{root}/{prefix}", recursive=True)

    def __truediv__(self, part) -> Path:  # a file of the run, on this node
        return self.path / part

    def __fspath__(self) -> str:
        return str(self.path)

    def __getattr__(self, name):  # Path operations (glob, exists, parent, ...) act on this node's copy
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.path, name)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.location == self.location

    def __hash__(self) -> int:
        return hash(self.location)

    def __str__(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"


def _staging(location: str) -> Path:
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    return storage.cache_root() / "runs" / f"{key}-{os.path.basename(location.rstrip('/'))}"


def make_run_dir(cfg, job: str) -> RunDir:
    """A new run directory under `run.storage`, or `run.resume` (its saved config was checked when the config
    loaded) brought to this node."""
    if cfg.run.resume:
        run = RunDir(cfg.run.resume if storage.is_uri(cfg.run.resume) else str(Path(cfg.run.resume).resolve()))
        if not storage.exists(storage.join(run.location, "config.yaml")):
            raise RunDirError(f"run.resume={cfg.run.resume!r} is not a run directory (no config.yaml)")
        run.path.mkdir(parents=True, exist_ok=True)
        run.pull()
        return run
    root = storage_root(cfg)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.run.name}"
    location = storage.join(root, job, name)
    while storage.exists(location):  # two runs in the same second
        name += "x"
        location = storage.join(root, job, name)
    run = RunDir(location)
    run.path.mkdir(parents=True, exist_ok=run.remote)  # a staging copy may be left from an earlier try
    return run


def save_config(cfg, run: RunDir, job: str) -> dict:
    resolved = {"job": job, **asdict(cfg)}
    (run.path / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    run.sync()
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

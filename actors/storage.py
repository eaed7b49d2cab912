"""Storage every node can read, and the per-node cache that actors and workers fetch artifacts into.

A location is a local path or a URI that fsspec understands (`s3://bucket/runs`, `gs://...`, `file:///shared/...`;
an S3-compatible server's endpoint comes from FSSPEC_S3_ENDPOINT_URL or AWS_ENDPOINT_URL, keys from the usual AWS
variables). Jobs write their run directories under one root (`run.storage`) and pass artifacts to each other as
locations under it, never as a path on one node's disk.

A directory artifact (a model, a checkpoint) is uploaded with a manifest written last, `specmoe_files.json`: every
file's size and sha256. `fetch` brings a location to this node: a directory once per node, into
`<cache>/fetched/<sha256 of its manifest>/` under a lock (two actors on one node fetch once), every file checked
against the manifest; a file by its size and modification stamp. A local path is returned as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = "specmoe_files.json"


class StorageError(ValueError):
    """A location that cannot be read or written (named in the message)."""


def is_uri(location: str) -> bool:
    return "://" in str(location)


def filesystem(location: str):
    """(fsspec filesystem, path within it) of a location."""
    import fsspec

    if not is_uri(location):
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(str(location)))
    try:
        return fsspec.core.url_to_fs(str(location))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {location}: {exc}") from None


def join(location: str, *parts: str) -> str:
    """A location below another (URIs keep their scheme; local paths stay paths)."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.exists(path)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{location} does not exist") from None


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file; on a local filesystem through a temporary name, so a reader never sees half of it."""
    fs, path = filesystem(location)
    if not is_uri(location) or str(location).startswith("file://"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def listdir(location: str) -> list[str]:
    """Names directly below a location ([] when there is nothing)."""
    fs, path = filesystem(location)
    try:
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(local_dir: Path, known: dict | None = None) -> dict:
    """Every file below a directory with its size and sha256; `known` ({file: {size, sha256}}) are files written
    into storage by others (tasks on other nodes), taken as given and not hashed again."""
    known = dict(known or {})
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file() and p.name != MANIFEST)
    out = {str(p.relative_to(local_dir)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
           for p in files if str(p.relative_to(local_dir)) not in known and ".tmp" not in p.name}
    return {"files": dict(sorted({**out, **known}.items()))}


def upload(local: Path, location: str) -> None:
    """Copy a file or a directory to a location. A directory gets its manifest written last: a reader that finds
    the manifest finds every file it lists."""
    local = Path(local)
    fs, path = filesystem(location)
    if local.is_file():
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.put_file(str(local), path)
        return
    manifest = manifest_of(local)
    if not is_uri(location) and Path(path).resolve() == local.resolve():
        write_text(location + os.sep + MANIFEST, json.dumps(manifest, indent=1))
        return
    for rel in manifest["files"]:
        target = f"{path}/{rel}"
        fs.makedirs(os.path.dirname(target), exist_ok=True)
        fs.put_file(str(local / rel), target)
    write_text(join(location, MANIFEST), json.dumps(manifest, indent=1))


def cache_root() -> Path:
    return Path(os.environ.get("SPECMOE_CACHE", Path.home() / ".cache" / "specmoe"))


class NodeLock:
    """A lock directory on this node, so that parallel actors or workers fetch or build a thing once."""

    def __init__(self, path: Path, timeout_s: float = 1800):
        path = Path(path)
        self.path, self.timeout_s = path.with_name(path.name + ".lock"), timeout_s

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.time() + self.timeout_s
        while True:
            try:
                self.path.mkdir()
                return self
            except FileExistsError:
                if time.time() > deadline or time.time() - self.path.stat().st_mtime > self.timeout_s:
                    shutil.rmtree(self.path, ignore_errors=True)  # a dead holder's lock
                    continue
                time.sleep(0.2)

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


def fetch(location: str, skip: tuple[str, ...] = ()) -> Path:
    """This node's copy of a location: a local path as it is; a remote directory (with a manifest) or file fetched
    once into the node cache, keyed by content, and checked. `skip`: file name endings a directory's copy leaves out
    (a tokenizer or a config needs no weights); such a partial copy has a cache entry of its own."""
    if not is_uri(location) or str(location).startswith("file://"):
        path = Path(filesystem(location)[1])
        if not path.exists():
            raise StorageError(f"{location} does not exist")
        return path
    fs, path = filesystem(location)
    if fs.isdir(path):
        raw = read_bytes(join(location, MANIFEST)) if fs.exists(f"{path}/{MANIFEST}") else None
        if raw is None:
            raise StorageError(f"{location} is a directory without {MANIFEST}: not an artifact a job wrote (a job "
                               "uploads directories with their manifest)")
        manifest = json.loads(raw)
        key = hashlib.sha256(raw).hexdigest()
        if skip:
            manifest = {**manifest, "files": {k: v for k, v in manifest["files"].items() if not k.endswith(skip)}}
            key += "-without-" + hashlib.sha256("|".join(skip).encode()).hexdigest()[:8]
        return _fetch_dir(fs, path, manifest, cache_root() / "fetched" / key, location)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise StorageError(f"{location} does not exist") from None
    stamp = f"{location}|{info.get('size')}|{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"
    final = cache_root() / "fetched" / hashlib.sha256(stamp.encode()).hexdigest() / os.path.basename(path)
    if final.is_file():
        return final
    with NodeLock(final.parent):
        if not final.is_file():
            tmp = final.with_name(final.name + f".tmp{os.getpid()}")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(tmp))
            os.replace(tmp, final)
    return final


def _fetch_dir(fs, path: str, manifest: dict, final: Path, location: str) -> Path:
    done = final / ".complete"
    if done.is_file():
        return final
    with NodeLock(final):
        if done.is_file():
            return final
        shutil.rmtree(final, ignore_errors=True)
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, meta in manifest["files"].items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{path}/{rel}", str(target))
            if target.stat().st_size != meta["size"] or sha256_file(target) != meta["sha256"]:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StorageError(f"{location}: {rel} does not match its {MANIFEST} (corrupt or changed)")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / ".complete").write_text("")
        tmp.rename(final)
    return final

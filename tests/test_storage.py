"""actors.storage: locations every node reads (local paths, file:// and object-store URIs) and the per-node cache.

memory:// is fsspec's in-process filesystem: a real fsspec backend that is not a local path, so the remote branch
(manifest, content-keyed cache, lock, checks) runs without a server; tests/test_cluster.py does the same against
an S3 server."""

import json
import threading

import pytest

from actors import storage


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _artifact(root):
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return root


def test_a_directory_round_trips_through_a_remote_location_and_is_fetched_once(tmp_path, cache):
    src = _artifact(tmp_path / "model")
    location = "memory://bucket/runs/quantize/r1/model"
    storage.upload(src, location)
    manifest = json.loads(storage.read_text(storage.join(location, storage.MANIFEST)))
    assert set(manifest["files"]) == {"config.json", "sub/weights.bin"}
    got = storage.fetch(location)
    assert got.is_relative_to(cache / "fetched")
    assert (got / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()
    mtime = (got / "config.json").stat().st_mtime_ns
    assert storage.fetch(location) == got and (got / "config.json").stat().st_mtime_ns == mtime  # cached
    # the same content uploaded elsewhere is the same cache entry (keyed by the manifest, not the place)
    storage.upload(src, "memory://bucket/other/model")
    assert storage.fetch("memory://bucket/other/model") == got


def test_concurrent_fetches_on_one_node_download_once(tmp_path, cache, monkeypatch):
    location = "memory://bucket/runs/model-b"
    storage.upload(_artifact(tmp_path / "model"), location)
    fs, _ = storage.filesystem(location)
    calls = []
    real = type(fs).get_file

    def counting(self, rpath, lpath, *args, **kwargs):
        calls.append(rpath)
        return real(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(type(fs), "get_file", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(storage.fetch(location))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(calls) == 2  # two files, fetched by one of the four


def test_a_corrupt_remote_file_is_refused_and_nothing_half_fetched_is_kept(tmp_path, cache):
    location = "memory://bucket/runs/model-c"
    storage.upload(_artifact(tmp_path / "model"), location)
    storage.write_bytes(storage.join(location, "sub", "weights.bin"), b"not the weights")
    with pytest.raises(storage.StorageError, match="sub/weights.bin does not match"):
        storage.fetch(location)
    assert not any(p.name.endswith(".complete") for p in (cache / "fetched").rglob("*"))
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.fetch("memory://bucket/nothing")
    storage.write_text("memory://bucket/bare/x.txt", "x")
    with pytest.raises(storage.StorageError, match="without specmoe_files.json"):
        storage.fetch("memory://bucket/bare")


def test_files_and_local_paths(tmp_path, cache):
    storage.write_text("memory://bucket/t/trajectories.jsonl", '{"id": 1}\n')
    got = storage.fetch("memory://bucket/t/trajectories.jsonl")
    assert got.read_text() == '{"id": 1}\n' and got.name == "trajectories.jsonl"
    local = tmp_path / "here.txt"
    storage.write_text(str(local), "local")
    assert storage.fetch(str(local)) == local and storage.fetch(f"file://{local}") == local
    assert storage.join("s3://b/runs", "collect", "r1") == "s3://b/runs/collect/r1"
    assert storage.listdir("memory://bucket/t") == ["trajectories.jsonl"] and storage.listdir(str(tmp_path / "no")) == []

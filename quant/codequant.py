"""CodeQuant: fold RMSNorm scales, learn one orthogonal rotation of the residual stream (Cayley), fuse it, then
per-row 16-centroid codebooks whose centroids are fine-tuned on real text.

1. `fold_norms`: every RMSNorm weight moves into the linears that read its output (q/k/v; router and expert or
   dense gate/up; the LM head, untied from the embeddings), leaving unit norms, so a rotation commutes with them.
2. `learn_rotation`: R = (I - A)(I + A)^-1 with A skew-symmetric (always orthogonal); Adam on A minimises the
   per-token asymmetric 4-bit quantization error of the rotated norm outputs X R on calibration text (a
   straight-through round, so the gradient shrinks each token's range: outliers are spread out).
3. `fuse_rotation`: embeddings, q/k/v (MLA: its q and kv down-projections), router, expert and shared-expert
   gate/up and the head read x R (W <- W R); o_proj and the down projections write into it (W <- R^T W). The fp
   model's outputs are unchanged (tested on Mixtral, Qwen2/3-MoE, OLMoE with its full-width q/k norms, DeepSeek-V3
   with MLA and a shared expert, and dense Llama).
4. `codebooks` + `finetune_centroids`: k-means++ codebooks per output row, weighted by each input column's mean
   squared calibration activation (the row's output error under a diagonal second moment), then SGD on the centroids against each
   linear's fp output on calibration inputs (a centroid moves by the mean gradient of its members), re-assigning
   weights to the nearest centroid after every step; each linear's output MSE is the loss. The calibration inputs
   come from the fp model, or (`sequential`, as GPTQ) layer by layer from the model whose earlier layers are
   already quantized.
5. `finetune_blocks` (optional, after 4): the paper's block-level loss, layer by layer on the input from the
   already quantized layers before it: the layer's output MSE to the fp layer plus, for MoE layers, a weighted
   KL(router_fp || router_q) of the (fp) router on the fp vs quantized MLP input; a step is kept only if the
   layer's loss falls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qkernels.packing import pack
from quant.codebook import CodebookTensor, _nearest, quantize_codebook
from quant.targets import ROUTER_NAMES, Target, quant_targets


@dataclass
class CodeQuantSpec:
    rotation_steps: int = 100
    rotation_lr: float = 1e-3
    rotation_batch: int = 4096  # random rows of the norm outputs per step (0 = all)
    calib_tokens: int = 512  # callers slice the calibration ids to this many tokens
    finetune_steps: int = 10
    finetune_lr: float = 1e-2
    kmeans_iters: int = 20
    codebook_weighting: str = "activation"  # k-means weighted by each input column's mean squared activation; "none"
    expert_tokens: str = "routed"  # fused experts calibrate on the tokens routed to them, or on "all"
    seed: int = 0
    block_finetune_steps: int = 0  # block-level stage (layer output MSE + router KL) after the per-linear one
    router_kl_weight: float = 1.0
    sequential: bool = False  # GPTQ-style: layer l's linears calibrate on inputs from the quantized layers < l


def _mlp_readers(mlp: nn.Module) -> list[tuple[nn.Parameter, int | None]]:
    """Parameters that read the MLP input: (param, None) for [out, in] matrices, fused [E, out, in] as (param, -1)."""
    out = []
    for name, module in mlp.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and (leaf in ROUTER_NAMES or leaf in ("gate_proj", "up_proj", "w1", "w3")):
            out.append((module.weight, None))
        elif isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
            out.append((module.gate_up_proj, -1))
        elif leaf in ROUTER_NAMES and isinstance(getattr(module, "weight", None), nn.Parameter):
            out.append((module.weight, None))
    return out


def _mlp_writers(mlp: nn.Module) -> list[tuple[nn.Parameter, int | None]]:
    out = []
    for name, module in mlp.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in ("down_proj", "w2"):
            out.append((module.weight, None))
        elif isinstance(getattr(module, "down_proj", None), nn.Parameter):
            out.append((module.down_proj, -1))
    return out


# the attention linears that read the residual stream: q/k/v, or multi-head latent attention's down-projections
# (DeepSeek-V2/V3: q_a_proj, or q_proj without a q LoRA rank, and kv_a_proj_with_mqa); o_proj writes into it. Norms
# inside attention (q/k norms, per head or full width as OLMoE's; MLA's latent norms) act on what these linears
# write, which the residual rotation leaves unchanged, so they need no folding.
ATTN_READERS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")


def _attn_readers(attn: nn.Module) -> list[nn.Linear]:
    readers = [getattr(attn, n) for n in ATTN_READERS if isinstance(getattr(attn, n, None), nn.Linear)]
    if not readers or not isinstance(getattr(attn, "o_proj", None), nn.Linear):
        raise ValueError(f"CodeQuant's rotation does not know the attention {type(attn).__name__} (no q/k/v or MLA "
                         "projections and o_proj): quantize this model with method=milo, hqq or rtn")
    return readers


@torch.no_grad()
def fold_norms(model) -> None:
    body = model.model
    for layer in body.layers:
        attn = layer.self_attn
        g = layer.input_layernorm.weight.float()
        for lin in _attn_readers(attn):
            lin.weight.mul_(g[None, :].to(lin.weight.dtype))
        layer.input_layernorm.weight.fill_(1.0)
        g = layer.post_attention_layernorm.weight.float()
        for p, fused in _mlp_readers(layer.mlp):
            p.mul_((g[None, None, :] if fused else g[None, :]).to(p.dtype))
        layer.post_attention_layernorm.weight.fill_(1.0)
    head = model.lm_head
    if head.weight is body.embed_tokens.weight or model.config.tie_word_embeddings:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    head.weight.mul_(body.norm.weight.float()[None, :].to(head.weight.dtype))
    body.norm.weight.fill_(1.0)


@torch.no_grad()
def norm_outputs(model, ids: torch.Tensor) -> torch.Tensor:
    """All norm outputs (the rotated stream's readers' inputs) on calibration tokens: [N, H]."""
    xs = []
    hooks = []
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_hook(lambda m, i, o: xs.append(o.reshape(-1, o.shape[-1]).float())))
    model(ids.unsqueeze(0))
    for h in hooks:
        h.remove()
    return torch.cat(xs)


def _q4_error(x: torch.Tensor) -> torch.Tensor:
    """MSE of per-token asymmetric 4-bit min-max quantization, straight-through on the rounding."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / 15
    t = (x - lo) / scale
    t_q = t + (torch.round(t) - t).detach()
    return ((t_q * scale + lo) - x).pow(2).mean()


def cayley(a: torch.Tensor) -> torch.Tensor:
    skew = a - a.T
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return (eye - skew) @ torch.linalg.inv(eye + skew)


def learn_rotation(x: torch.Tensor, steps: int, lr: float, seed: int = 0,
                   batch: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Adam on the Cayley parameter. `batch` > 0: each step sees that many random rows of x (the loss is a mean
    over tokens, so a minibatch estimates it; 30k norm outputs of the demo MoE cost 1.3 s a step on 2 cores, 4096
    rows 0.2 s). Returns R and the losses: the first and the last on all of x, the steps' own in between."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.zeros(x.shape[1], x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    sample = 0 < batch < len(x)
    with torch.no_grad():
        losses = [_q4_error(x).item()] if sample else []
    for _ in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=gen)] if sample else x
        loss = _q4_error(xb @ cayley(a))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        r = cayley(a)
        losses.append(_q4_error(x @ r).item())
    return r.detach(), losses


@torch.no_grad()
def fuse_rotation(model, r: torch.Tensor) -> None:
    body = model.model
    rd = r.to(body.embed_tokens.weight.dtype)
    body.embed_tokens.weight.copy_(body.embed_tokens.weight @ rd)
    for layer in body.layers:
        attn = layer.self_attn
        for lin in _attn_readers(attn):
            lin.weight.copy_(lin.weight @ rd)
        attn.o_proj.weight.copy_(rd.T @ attn.o_proj.weight)
        if getattr(attn.o_proj, "bias", None) is not None:
            attn.o_proj.bias.copy_(attn.o_proj.bias @ rd)
        for p, _ in _mlp_readers(layer.mlp):
            p.copy_(p @ rd)
        for p, _ in _mlp_writers(layer.mlp):
            p.copy_(rd.T @ p)
    model.lm_head.weight.copy_(model.lm_head.weight @ rd)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (after the layer whose inputs are wanted)."""


def _linear_inputs(model, ids: torch.Tensor, upto: int | None = None) -> dict[str, torch.Tensor]:
    """The input of every quantization target on calibration tokens (fused experts take the MLP input and pick
    their routed tokens from it in `_target_input`); with `upto`, of layer `upto`'s targets only (the forward
    pass stops after that layer)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    layers = model.model.layers
    for li, layer in enumerate(layers):
        if upto is not None and li != upto:
            continue
        for name, module in layer.named_modules():
            full = f"model.layers.{li}.{name}"
            if isinstance(module, nn.Linear):
                hooks.append(module.register_forward_hook(
                    lambda m, i, o, full=full: inputs.__setitem__(full + ".weight", i[0].reshape(-1, i[0].shape[-1]))))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, i, o, li=li: inputs.__setitem__(f"mlp_in.{li}", o.reshape(-1, o.shape[-1]))))

    def stop(*_):
        raise _Stop

    if upto is not None:
        hooks.append(layers[upto].register_forward_hook(stop))
    try:
        with torch.no_grad():
            model(ids.unsqueeze(0))
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return inputs


MIN_ROUTED_TOKENS = 8  # an expert routed fewer calibration tokens than this is calibrated on all of them


def _routed(model, li: int, x: torch.Tensor, expert: int) -> torch.Tensor:
    """The rows of layer `li`'s MLP input x that its router sends to `expert` (top-k of the router logits); all
    rows when the layer has no plain router or the expert gets fewer than MIN_ROUTED_TOKENS of them."""
    layer = model.model.layers[li]
    rw = _router_weight(layer)
    gate = next((m for m in layer.mlp.modules() if getattr(m, "weight", None) is rw), None)
    top_k = getattr(gate, "top_k", None) or getattr(model.config, "num_experts_per_tok", None)
    if rw is None or not top_k:
        return x
    with torch.no_grad():
        rows = ((x.float() @ rw.float().T).topk(int(top_k), -1).indices == expert).any(-1)
    return x[rows] if int(rows.sum()) >= MIN_ROUTED_TOKENS else x


def _target_input(t: Target, inputs: dict, model, routed: bool = True) -> torch.Tensor:
    """A target's input on the calibration tokens; a fused expert sees only the tokens routed to it (`routed`)
    or every token."""
    if t.index is None:
        return inputs[t.name]
    x = inputs[f"mlp_in.{t.layer}"]
    if routed:
        x = _routed(model, t.layer, x, t.index)
    if ".gate_up_proj." in t.name:
        return x
    experts = t.param  # down_proj: the expert's own intermediate activation on its tokens
    module = next(m for m in model.model.layers[t.layer].mlp.modules() if getattr(m, "down_proj", None) is experts)
    gate, up = (x @ module.gate_up_proj[t.index].T).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def finetune_centroids(cb: CodebookTensor, w: torch.Tensor, x: torch.Tensor, steps: int, lr: float) -> CodebookTensor:
    """SGD on centroids against the fp output x W^T; each centroid moves by the mean gradient of its members."""
    out, n = cb.shape
    y = x @ w.float().T
    centroids = cb.centroids.float().reshape(out, -1).clone()  # [out, groups * 16], group = n (per-row codebooks)
    idx = cb.indices().long()
    scale = y.pow(2).mean().clamp_min(1e-12)
    for _ in range(steps):
        c = centroids.clone().requires_grad_(True)
        wq = torch.gather(c, 1, idx)
        loss = (x @ wq.T - y).pow(2).mean() / scale
        (grad,) = torch.autograd.grad(loss, c)
        counts = torch.zeros_like(centroids).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        with torch.no_grad():
            centroids -= lr * grad / counts.clamp_min(1)
            centroids = centroids.sort(1).values
            idx = _nearest(w.float(), centroids)  # re-assign
    packed = pack(idx.to(torch.uint8), 4)
    return CodebookTensor(packed, centroids.half().reshape(out, 1, -1), n, (out, n))


def codequant(model, ids: torch.Tensor, spec: CodeQuantSpec, progress=None) -> dict:
    """Rotate and cluster `model` in place (weights replaced by their codebook values). Returns the results per
    target (for a checkpoint) and the rotation's loss curve."""
    fold_norms(model)
    x = norm_outputs(model, ids)
    r, losses = learn_rotation(x, spec.rotation_steps, spec.rotation_lr, spec.seed, spec.rotation_batch)
    fuse_rotation(model, r)
    targets = quant_targets(model)
    results = {}
    fp_w = {}  # kept only where the block stage must start from the fp model after sequential calibration
    inputs = None if spec.sequential else _linear_inputs(model, ids)
    with torch.no_grad():
        for li in sorted({t.layer for t in targets}):
            mine = [t for t in targets if t.layer == li]
            if spec.sequential:  # the layers before hold their codebook values; this one and those after are fp
                inputs = _linear_inputs(model, ids, upto=li)
            for t in mine:
                w = t.get().float().clone()
                if spec.sequential and spec.block_finetune_steps:
                    fp_w[t.name] = w
                x = _target_input(t, inputs, model, spec.expert_tokens == "routed").float()
                importance = x.pow(2).mean(0) if spec.codebook_weighting == "activation" else None
                cb = quantize_codebook(w, None, spec.kmeans_iters, spec.seed, importance)
                if spec.finetune_steps:
                    with torch.enable_grad():
                        cb = finetune_centroids(cb, w, x, spec.finetune_steps, spec.finetune_lr)
                results[t.name] = cb
                if progress is not None:
                    progress.update()
            if spec.sequential:
                for t in mine:
                    t.set(results[t.name].dequantize())
        if spec.block_finetune_steps:  # the block stage starts from the fp model
            for t in targets if spec.sequential else ():
                t.set(fp_w[t.name])
        else:
            for t in targets:  # write back after all inputs were taken
                t.set(results[t.name].dequantize())
    block = None
    if spec.block_finetune_steps:  # reads the fp model, leaves it quantized
        block = finetune_blocks(model, ids, results, spec.block_finetune_steps, spec.finetune_lr,
                                spec.router_kl_weight)
    return {"results": results, "rotation": r, "rotation_loss_first": losses[0], "rotation_loss_last": losses[-1],
            "block": block}


def quantize_activations(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Per-token asymmetric min-max fake quantization (W4A4's activation side)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    qmax = (1 << bits) - 1
    scale = (hi - lo).clamp_min(1e-8) / qmax
    return (torch.clamp(torch.round((x - lo) / scale), 0, qmax) * scale + lo).to(x.dtype)


def add_activation_fake_quant(model, bits: int = 4) -> list:
    """Quantize the input of every quantized linear and of every expert block to `bits` per token (routers
    keep full-precision inputs: they read the MLP input before this hook only if they sit outside the experts
    module). Returns the hook handles (call .remove() to undo)."""
    handles = []

    def pre_hook(module, args):
        return (quantize_activations(args[0], bits),) + tuple(args[1:])

    for layer in model.model.layers:
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ROUTER_NAMES:
                continue
            if isinstance(module, nn.Linear) or isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
                handles.append(module.register_forward_pre_hook(pre_hook))
    return handles


def router_kl(logits_fp: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(router_fp || router_q) between the routers' softmax distributions."""
    p = torch.log_softmax(logits_fp.float(), -1)
    q = torch.log_softmax(logits_q.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean()


def _router_weight(layer: nn.Module) -> torch.Tensor | None:
    for name, module in layer.mlp.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in ("gate", "router") and isinstance(weight, nn.Parameter) and weight.dim() == 2:
            return weight
    return None


def _layer_call(model, ids: torch.Tensor, li: int):
    """The args and kwargs decoder layer `li` is called with (the model runs up to it and stops)."""
    got = {}

    def pre(m, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs
        raise _Stop

    h = model.model.layers[li].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids.unsqueeze(0), use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return got["args"], got["kwargs"]


def _run_layer(layer: nn.Module, overrides: dict, args, kwargs):
    """(layer output, MLP input) with some parameters replaced by tensors that carry gradients."""
    seen = {}
    h = layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp_in", o))
    try:
        out = torch.func.functional_call(layer, overrides, args, kwargs)
    finally:
        h.remove()
    out = out[0] if isinstance(out, tuple) else out
    return out.float(), seen["mlp_in"].float()


def _block_loss(params, layer, mine, prefix, args, kwargs, y_fp, scale, logits_fp, rw):
    """(normalised output MSE, router KL) of one decoder layer whose targets take the weights gathered from
    `params` (name -> (centroids [out, 16], indices [out, in]))."""
    overrides, fused = {}, {}
    for t in mine:
        w = torch.gather(params[t.name][0], 1, params[t.name][1])
        pname = t.name[len(prefix):] if t.index is None else t.name[len(prefix):].rsplit(".", 1)[0]
        if t.index is None:
            overrides[pname] = w.to(t.param.dtype)
        else:
            fused.setdefault(pname, (t.param, {}))[1][t.index] = w
    for pname, (param, per) in fused.items():
        overrides[pname] = torch.stack([per[e] if e in per else param.data[e].float()
                                        for e in range(param.shape[0])]).to(param.dtype)
    y, mlp_in = _run_layer(layer, overrides, args, kwargs)
    mse = (y - y_fp).pow(2).mean() / scale
    kl = router_kl(logits_fp, mlp_in @ rw.detach().float().T) if rw is not None else torch.zeros(())
    return mse, kl


def finetune_blocks(model, ids: torch.Tensor, results: dict, steps: int, lr: float, router_kl_weight: float) -> dict:
    """Block-level centroid fine-tuning (CodeQuant's local losses at the decoder-layer level), layer by layer: each
    layer runs on its input from the already quantized layers before it, and its centroids (attention and experts)
    minimise the normalised MSE to the fp layer's output on the fp input, plus for MoE layers `router_kl_weight` x
    KL(router(fp MLP input) || router(quantized MLP input)); the router itself stays fp, so the KL term moves the
    centroids that feed it. A centroid moves by the mean gradient of its members, then weights are re-assigned to
    the nearest centroid. `model` holds the fp (rotated) weights on entry and the quantized ones on return;
    `results` maps target names to CodebookTensors (updated). Returns per-layer {mse, kl} before and after."""
    layers = model.model.layers
    targets = quant_targets(model)
    fp_w = {t.name: t.get().float().clone() for t in targets}
    ref = {}
    for li, layer in enumerate(layers):  # fp references, one pass
        args, kwargs = _layer_call(model, ids, li)
        with torch.no_grad():
            ref[li] = _run_layer(layer, {}, args, kwargs)
    with torch.no_grad():
        for t in targets:
            t.set(results[t.name].dequantize())
    stats = {}
    for li, layer in enumerate(layers):
        mine = [t for t in targets if t.layer == li]
        prefix = f"model.layers.{li}."
        args, kwargs = _layer_call(model, ids, li)  # input after the quantized layers before
        y_fp, mlp_fp = ref[li]
        rw = _router_weight(layer)
        logits_fp = None if rw is None else mlp_fp @ rw.detach().float().T
        scale = y_fp.pow(2).mean().clamp_min(1e-12)
        state = {}
        for t in mine:
            cb = results[t.name]
            state[t.name] = [cb.centroids.float().reshape(cb.shape[0], -1).clone(), cb.indices().long()]

        ctx = (layer, mine, prefix, args, kwargs, y_fp, scale, logits_fp, rw)
        weight = router_kl_weight if rw is not None else 0.0

        def loss_of(params, ctx=ctx):
            return _block_loss(params, *ctx)

        def total(mse, kl, weight=weight):
            return mse + weight * kl if weight else mse

        with torch.no_grad():
            mse0, kl0 = loss_of(state)
        best, step_lr = total(mse0, kl0).item(), lr
        for _ in range(steps):
            cents = {k: v[0].clone().requires_grad_(True) for k, v in state.items()}
            params = {k: (c, state[k][1]) for k, c in cents.items()}
            grads = torch.autograd.grad(total(*loss_of(params)), list(cents.values()), allow_unused=True)
            with torch.no_grad():
                for _try in range(4):  # a step is kept only if the layer's loss falls (else halve the rate)
                    trial = dict(state)
                    for (name, c), g in zip(cents.items(), grads):
                        if g is None:
                            continue
                        idx = state[name][1]
                        counts = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
                        new = (state[name][0] - step_lr * g / counts.clamp_min(1)).sort(1).values
                        trial[name] = [new, _nearest(fp_w[name], new)]
                    value = total(*loss_of(trial)).item()
                    if value < best:
                        state, best = trial, value
                        break
                    step_lr /= 2
        with torch.no_grad():
            mse1, kl1 = loss_of(state)
            for t in mine:
                cents, idx = state[t.name]
                out, n = results[t.name].shape
                cb = CodebookTensor(pack(idx.to(torch.uint8), 4), cents.half().reshape(out, 1, -1), n, (out, n))
                results[t.name] = cb
                t.set(cb.dequantize())
        stats[li] = {"mse_before": mse0.item(), "mse_after": mse1.item(), "kl_before": kl0.item(),
                     "kl_after": kl1.item()}
    return stats

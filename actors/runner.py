"""Run a transformers decoder with our own KV cache: per-sequence buffers, prefix reuse, batched steps.

We call the model's own modules (embeddings, q/k/v/o projections, norms, rotary tables, MLP or MoE block, head),
so quantized or swapped modules keep working, but the attention and the KV cache are ours:
- every sequence owns a buffer `kv[layer, k|v, kv_head, position, head_dim]` that grows by doubling;
- a new sequence starts from the longest cached prefix of its tokens (finished sequences are kept under a token
  budget; running ones are also sources, since a written position below a sequence's length at a step's start never
  changes), so a committed prefix is never prefilled again. On the CPU kernel path a prefix of SHARE_MIN_TOKENS or
  more, followed by at most SHARED_KERNEL_TOKENS new prompt tokens (a branch, a drafted step), is shared: the new
  sequence reads it in place from the buffer that holds it (one level: `KVSeq.base`) and owns only what follows.
  Otherwise the prefix's KV is copied once (and a sharing sequence gets its own full buffer the first time SDPA has
  to read it);
- one forward runs B sequences with T_b new tokens each (right-padded to max T_b); projections and MLPs are batched;
  norms and rotary take the model's own formulas with fewer ops;
- attention reads each sequence's own buffer in place (no padded copy of the caches). On CPU in float32, a step of
  up to KERNEL_ATTENTION_TOKENS new tokens per sequence (decode, speculative verification, a drafted step, a short
  prompt) runs one kernel call per layer for every sequence (qkernels.cpu.decode_attention: it writes the new keys
  and values and attends causally, tasks split over threads); torch's SDPA costs 75-95 us of mostly fixed cost per
  call and sequence on 2 cores, so a 4-sequence step had paid 4x. Longer prefills, other dtypes and GPUs run SDPA per
  sequence (flash; a non-contiguous projection output sends SDPA to its math path, which is why the few-row
  linears return contiguous outputs);
- on CPU, linears fed a few rows (a decode step, a batched one, a verification chunk) take, per weight shape, what
  measures fastest here: torch's x @ W^T, W @ x^T (MKL on AMD Zen runs a short x @ W^T like one matrix-vector
  product per row), or our dense kernel (qkernels.cpu.dense_rows, reading each weight row once for every row).
Supported families: Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE (per-head q/k norms).
"""

from __future__ import annotations

import types
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from qkernels import cpu as cpu_kernels

SUPPORTED = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}
SMALL_BATCH = (2, 64)  # rows of a linear's input where the CPU path may take W @ x^T instead of x @ W^T
KERNEL_ROWS = 8  # rows up to which the CPU path may take our dense kernel (qkernels.cpu.dense_rows)
WAYS = ("torch", "transposed", "kernel")  # F.linear's x @ W^T; W @ x^T; qkernels.cpu.dense_rows


@dataclass(frozen=True)
class LinearPlan:
    """How a linear of one shape runs its decode-sized inputs on CPU: `one` row, 2..KERNEL_ROWS rows (`few`), and
    more up to SMALL_BATCH[1] (`many`: torch or transposed)."""

    one: str = "torch"
    few: str = "torch"
    many: str = "torch"

    @property
    def is_torch(self) -> bool:
        return self.one == self.few == self.many == "torch"


def _run_way(way: str, x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """x [rows, K] @ w^T (+ bias) the way `way` names."""
    if way == "kernel":
        return cpu_kernels.dense_rows(x, w, bias)
    if way == "transposed":
        y = (w @ x.T).T.contiguous()  # contiguous: SDPA takes its fast path on what follows
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


def _planned_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward with `self._specmoe_plan` for a few rows (bound to the module, so a deep copy of the model
    computes with the copy's weights). On CPUs where the BLAS runs a short x @ W^T like one matrix-vector product
    per row (MKL on AMD Zen: 4 rows took 4.4x one row's time, W @ x^T 1.7x), the kernel reads every weight row once
    for all rows. The kernel has no backward: with autograd on, or another dtype, torch's."""
    plan = self._specmoe_plan
    rows = x.numel() // x.shape[-1]
    way = plan.one if rows == 1 else plan.few if rows <= KERNEL_ROWS else plan.many
    if rows > SMALL_BATCH[1] or (way == "kernel" and (torch.is_grad_enabled() or x.dtype != torch.float32
                                                       or self.weight.dtype != torch.float32
                                                       or not self.weight.is_contiguous())):
        way = "torch"
    if way == "torch":
        return F.linear(x, self.weight, self.bias)
    return _run_way(way, x.reshape(rows, -1), self.weight, self.bias).reshape(*x.shape[:-1], -1)


def _measure_plans(linears: list) -> dict[tuple, LinearPlan]:
    """A plan per weight shape, from timing 1 and 4 rows each way over every module of that shape in turn (so the
    weights come from memory, as in a decode step; best of 3 passes). A way other than torch's must beat it by 10%
    (20% for W @ x^T beyond the kernel's rows): timing noise stays on torch's."""
    from collections import defaultdict

    by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for m in linears:
        by_shape[(tuple(m.weight.shape), m.weight.dtype)].append(m.weight)
    kernel_ok = cpu_kernels.available()
    plans = {}
    for (shape, dtype), weights in by_shape.items():
        ways = [w for w in WAYS if w != "kernel" or (kernel_ok and dtype == torch.float32
                                                        and all(x.is_contiguous() for x in weights))]
        best = {}
        for rows in (1, 4):
            x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)  # not the global RNG
            times = {way: _timed(lambda way=way: [_run_way(way, x, w) for w in weights], reps=3)
                     for way in ways if rows > 1 or way != "transposed"}
            fastest = min(times, key=times.get)
            best[rows] = fastest if times[fastest] < 0.9 * times["torch"] else "torch"
            if rows == 4:
                many = "transposed" if times["transposed"] < 0.8 * times["torch"] else "torch"
        plans[(shape, dtype)] = LinearPlan(best[1], best[4], many)
    return plans


def _timed(fn, reps: int = 5) -> float:
    import time

    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@contextmanager
def torch_linears(model):
    """Inside the block the model's nn.Linear modules run torch's own forward (e.g. to time transformers as it ships
    beside our engine on the same model object)."""
    patched = {m: m.__dict__.pop("forward") for m in model.modules()
               if type(m) is torch.nn.Linear and "forward" in m.__dict__}
    try:
        yield
    finally:
        for m, forward in patched.items():
            m.forward = forward


MEASURED_MIN = 1 << 20  # a model whose largest linear is smaller keeps torch's path (nothing to gain, and no timing)


def use_small_batch_linears(model, force: LinearPlan | None = None) -> int:
    """On CPU, give the model's nn.Linear modules the decode-sized plan that measures fastest here for their shape
    (once per model, if its largest linear has at least MEASURED_MIN weights), or `force` for every one; returns
    how many modules took a plan other than torch's. The plans are kept in `model._specmoe_linear_plans`."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"]
    done = getattr(model, "_specmoe_small_batch", None)
    if not linears or (done is not None and force is None):
        return done or 0
    if force is not None:
        plans = {(tuple(m.weight.shape), m.weight.dtype): force for m in linears}
    elif max(m.weight.numel() for m in linears) < MEASURED_MIN:
        plans = {}
    else:
        with torch.inference_mode():
            plans = _measure_plans(linears)
    count = 0
    for m in linears:
        plan = plans.get((tuple(m.weight.shape), m.weight.dtype), LinearPlan())
        if plan.is_torch:
            m.__dict__.pop("forward", None)
        else:
            m._specmoe_plan, m.forward = plan, types.MethodType(_planned_forward, m)
            count += 1
    model._specmoe_small_batch, model._specmoe_linear_plans = count, plans
    return count


def _lean_rms_norm(norm):
    """HF's RMSNorm (x * rsqrt(mean(x^2) + eps), in float32, then weight * x in the input dtype) with the same ops in
    the same order, so the same bits, without the module call; the module itself when it is another norm (a check
    on random input decides) or carries hooks."""
    eps, weight = getattr(norm, "variance_epsilon", None), getattr(norm, "weight", None)
    if (not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or weight.dim() != 1
            or norm._forward_hooks or norm._forward_pre_hooks):
        return norm

    def lean(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return norm.weight * xf.to(x.dtype)

    with torch.inference_mode():
        x = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)  # not the global RNG
        same = torch.equal(lean(x), norm(x))
    return lean if same else norm


SHARED_KERNEL_TOKENS = 128  # ... and, for a batch with a sequence that shares a prefix, up to which it runs there
# anyway (the alternative, SDPA, needs the sequence's keys in one buffer: a copy of the prefix)
SHARE_MIN_TOKENS = 64  # cached prefixes at least this long are shared, not copied (kernel attention only)
KERNEL_ATTENTION_TOKENS = 64  # new tokens per sequence up to which a CPU step's attention runs our kernel (`bench
# engine`'s attention_by_shape on a 2-core Zen 4: 0.25-0.71x per-sequence SDPA's time at 1-128 tokens; a side run
# had it even with SDPA at 96-128, so longer feeds stay on SDPA unless a prefix is shared)


@dataclass
class _KernelStep:
    """What the attention kernel needs of a step, the same for every layer."""

    kvs: list[torch.Tensor]
    bases: list[torch.Tensor | None]
    offsets: list[int]
    past: list[int]
    lens: list[int]


@dataclass(eq=False)
class KVSeq:
    """KV of one token sequence: `tokens[:length]` have keys and values, position p in `kv` at p - offset; positions
    below `offset` are a prefix shared with `base` (a sequence without a base of its own), read from base.kv."""

    tokens: list[int]
    kv: torch.Tensor  # [L, 2, H_kv, own capacity, D]
    length: int = 0
    users: int = field(default=1)  # >0 while a request runs on it
    base: Optional["KVSeq"] = None
    offset: int = 0

    @property
    def capacity(self) -> int:
        """Positions this sequence can hold (shared ones included)."""
        return self.offset + self.kv.shape[3]


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    neq = (a[:n] != b[:n]).nonzero()
    return int(neq[0, 0]) if neq.numel() else n


class ModelRunner:
    def __init__(self, model, prefix_cache_tokens: int = 32768, kv_budget_bytes: int = 0):
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ValueError(f"model type {cfg.model_type!r} is not supported by the engine; supported: "
                             f"{sorted(SUPPORTED)}")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            if cfg.model_type in ("mistral", "mixtral"):
                raise ValueError("sliding-window attention is not supported by the engine (config.sliding_window)")
        self.model = model
        self.body = model.model
        self.layers = list(self.body.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_kv_heads = cfg.num_key_value_heads
        self.scaling = attn.scaling
        self.param = next(model.parameters())
        self.device, self.dtype = self.param.device, self.param.dtype
        self.prefix_cache_tokens = prefix_cache_tokens
        self.kv_budget_bytes = kv_budget_bytes  # 0: no budget
        self.cache: OrderedDict[int, KVSeq] = OrderedDict()  # finished sequences, LRU order
        self.active: set[KVSeq] = set()
        self.bytes_per_token = (len(self.layers) * 2 * self.num_kv_heads * self.head_dim
                                * torch.empty((), dtype=self.dtype).element_size())
        self.small_batch_linears = use_small_batch_linears(model) if self.device.type == "cpu" else 0
        # a step's few new tokens per sequence: one attention kernel call per layer for all sequences (CPU, float32)
        self.kernel_attention = (self.device.type == "cpu" and self.dtype == torch.float32
                                 and cpu_kernels.available())
        self.norms = [(_lean_rms_norm(layer.input_layernorm), _lean_rms_norm(layer.post_attention_layernorm))
                      for layer in self.layers]

    # ------------------------------------------------------------ sequences and the prefix cache

    @staticmethod
    def _rounded(capacity: int) -> int:
        return max(64, -(-capacity // 64) * 64)

    def kv_bytes(self) -> int:
        """Bytes of the KV buffers allocated now: running sequences, the prefix cache and the prefixes they share
        (each buffer once)."""
        bufs = {}
        for s in list(self.active) + list(self.cache.values()):
            for t in (s, s.base):
                if t is not None:
                    bufs[id(t.kv)] = t.kv.numel() * t.kv.element_size()
        return sum(bufs.values())

    def bytes_for(self, tokens: int, reserve: int) -> int:
        """Bytes of the buffer `acquire(tokens, reserve)` allocates."""
        return self.bytes_per_token * self._rounded(tokens + reserve)

    def make_room(self, need: int) -> bool:
        """Whether `need` more bytes fit the budget, evicting finished sequences from the prefix cache (oldest first)
        to make them fit; running sequences are never evicted."""
        if self.kv_budget_bytes <= 0:
            return True
        used = self.kv_bytes()
        while used + need > self.kv_budget_bytes and self.cache:
            self.cache.popitem(last=False)  # frees its buffer unless a sequence still shares it
            used = self.kv_bytes()
        return used + need <= self.kv_budget_bytes

    def _alloc(self, capacity: int) -> torch.Tensor:
        capacity = self._rounded(capacity)
        return torch.empty(len(self.layers), 2, self.num_kv_heads, capacity, self.head_dim,
                           device=self.device, dtype=self.dtype)

    def acquire(self, tokens: list[int], reserve: int) -> KVSeq:
        """A sequence for `tokens` whose KV starts from the longest cached prefix (at most len(tokens) - 1,
        so that the last token is fed and yields the next-token logits)."""
        want = torch.tensor(tokens)
        best, best_len = None, 0
        for src in list(self.cache.values()) + list(self.active):
            n = min(_common_prefix(want, torch.tensor(src.tokens[:src.length])), len(tokens) - 1)
            if n > best_len:
                best, best_len = src, n
        if best is not None and best.users == 0:
            self.cache.move_to_end(id(best))
        if (best is not None and best_len >= SHARE_MIN_TOKENS and self.kernel_attention
                and len(tokens) - best_len <= SHARED_KERNEL_TOKENS):
            seq = self._share(best, best_len, len(tokens) + reserve)
        else:
            seq = KVSeq(tokens=[], kv=self._alloc(len(tokens) + reserve), length=best_len)
            if best is not None:
                self._copy_positions(best, seq, 0, best_len)
        seq.tokens = list(tokens[:best_len])
        self.active.add(seq)
        return seq

    def _share(self, src: KVSeq, n: int, capacity: int) -> KVSeq:
        """A sequence whose first n positions are src's, without copying them: it reads them from src's base (or
        from src itself) and holds the rest in its own buffer; positions of src past its base are copied (one level
        of sharing, so a base never has a base)."""
        if src.base is None:
            base, offset = src, n
        else:
            base, offset = src.base, min(n, src.offset)
        seq = KVSeq(tokens=[], kv=self._alloc(capacity - offset), length=n, base=base, offset=offset)
        if n > offset:
            self._copy_positions(src, seq, offset, n)
        return seq

    @staticmethod
    def _copy_positions(src: KVSeq, dst: KVSeq, start: int, stop: int) -> None:
        """dst's positions start..stop-1 from src (each read from wherever it lives: a base or the own buffer)."""
        for owner, lo, hi in ((src.base, start, min(stop, src.offset)), (src, max(start, src.offset), stop)):
            if owner is not None and lo < hi:
                o = 0 if owner is src.base else src.offset
                dst.kv[:, :, :, lo - dst.offset:hi - dst.offset] = owner.kv[:, :, :, lo - o:hi - o]

    def _flatten(self, seq: KVSeq) -> None:
        """Give a sequence that shares a prefix one buffer with every position (SDPA reads one buffer)."""
        if seq.base is None:
            return
        kv = self._alloc(seq.capacity)
        flat = KVSeq(tokens=[], kv=kv)
        self._copy_positions(seq, flat, 0, seq.length)
        seq.kv, seq.base, seq.offset = kv, None, 0

    def release(self, seq: KVSeq) -> None:
        """Keep a finished sequence's KV for reuse; drop cached entries it extends; evict over budget."""
        self.active.discard(seq)
        seq.users = 0
        seq.tokens = seq.tokens[:seq.length]
        if self.prefix_cache_tokens <= 0 or seq.length == 0:
            return
        mine = torch.tensor(seq.tokens)
        for key, old in list(self.cache.items()):
            if old.length <= seq.length and _common_prefix(mine, torch.tensor(old.tokens)) == old.length:
                del self.cache[key]  # `seq` holds all of `old`'s KV
        self.cache[id(seq)] = seq
        total = sum(s.length for s in self.cache.values())
        while total > self.prefix_cache_tokens and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            total -= old.length

    def truncate(self, seq: KVSeq, length: int) -> None:
        """Forget positions >= length (rejected speculative tokens)."""
        seq.length = min(seq.length, length)
        del seq.tokens[seq.length:]
        if seq.length < seq.offset:  # its next positions would fall in the shared prefix: they go to its own buffer
            seq.kv, seq.offset = self._alloc(seq.capacity - seq.length), seq.length

    def _ensure_capacity(self, seq: KVSeq, needed: int) -> None:
        if needed > seq.capacity:
            own = seq.kv.shape[3]
            kv = self._alloc(max(needed - seq.offset, 2 * own))
            kv[:, :, :, :seq.length - seq.offset] = seq.kv[:, :, :, :seq.length - seq.offset]
            seq.kv = kv

    def clear_cache(self) -> None:
        self.cache.clear()

    # ------------------------------------------------------------ the forward pass

    @torch.inference_mode()
    def forward(self, seqs: list[KVSeq], new_tokens: list[list[int]], all_logits: bool = False) -> list[torch.Tensor]:
        """Append `new_tokens[b]` to `seqs[b]` and return logits (float32): the last position's `[V]`, or every
        new position's `[T_b, V]` with `all_logits`."""
        lengths = [len(t) for t in new_tokens]
        if min(lengths) < 1:
            raise ValueError("every sequence needs at least one new token")
        B, T = len(seqs), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        kernel = self.kernel_attention and (T <= KERNEL_ATTENTION_TOKENS or (
            T <= SHARED_KERNEL_TOKENS and any(seq.base is not None for seq in seqs)))
        for b, (seq, toks) in enumerate(zip(seqs, new_tokens)):
            ids[b, :len(toks)] = torch.tensor(toks)
            pos[b] = torch.arange(seq.length, seq.length + T)
            if not kernel:
                self._flatten(seq)
            self._ensure_capacity(seq, seq.length + len(toks))
        ids, pos = ids.to(self.device), pos.to(self.device)
        h_BTD = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(h_BTD, pos)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)  # x * cos + roll(x) * sin == HF's rotate_half form
        if kernel:
            # one call per layer for the whole step, heads last ([B, T, H, D]): see qkernels.cpu.decode_attention
            step = _KernelStep([seq.kv for seq in seqs],
                               [seq.base.kv if seq.base is not None else None for seq in seqs],
                               [seq.offset for seq in seqs], [seq.length for seq in seqs], lengths)
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, D]
        else:
            step = None
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
            masks = [self._causal_mask(seq.length, t) for seq, t in zip(seqs, lengths)]
            # per sequence, views over every layer: where the new keys/values go, and what attention reads
            slots = [seq.kv[:, :, :, seq.length:seq.length + t] for seq, t in zip(seqs, lengths)]
            reads = [seq.kv[:, :, :, :seq.length + t].unsqueeze(2) for seq, t in zip(seqs, lengths)]  # [L,2,1,H,n,D]
        for li, layer in enumerate(self.layers):
            in_norm, post_norm = self.norms[li]
            x_BTD = in_norm(h_BTD)
            if step is not None:
                h_BTD = h_BTD + self._kernel_attention(li, layer.self_attn, x_BTD, cos, sin, step)
            else:
                h_BTD = h_BTD + self._attention(li, layer.self_attn, x_BTD, cos, sin, slots, reads, lengths, masks)
            h_BTD = h_BTD + layer.mlp(post_norm(h_BTD))
        for seq, toks in zip(seqs, new_tokens):
            seq.length += len(toks)
            seq.tokens.extend(toks)
        h_BTD = self.body.norm(h_BTD)
        if all_logits:
            return [self.model.lm_head(h_BTD[b, :t]).float() for b, t in enumerate(lengths)]
        last = h_BTD[torch.arange(B, device=self.device), torch.tensor(lengths, device=self.device) - 1]
        return list(self.model.lm_head(last).float())

    def _causal_mask(self, past: int, t: int) -> torch.Tensor | None:
        """New token i of a sequence with `past` cached positions sees keys 0..past + i (None for one token)."""
        if t == 1:
            return None
        key_pos = torch.arange(past + t, device=self.device)
        q_pos = torch.arange(past, past + t, device=self.device)
        return key_pos[None, :] <= q_pos[:, None]

    def _qkv_rotated(self, attn, x_BTD, cos, sin, heads_first: bool):
        """q, k (rotary applied) and v of the new tokens: [B, H, T, D] with `heads_first`, else [B, T, H, D]
        (`cos`/`sin` shaped to broadcast over that layout)."""
        B, T, _ = x_BTD.shape
        q = attn.q_proj(x_BTD).view(B, T, -1, self.head_dim)
        k = attn.k_proj(x_BTD).view(B, T, -1, self.head_dim)
        v = attn.v_proj(x_BTD).view(B, T, -1, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm per head before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        if heads_first:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        half = self.head_dim // 2
        return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin, v

    def _kernel_attention(self, li, attn, x_BTD, cos, sin, step: _KernelStep):
        """Attention of a step's few new tokens, every sequence in one kernel call (which also writes their keys and
        values into the sequences' buffers); q, k, v stay [B, T, H, D], rotary broadcast over heads."""
        q, k, v = self._qkv_rotated(attn, x_BTD, cos, sin, heads_first=False)
        out = cpu_kernels.decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), step.kvs, li, step.past,
                                           step.lens, self.scaling, step.bases, step.offsets)
        return attn.o_proj(out)

    def _attention(self, li, attn, x_BTD, cos, sin, slots, reads, lengths, masks):
        B, T, _ = x_BTD.shape
        q, k, v = self._qkv_rotated(attn, x_BTD, cos, sin, heads_first=True)
        outs = []
        for b in range(B):  # each sequence against its own buffer (flash attention on CPU)
            t_b, slot, read = lengths[b], slots[b][li], reads[b][li]
            slot[0] = k[b, :, :t_b]
            slot[1] = v[b, :, :t_b]
            outs.append(F.scaled_dot_product_attention(q[b:b + 1, :, :t_b], read[0], read[1], attn_mask=masks[b],
                                                       scale=self.scaling, enable_gqa=True))
        if B == 1:
            out = outs[0]
        elif min(lengths) == T:
            out = torch.cat(outs)
        else:  # right-padded: the padding rows stay zero
            out = q.new_zeros(q.shape)
            for b, o in enumerate(outs):
                out[b:b + 1, :, :lengths[b]] = o
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))



"""Run a transformers decoder with our own KV cache: per-sequence buffers, prefix reuse, batched steps.

We call the model's own modules (embeddings, q/k/v/o projections, norms, rotary tables, MLP or MoE block, head),
so quantized or swapped modules keep working, but the attention and the KV cache are ours:
- every sequence owns a buffer `kv[layer, k|v, kv_head, position, head_dim]` that grows by doubling;
- a new sequence starts from the longest cached prefix of its tokens (finished sequences are kept under a token
  budget; running ones are also sources, since a written position never changes) and copies that KV once,
  so a committed prefix is never prefilled again;
- one forward runs B sequences with T_b new tokens each (right-padded to max T_b); projections and MLPs are batched,
  attention runs per sequence against its own buffer (no padded copy of the cache per step: one call over a padded
  gather measured slower on CPU, its copies and the masked math path cost more than the per-sequence calls);
- on CPU, linears fed a few rows (a batched decode step, a verification chunk) compute W @ x^T when that measures
  faster than x @ W^T (MKL on AMD Zen runs a short x @ W^T like one matrix-vector product per row).
Supported families: Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE (per-head q/k norms).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SUPPORTED = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}
SMALL_BATCH = (2, 64)  # rows of a linear's input where the CPU path may take W @ x^T instead of x @ W^T


def _linear_small(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward, with W @ x^T for a few rows: on CPUs where the BLAS handles a short x @ W^T as slowly as
    one matrix-vector product per row (MKL on AMD Zen: 4 rows took 4.4x one row's time, W @ x^T 1.7x)."""
    rows = x.numel() // x.shape[-1]
    if not SMALL_BATCH[0] <= rows <= SMALL_BATCH[1]:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    y = (self.weight @ x.reshape(rows, -1).T).T
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], -1)


def _transposed_is_faster(weight: torch.Tensor, rows: int = 4, reps: int = 5) -> bool:
    """Whether W @ x^T beats F.linear for `rows` rows of this weight here (by 20%: timing noise stays on torch's)."""
    import time

    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    ways = (lambda: torch.nn.functional.linear(x, weight), lambda: weight @ x.T)
    best = []
    for way in ways:
        way()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            way()
            times.append(time.perf_counter() - t0)
        best.append(min(times))
    return best[1] < 0.8 * best[0]


MEASURED_MIN = 1 << 20  # a model whose largest linear is smaller keeps torch's path (nothing to gain, and no timing)


def use_small_batch_linears(model, force: bool | None = None) -> int:
    """On CPU, give the model's nn.Linear modules the small-batch path when it measures faster here (once per
    model, on its largest linear, if that has at least MEASURED_MIN weights), or as `force` says; returns how many
    modules took it."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"]
    done = getattr(model, "_specmoe_small_batch", None)
    if not linears or (done is not None and force is None):
        return done or 0
    largest = max((m.weight for m in linears), key=lambda w: w.numel())
    if force is None:
        with torch.inference_mode():
            force = largest.numel() >= MEASURED_MIN and _transposed_is_faster(largest)
    for m in linears:
        if force:
            m.forward = _linear_small.__get__(m)
        else:
            m.__dict__.pop("forward", None)
    model._specmoe_small_batch = len(linears) if force else 0
    return model._specmoe_small_batch


@dataclass(eq=False)
class KVSeq:
    """KV of one token sequence: `tokens[:length]` have keys and values in `kv`."""

    tokens: list[int]
    kv: torch.Tensor  # [L, 2, H_kv, capacity, D]
    length: int = 0
    users: int = field(default=1)  # >0 while a request runs on it

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]


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

    # ------------------------------------------------------------ sequences and the prefix cache

    @staticmethod
    def _rounded(capacity: int) -> int:
        return max(64, -(-capacity // 64) * 64)

    def kv_bytes(self) -> int:
        """Bytes of the KV buffers allocated now: running sequences and the prefix cache."""
        return sum(s.kv.numel() * s.kv.element_size() for s in list(self.active) + list(self.cache.values()))

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
            _, old = self.cache.popitem(last=False)
            used -= old.kv.numel() * old.kv.element_size()
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
        seq = KVSeq(tokens=list(tokens[:best_len]), kv=self._alloc(len(tokens) + reserve), length=best_len)
        if best is not None:
            seq.kv[:, :, :, :best_len] = best.kv[:, :, :, :best_len]
            if best.users == 0:
                self.cache.move_to_end(id(best))
        self.active.add(seq)
        return seq

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

    def _ensure_capacity(self, seq: KVSeq, needed: int) -> None:
        if needed > seq.capacity:
            kv = self._alloc(max(needed, 2 * seq.capacity))
            kv[:, :, :, :seq.length] = seq.kv[:, :, :, :seq.length]
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
        masks = []
        for b, (seq, toks) in enumerate(zip(seqs, new_tokens)):
            ids[b, :len(toks)] = torch.tensor(toks)
            pos[b] = torch.arange(seq.length, seq.length + T)
            self._ensure_capacity(seq, seq.length + len(toks))
            t_b = len(toks)
            if t_b > 1:  # query i sees keys up to seq.length + i
                key_pos = torch.arange(seq.length + t_b, device=self.device)
                q_pos = torch.arange(seq.length, seq.length + t_b, device=self.device)
                masks.append(key_pos[None, :] <= q_pos[:, None])
            else:
                masks.append(None)
        ids, pos = ids.to(self.device), pos.to(self.device)
        h_BTD = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(h_BTD, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
        for li, layer in enumerate(self.layers):
            h_BTD = h_BTD + self._attention(li, layer.self_attn, layer.input_layernorm(h_BTD), cos, sin,
                                            seqs, lengths, masks)
            h_BTD = h_BTD + layer.mlp(layer.post_attention_layernorm(h_BTD))
        for seq, toks in zip(seqs, new_tokens):
            seq.length += len(toks)
            seq.tokens.extend(toks)
        h_BTD = self.body.norm(h_BTD)
        if all_logits:
            return [self.model.lm_head(h_BTD[b, :t]).float() for b, t in enumerate(lengths)]
        last = h_BTD[torch.arange(B, device=self.device), torch.tensor(lengths, device=self.device) - 1]
        return list(self.model.lm_head(last).float())

    def _attention(self, li, attn, x_BTD, cos, sin, seqs, lengths, masks):
        B, T, _ = x_BTD.shape
        q = attn.q_proj(x_BTD).view(B, T, -1, self.head_dim)
        k = attn.k_proj(x_BTD).view(B, T, -1, self.head_dim)
        v = attn.v_proj(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm per head before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = torch.zeros_like(q)
        for b, seq in enumerate(seqs):
            t_b, start = lengths[b], seq.length
            seq.kv[li, 0, :, start:start + t_b] = k[b, :, :t_b]
            seq.kv[li, 1, :, start:start + t_b] = v[b, :, :t_b]
            keys = seq.kv[li, 0, :, :start + t_b].unsqueeze(0)
            values = seq.kv[li, 1, :, :start + t_b].unsqueeze(0)
            out[b:b + 1, :, :t_b] = F.scaled_dot_product_attention(
                q[b:b + 1, :, :t_b], keys, values, attn_mask=masks[b], scale=self.scaling, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)

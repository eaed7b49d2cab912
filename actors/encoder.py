"""The sentence encoder (all-MiniLM-L6-v2) for the embedding verifier: mean pooling, unit vectors."""

from __future__ import annotations

import torch

from actors import zoo


class EncoderHost:
    def __init__(self, torch_threads: int = 0):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model, self.tok = zoo.load_encoder()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    async def similarity_pairs(self, texts: list[str]) -> list[float]:
        """Cosine similarity of texts[2i] and texts[2i+1]."""
        emb = self.embed([t.strip() or " " for t in texts])
        return (emb[0::2] * emb[1::2]).sum(-1).tolist()

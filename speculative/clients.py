"""Calling a model host from a controller: a Ray actor handle or an in-process EngineHost, same interface.

Cancelling the awaiting task cancels the host's requests (`ray.cancel` for actors; CancelledError in-process).
"""

from __future__ import annotations

import asyncio
import time

from actors.engine import Request, Result


class HostClient:
    def __init__(self, host):
        self.host = host
        self.is_actor = hasattr(host, "generate") and hasattr(host.generate, "remote")

    async def generate(self, requests: list[Request]) -> list[Result]:
        if not self.is_actor:
            return await self.host.generate(requests)
        import ray

        ref = self.host.generate.remote(requests)
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise

    async def settle(self) -> None:
        """In-process hosts: wait until the requests cancelled by a finished run are dropped (see EngineHost.settle)."""
        if not self.is_actor and hasattr(self.host, "settle"):
            await self.host.settle()

    async def one(self, request: Request) -> tuple[Result, float]:
        t0 = time.perf_counter()
        [res] = await self.generate([request])
        return res, time.perf_counter() - t0

    async def next_token_probs(self, prefixes: list[list[int]], candidate_ids: list[int]) -> list[list[float]]:
        if not self.is_actor:
            return await self.host.next_token_probs(prefixes, candidate_ids)
        return await self.host.next_token_probs.remote(prefixes, candidate_ids)

"""Routing policies: which healthy worker of a role gets a request (`--router`).

- `round-robin`: in turn, whatever they hold or how busy they are (the baseline).
- `least-loaded`: the lowest queue depth (reported + sent since), then KV usage.
- `kv-aware` (the default): a prefill goes to the worker where it would finish first, counting
  the prompt tokens its prefix cache does not hold (from the KV-event index), the prefill
  tokens this gateway already has outstanding there, and requests other gateways have queued
  there; a decode goes to the least-loaded worker whose last report had free blocks for the
  prompt and `max_tokens`.

A policy only chooses among the candidates it is given: which workers are healthy, and what
happens when one turns out not to be, is the pool's and the dispatcher's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from contract.block_hash import hash_blocks
from gateway.prefix_index import PrefixIndex
from gateway.worker_state import DECODE, PREFILL, Worker

ROUTER_NAMES = ("round-robin", "least-loaded", "kv-aware")
DEFAULT_ROUTER = "kv-aware"


@dataclass(slots=True, frozen=True)
class Route:
    """What a policy may look at: the prompt and how many tokens the request may add."""

    prompt_ids: Sequence[int]
    max_tokens: int = 0


@dataclass(slots=True, frozen=True)
class Choice:
    worker: Worker
    prefill_tokens: int  # prompt tokens the worker is expected to compute (cache hits excluded)
    noted_hashes: tuple[int, ...] = ()  # blocks noted in the index as being computed there


class Router(Protocol):
    def choose(self, role: str, candidates: Sequence[Worker], route: Route) -> Choice:
        """One of `candidates` (never empty). Pure choice: the caller books the request."""
        ...


class RoundRobinRouter:
    def __init__(self, index: PrefixIndex) -> None:
        self._turn = {PREFILL: 0, DECODE: 0}

    def choose(self, role: str, candidates: Sequence[Worker], route: Route) -> Choice:
        ordered = sorted(candidates, key=lambda w: w.address)
        self._turn[role] = self._turn.get(role, 0) + 1
        return Choice(ordered[(self._turn[role] - 1) % len(ordered)], len(route.prompt_ids))


class LeastLoadedRouter:
    def __init__(self, index: PrefixIndex) -> None:
        pass

    def choose(self, role: str, candidates: Sequence[Worker], route: Route) -> Choice:
        return Choice(min(candidates, key=Worker.score), len(route.prompt_ids))


class KVAwareRouter:
    def __init__(self, index: PrefixIndex) -> None:
        self._index = index

    def choose(self, role: str, candidates: Sequence[Worker], route: Route) -> Choice:
        if role == PREFILL:
            return self._choose_prefill(candidates, route)
        return self._choose_decode(candidates, route)

    def _choose_prefill(self, candidates: Sequence[Worker], route: Route) -> Choice:
        block_size = _block_size(candidates, self._index) or 0
        hashes = hash_blocks(route.prompt_ids, block_size) if block_size else []
        choices = []
        for worker in candidates:
            cached = min(
                self._index.matched_blocks(worker.address, hashes) * block_size,
                len(route.prompt_ids) - 1,  # the last token is always computed
            )
            choices.append(Choice(worker, len(route.prompt_ids) - max(cached, 0)))
        best = min(choices, key=lambda c: _prefill_cost(c, len(route.prompt_ids)))
        self._index.note_routed(best.worker.address, hashes)
        return Choice(best.worker, best.prefill_tokens, tuple(hashes))

    def _choose_decode(self, candidates: Sequence[Worker], route: Route) -> Choice:
        roomy = [w for w in candidates if _has_room(w, len(route.prompt_ids) + route.max_tokens)]
        return Choice(min(roomy or candidates, key=Worker.score), len(route.prompt_ids))


def _block_size(candidates: Sequence[Worker], index: PrefixIndex) -> int | None:
    """What the workers' block hashes cover: from their KV events, else their load reports."""
    known = index.block_size([w.address for w in candidates])
    reported = [w.load.block_size for w in candidates if w.load and w.load.block_size]
    return known or (reported[0] if reported else None)


def _prefill_cost(choice: Choice, prompt_len: int) -> tuple[int, int, str]:
    """Tokens to compute before this prompt is done there, a time estimate in token units: its
    own uncached tokens, what this gateway has outstanding there, and the requests others sent
    (at their last report; each counted as long as this prompt, their lengths are unknown)."""
    worker = choice.worker
    work = choice.prefill_tokens + worker.pending_prefill_tokens
    return (work + worker.foreign_load * prompt_len, worker.in_flight, worker.address)


def _has_room(worker: Worker, num_tokens: int) -> bool:
    load = worker.load
    if load is None or not load.block_size:
        return True  # nothing known yet: do not rule it out
    return load.num_free_blocks >= -(-num_tokens // load.block_size)


_ROUTERS: dict[str, type[RoundRobinRouter | LeastLoadedRouter | KVAwareRouter]] = {
    "round-robin": RoundRobinRouter,
    "least-loaded": LeastLoadedRouter,
    "kv-aware": KVAwareRouter,
}


def make_router(name: str, index: PrefixIndex) -> Router:
    if name not in _ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTER_NAMES)}")
    return _ROUTERS[name](index)

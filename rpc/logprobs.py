"""pdserve.v1.TokenLogprobs messages -> logprob records, for the gateway (from workers) and the
typed client (from the gateway): both messages carry the same fields."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def token_logprobs_from_pb(
    token_ids: Sequence[int],
    messages: Iterable[Any],
    make: Callable[[int, float, tuple[tuple[int, float], ...], int | None], T],
) -> list[T]:
    """One `make(token_id, logprob, top, rank)` per token of `token_ids` (zipped with the
    messages); `top` is ((token id, logprob), ...) best first, `rank` None where not sent."""
    return [
        make(
            tid,
            lp.logprob,
            tuple((t.token_id, t.logprob) for t in lp.top_logprobs),
            lp.rank if lp.HasField("rank") else None,
        )
        for tid, lp in zip(token_ids, messages, strict=False)
    ]

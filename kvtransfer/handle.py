"""The KV handle: what a prefill worker gives back and a decode worker pulls from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVHandle:
    engine_id: str
    epoch: int
    kv_endpoint: str  # host:port of the prefill worker's KVTransferService
    transfer_id: str
    block_ids: tuple[int, ...]
    num_tokens: int  # prompt tokens whose KV the blocks hold
    first_token: int
    first_logprob: float | None
    first_top_logprobs: dict[int, float] | None  # set when logprobs were asked for
    lease_ms: int
    compat_hash: str
    host_id: str

    def __post_init__(self) -> None:
        if not self.transfer_id:
            raise ValueError("KV handle: transfer_id is empty")
        if not self.kv_endpoint:
            raise ValueError("KV handle: kv_endpoint is empty")
        if not self.block_ids:
            raise ValueError("KV handle: no block ids")
        if self.num_tokens < 1:
            raise ValueError("KV handle: num_tokens must be >= 1")

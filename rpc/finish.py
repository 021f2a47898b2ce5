"""The one finish-reason map: contract name <-> `pdserve.v1.FinishReason`."""

from __future__ import annotations

from contract.finish import FINISH_REASONS, FinishReason
from protos.pdserve.v1 import common_pb2

TO_PB: dict[str | None, int] = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    **{
        name: common_pb2.FinishReason.Value(f"FINISH_REASON_{name.upper()}")
        for name in FINISH_REASONS
    },
}
FROM_PB: dict[int, FinishReason] = {
    number: name for name, number in TO_PB.items() if name is not None
}


def finish_reason_to_pb(reason: str | None) -> int:
    """Reasons no client sees (the engine's "prefill") end as ABORT, as an unknown one would."""
    return TO_PB.get(reason, common_pb2.FINISH_REASON_ABORT)


def finish_reason_from_pb(value: int) -> FinishReason | None:
    return FROM_PB.get(value)

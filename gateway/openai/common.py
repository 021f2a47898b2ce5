"""What both generation routes do first: check the model name, admit the runs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.core import GatewayCore
from gateway.errors import ErrorKind, GatewayError
from gateway.request_run import RequestRun
from gateway.schema import GenerateRequest
from gateway.validation import check_n


@dataclass(slots=True, frozen=True)
class ResponseMeta:
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


def check_model(core: GatewayCore, model: str | None) -> None:
    """An unset model means the served one; a name not served (--served-model-name) is a 404."""
    if model is not None and model not in core.config.model_names:
        raise GatewayError(ErrorKind.NOT_FOUND, f"The model `{model}` does not exist.", "model")


async def open_runs(core: GatewayCore, requests: Sequence[GenerateRequest]) -> list[RequestRun]:
    """Admit every request or none: a later failure closes the runs already opened."""
    for request in requests:
        check_n(request.params, core.limits)
    core.check_capacity(sum(request.params.n for request in requests))  # the whole fan-out
    runs: list[RequestRun] = []
    try:
        for request in requests:
            runs.append(await core.open(request))
    except BaseException:
        for run in runs:
            run.close()
        raise
    return runs

"""`pdserve prefill`: a prefill worker (PrefillService + KVTransferService) on gRPC."""

from __future__ import annotations

from pdserve.commands._worker import role_command

ROLE = "prefill"
add_parser, config_from_args, run = role_command(ROLE)

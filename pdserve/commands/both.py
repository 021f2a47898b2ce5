"""`pdserve both`: one worker in both roles (PrefillService + DecodeService + KVTransferService
over one engine, vLLM's `kv_both`) on gRPC."""

from __future__ import annotations

from pdserve.commands._worker import role_command

ROLE = "both"
add_parser, config_from_args, run = role_command(ROLE)

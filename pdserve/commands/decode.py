"""`pdserve decode`: a decode worker (DecodeService) on gRPC."""

from __future__ import annotations

from pdserve.commands._worker import role_command

ROLE = "decode"
add_parser, config_from_args, run = role_command(ROLE)

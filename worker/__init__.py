"""A worker: one engine behind gRPC, in a role -- prefill (PrefillService + KVTransferService:
runs prompts, leases their KV blocks to decode workers) or decode (DecodeService: pulls a prompt's
KV or prefills it locally, then streams tokens). `server.py` starts either."""

"""Talk to a running gateway over gRPC with the typed client.

    pdserve serve                      # or: pdserve gateway --decode ... --prefill ...
    python examples/grpc_client.py --address 127.0.0.1:50051 "The capital of France is"

Shows a non-streaming call, a streamed chat answer, and cancelling a stream part-way (which
aborts the request on the decode worker and releases the prefill worker's KV lease).
"""

from __future__ import annotations

import argparse
import asyncio

from pdserve.client import AsyncGatewayClient, GatewayClient, GenerationOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="The capital of France is")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    with GatewayClient(args.address, timeout=120) as client:
        info = client.model_info()
        print(f"model {info.model} (context {info.max_model_len} tokens, pdserve {info.version})")

        greedy = GenerationOptions(max_tokens=args.max_tokens, temperature=0.0)
        result = client.generate(args.prompt, greedy)
        print(f"\n[generate] {args.prompt!r} -> {result.text!r}")
        print(f"  finish={result.choices[0].finish_reason} usage={result.usage}")

        print("\n[stream, chat] ", end="", flush=True)
        chat = [{"role": "user", "content": "Write one sentence about the sea."}]
        with client.stream(messages=chat, options=greedy) as stream:
            for chunk in stream:
                print(chunk.text, end="", flush=True)
        print()

    asyncio.run(cancel_part_way(args.address, args.prompt))


async def cancel_part_way(address: str, prompt: str) -> None:
    """Read five tokens, then leave: the gateway aborts the request on every worker."""
    async with AsyncGatewayClient(address, timeout=120) as client:
        received = 0
        async with client.stream(prompt, GenerationOptions(max_tokens=64)) as stream:
            async for chunk in stream:
                received += len(chunk.token_ids)
                if received >= 5:
                    break  # leaving the `async with` cancels the call
        print(f"\n[asyncio] cancelled after {received} tokens")


if __name__ == "__main__":
    main()

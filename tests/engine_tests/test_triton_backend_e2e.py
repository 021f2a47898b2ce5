"""The Triton attention backend drives the whole engine to the same greedy tokens as the torch one.

Without CUDA the kernels run on the Triton interpreter, which must be switched on before they are
imported; the generation therefore runs in a child process with TRITON_INTERPRET=1, leaving this
process's environment alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# Ragged prompts crossing 8-token blocks. The last one shares a 12-token prefix with the one
# before; it is generated in a second call, so its first block comes from the prefix cache and
# its prefill attends over a cached prefix.
PROMPTS = [
    [5],
    [11, 12, 13, 14, 15, 16, 17, 18, 19],
    list(range(30, 47)),
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 40, 41, 42],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 50, 51, 52, 53, 54],
]
MAX_TOKENS = 8

# Run in the child: prints {backend: [token ids per prompt]} as JSON. The token budget of 24
# chunks the longer prompts and mixes prefill chunks with decode rows in one step.
_GENERATE = """
import json, sys
from engine.llm import LLM
from engine.sampling_params import SamplingParams

model, device, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
tokens = {}
for backend in ("torch", "triton"):
    llm = LLM(model=model, attention_backend=backend, device=device, dtype="float32",
              block_size=8, max_num_batched_tokens=24, kv_cache_memory=1 << 20, seed=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:-1]], params, use_tqdm=False)
    outs += llm.generate([{"prompt_token_ids": prompts[-1]}], params, use_tqdm=False)
    tokens[backend] = [out.outputs[0].token_ids for out in outs]
print(json.dumps(tokens))
"""


def _generate_with_both_backends(model: Path) -> dict[str, list[list[int]]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    args = [str(model), device, json.dumps(PROMPTS), str(MAX_TOKENS)]
    result = subprocess.run(
        [sys.executable, "-c", _GENERATE, *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"generation failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_triton_backend_generates_same_greedy_tokens_as_torch(tiny_llama):
    tokens = _generate_with_both_backends(tiny_llama)
    torch_tokens, triton_tokens = tokens["torch"], tokens["triton"]

    assert [len(t) for t in torch_tokens] == [MAX_TOKENS] * len(PROMPTS)
    assert len({tuple(t) for t in torch_tokens}) > 1, (
        "degenerate model: every prompt gives the same output"
    )
    assert triton_tokens == torch_tokens

"""Speculative decoding, offline: output tok/s with and without it, measured in one run.

Workloads: single stream (one request at a time) on answers that copy from the prompt
(quoting or lightly editing a given text) and on free text; then batches of concurrent requests
(half copying, half free text), where speculation should switch itself off above its batch-size
threshold. Each case runs the plain engine and the speculating one back to back, alternating,
so a noisy machine moves both alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.llm import LLM
from engine.sampling_params import SamplingParams

PASSAGES = [
    "The lighthouse stood at the end of the harbour wall, its lamp turning slowly through the "
    "night. Fishermen coming home counted the flashes to know which headland they had passed, "
    "and the keeper wrote every ship he saw into a thick green ledger.",
    "To install the package, create a virtual environment, activate it, and run pip install "
    "with the name of the package. Then import it in Python and call the main function with the "
    "path of your configuration file as its only argument.",
    "Paged attention stores the key and value cache in fixed-size blocks. A block table maps "
    "each sequence's logical blocks to physical ones, so memory is allocated on demand and "
    "sequences that share a prefix can share the blocks that hold it.",
]
COPY_TASKS = [
    "Repeat the following text exactly, word for word:\n\n{}",
    "Rewrite the following text with every sentence in the past tense replaced by the present "
    "tense, changing nothing else:\n\n{}",
    "Quote the following paragraph back to me inside double quotes:\n\n{}",
]
FREE_TASKS = [
    "Write a short story about a cat who learns to sail.",
    "Explain why the sky is blue to a ten-year-old.",
    "List some ideas for a weekend trip in the mountains and say why each is fun.",
]


@dataclass(slots=True)
class Case:
    name: str
    prompts: list[list[int]]
    batch: int  # requests submitted together (1: one after another)


def build_cases(tokenizer, batch_sizes: list[int]) -> list[Case]:
    def chat(text: str) -> list[int]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )  # fmt: skip
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    copying = [chat(t.format(p)) for t, p in zip(COPY_TASKS, PASSAGES, strict=True)]
    free = [chat(t) for t in FREE_TASKS]
    cases = [Case("copying, single stream", copying, 1), Case("free text, single stream", free, 1)]
    mixed = copying + free
    for b in batch_sizes:
        cases.append(Case(f"{b} concurrent (half copying)", [mixed[i % 6] for i in range(b)], b))
    return cases


def measure(llm: LLM, case: Case, params: SamplingParams) -> dict:
    """Output tokens per second over the case (wall clock), and the tokens themselves."""
    llm.reset_prefix_cache()
    before = llm.engine.stats().spec_decode
    out_tokens: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(case.prompts), case.batch):
        chunk = case.prompts[i : i + case.batch]
        outs = llm.generate([{"prompt_token_ids": p} for p in chunk], params, use_tqdm=False)
        out_tokens += [o.outputs[0].token_ids for o in outs]
    elapsed = time.perf_counter() - start
    total = sum(map(len, out_tokens))
    result = {"output_tokens": total, "seconds": elapsed, "output_tok_s": total / elapsed}
    after = llm.engine.stats().spec_decode
    if after is not None:
        drafts = after.num_drafts - before.num_drafts
        proposed = after.num_draft_tokens - before.num_draft_tokens
        accepted = after.num_accepted_tokens - before.num_accepted_tokens
        result.update(
            num_drafts=drafts,
            num_draft_tokens=proposed,
            num_accepted_tokens=accepted,
            acceptance_rate=accepted / proposed if proposed else 0.0,
            mean_acceptance_length=1 + accepted / drafts if drafts else 0.0,
        )
    result["tokens"] = out_tokens
    return result


def run_cases(engines: dict[str, LLM], cases: list[Case], params: SamplingParams, repeats: int):
    """For each case, every engine `repeats` times, alternating; best tok/s of each kept."""
    report = []
    for case in cases:
        best: dict[str, dict] = {}
        for _ in range(repeats):
            for name, llm in engines.items():
                r = measure(llm, case, params)
                if name not in best or r["output_tok_s"] > best[name]["output_tok_s"]:
                    best[name] = r
        plain = best["plain"]
        entry = {"case": case.name, "batch": case.batch, "num_requests": len(case.prompts)}
        for name, r in best.items():
            entry[name] = {k: v for k, v in r.items() if k != "tokens"}
            if name != "plain":
                entry[name]["speedup"] = r["output_tok_s"] / plain["output_tok_s"]
                entry[name]["same_tokens_as_plain"] = r["tokens"] == plain["tokens"]
        report.append(entry)
    return report

"""Benchmark prompts: random prompts of a target length, prompts read from a JSONL file, or the
first turns of a ShareGPT-format JSON file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Plain words for prompts when no tokenizer is given; most are one token in common BPE vocabularies.
WORDS: tuple[str, ...] = tuple(
    """the of and to in is that for it as was with be by on not he this are or his from at which
    but have an they you were her she there one all we their been has would when if will more no
    out so said what up its about into than them can only other new some could time these two may
    first then do any like my now over such our man me even most made after also did many before
    must through back years where much your way well down should because each just those people
    how too little state good very make world still own see men work long get here between both
    life being under never day same another know while last might us great old year off come since
    against go came right used take three small large city water light house point hand place
    number part system group music river green table window paper garden morning answer question
    story market letter summer winter train plant stone field cloud""".split()
)


MAX_LENGTH_FIXES = 10  # re-encode rounds that bring a random-token prompt to its length


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the benchmark uses."""

    vocab_size: int
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(slots=True, frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int  # tokens when a tokenizer was given, else an estimate (words)
    expected_output_len: int


@dataclass(slots=True, frozen=True)
class RandomDatasetConfig:
    num_prompts: int
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0  # lengths drawn uniformly from [L*(1-r), L*(1+r)]
    prefix_len: int = 0  # a shared prefix of this many tokens in front of every prompt
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("random input and output lengths must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.prefix_len < 0:
            raise ValueError(f"random_prefix_len must be >= 0, got {self.prefix_len}")


def length_range(length: int, ratio: float) -> tuple[int, int]:
    low = max(1, int(length * (1.0 - ratio)))
    high = max(low, int(round(length * (1.0 + ratio))))
    return low, high


def _random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _random_ids(rng: random.Random, tokenizer: Tokenizer, n: int) -> list[int]:
    special = set(tokenizer.all_special_ids)
    ids: list[int] = []
    while len(ids) < n:
        token = rng.randrange(tokenizer.vocab_size)
        if token not in special:
            ids.append(token)
    return ids


def _random_token_text(rng: random.Random, tokenizer: Tokenizer, n: int) -> str:
    """Text that encodes to about `n` tokens.

    Decoding random ids and encoding the text again rarely gives the same ids (neighbours merge
    or split), so the ids are trimmed or topped up and decoded again, a bounded number of times.
    """
    ids = _random_ids(rng, tokenizer, n)
    text = tokenizer.decode(ids)
    for _ in range(MAX_LENGTH_FIXES):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == n:
            break
        ids = ids[:n] if len(ids) > n else ids + _random_ids(rng, tokenizer, n - len(ids))
        text = tokenizer.decode(ids)
    return text


def random_requests(cfg: RandomDatasetConfig, tokenizer: Tokenizer | None) -> list[SampleRequest]:
    """Prompts of random content; lengths are tokens with a tokenizer, words without one."""
    rng = random.Random(cfg.seed)
    in_low, in_high = length_range(cfg.input_len, cfg.range_ratio)
    out_low, out_high = length_range(cfg.output_len, cfg.range_ratio)

    def text(n: int) -> str:
        if n == 0:
            return ""
        if tokenizer is None:
            return _random_words(rng, n)
        return _random_token_text(rng, tokenizer, n)

    prefix = text(cfg.prefix_len)
    requests = []
    for _ in range(cfg.num_prompts):
        body = text(rng.randint(in_low, in_high))
        prompt = f"{prefix} {body}" if prefix else body
        requests.append(
            SampleRequest(
                prompt=prompt,
                prompt_len=count_tokens(prompt, tokenizer),
                expected_output_len=rng.randint(out_low, out_high),
            )
        )
    return requests


def count_tokens(text: str, tokenizer: Tokenizer | None) -> int:
    """Prompt tokens with a tokenizer; a word count estimate without one."""
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False))


def _parse_line(line: str, where: str, default_output_len: int) -> tuple[str, int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg})") from None
    if isinstance(record, str):
        return record, default_output_len
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f'{where}: expected a JSON string or an object with a "prompt" string')
    output_len = record.get("output_tokens", default_output_len)
    if not isinstance(output_len, int) or output_len < 1:
        raise ValueError(f"{where}: output_tokens must be a positive integer")
    return record["prompt"], output_len


def jsonl_requests(
    path: Path, num_prompts: int, output_len: int, tokenizer: Tokenizer | None, seed: int
) -> list[SampleRequest]:
    """Prompts from a JSONL file: one JSON string or {"prompt": ..., "output_tokens": N} a line.

    Shuffled with `seed`; cycled when the file holds fewer than `num_prompts` prompts.
    """
    if not path.is_file():
        raise ValueError(f"dataset file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            rows.append(_parse_line(line, f"{path}:{number}", output_len))
    if not rows:
        raise ValueError(f"dataset file holds no prompts: {path}")
    random.Random(seed).shuffle(rows)
    picked = [rows[i % len(rows)] for i in range(num_prompts)]
    return [SampleRequest(p, count_tokens(p, tokenizer), n) for p, n in picked]


# vLLM's filter for ShareGPT samples: too short to measure, or too long for common contexts.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


def sharegpt_requests(
    path: Path,
    num_prompts: int,
    tokenizer: Tokenizer | None,
    seed: int,
    fixed_output_len: int | None = None,
) -> list[SampleRequest]:
    """Requests from a ShareGPT-format file (a JSON list of {"conversations": [{"from": ...,
    "value": ...}, ...]}), as `vllm bench serve --dataset-name sharegpt` samples them: the first
    turn is the prompt, the second turn's length the output length (or `fixed_output_len`);
    entries with fewer than two turns, or too short or too long, are skipped; shuffled with
    `seed`, the first `num_prompts` that pass kept."""
    if not path.is_file():
        raise ValueError(f"dataset file not found: {path}")
    if fixed_output_len is not None and fixed_output_len < 1:
        raise ValueError(f"--sharegpt-output-len must be >= 1, got {fixed_output_len}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = (t.get("value") if isinstance(t, dict) else None for t in turns[:2])
        if isinstance(first, str) and isinstance(second, str):
            pairs.append((first, second))
    random.Random(seed).shuffle(pairs)
    out: list[SampleRequest] = []
    for prompt, answer in pairs:
        if len(out) == num_prompts:
            break
        prompt_len = count_tokens(prompt, tokenizer)
        output_len = fixed_output_len or count_tokens(answer, tokenizer)
        too_short = prompt_len < SHAREGPT_MIN_LEN or (
            fixed_output_len is None and output_len < SHAREGPT_MIN_LEN
        )
        too_long = (
            prompt_len > SHAREGPT_MAX_PROMPT_LEN
            or prompt_len + output_len > SHAREGPT_MAX_TOTAL_LEN
        )
        if not (too_short or too_long):
            out.append(SampleRequest(prompt, prompt_len, output_len))
    if not out:
        raise ValueError(f"{path}: no conversation passes the length filter")
    return out

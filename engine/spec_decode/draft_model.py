"""Proposals from a smaller model of the same tokenizer, run on this engine's block tables.

The draft keeps its own KV pool with as many blocks as the target's and addresses it with the
target's block ids, so a request's block table and slots serve both models and rolling back the
target's blocks rolls back the draft's. Its KV is computed here, on the engine that decodes: a
request's first proposal step runs the draft over the whole prompt (a decode worker whose
prompt KV was imported prefills the draft locally; the prefill worker never loads the draft).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model_loader import load_hf_config, load_model, model_folder
from engine.model_runner import KVCacheSpec, ModelRunner
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput
from engine.spec_decode.rejection_sampler import RowView, draw


@dataclass(slots=True)
class DraftStep:
    """One request's rows in one draft forward pass (what InputBatch.prepare reads)."""

    request: Request
    start: int  # position of the first token fed
    tokens: list[int]
    num_logits: int = 1

    @property
    def num_new_tokens(self) -> int:
        return len(self.tokens)

    def input_token_ids(self) -> list[int]:
        return self.tokens


@dataclass(slots=True)
class DraftRunnerOptions:
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    attention_backend: str
    enforce_eager: bool
    max_num_seqs: int
    max_model_len: int


class DraftModelProposer:
    def __init__(self, path: str, target_vocab_size: int, opts: DraftRunnerOptions) -> None:
        folder = model_folder(path)
        hf_config, _ = load_hf_config(folder)
        limit = getattr(hf_config, "max_position_embeddings", None) or opts.max_model_len
        if limit < opts.max_model_len:
            raise ValueError(
                f"draft model {path} has max_position_embeddings {limit} < max_model_len "
                f"{opts.max_model_len}"
            )
        loaded = load_model(folder, opts.dtype, opts.device, opts.max_model_len)
        args = loaded.model.args
        if args.vocab_size != target_vocab_size:
            raise ValueError(
                f"draft model vocabulary ({args.vocab_size}) differs from the target's "
                f"({target_vocab_size}): a draft must share the target's tokenizer"
            )
        spec = dict(
            num_layers=args.num_layers,
            num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            block_size=opts.block_size,
            dtype=opts.dtype,
        )
        per_block = KVCacheSpec(num_blocks=1, **spec).bytes_per_block
        self.runner = ModelRunner(
            loaded,
            spec,
            per_block * opts.num_blocks,  # one draft block per target block, same ids
            opts.device,
            opts.attention_backend,
            enforce_eager=opts.enforce_eager,
            max_num_seqs=opts.max_num_seqs,
            max_model_len=opts.max_model_len,
        )
        self.fingerprint = loaded.fingerprint

    def describe(self) -> str:
        return self.runner.describe()

    def propose(self, requests: list[Request], ks: list[int], sampler: Sampler) -> None:
        """Set `spec_token_ids` (k_r each) and `spec_probs` on every request. Each request's
        blocks must already cover num_tokens + k_r - 1 positions (the draft writes its own
        proposals' KV, all but the last)."""
        steps = [DraftStep(r, _reusable(r), r.all_token_ids[_reusable(r) :]) for r in requests]
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        active = list(range(len(requests)))
        for j in range(max(ks)):
            logits = self.runner.execute(SchedulerOutput(steps))  # (len(active), V)
            rows = [RowView(requests[i], drafts[i]) for i in active]
            dist = sampler.distributions(logits, rows)
            for row, i in enumerate(active):
                r = requests[i]
                if r.params.greedy:
                    token = int(dist.logits[row].argmax())
                else:
                    q = dist.probs[row]
                    token = draw(q, r.generator if r.generator is not None else sampler.generator)
                    probs[i].append(q)
                drafts[i].append(token)
            active = [i for i in active if ks[i] > j + 1]
            steps = [
                DraftStep(requests[i], requests[i].num_tokens + j, [drafts[i][-1]]) for i in active
            ]
        for r, d, q in zip(requests, drafts, probs, strict=True):
            r.spec_token_ids = d
            r.spec_probs = torch.stack(q) if q else None  # (k, V); None: greedy
            r.num_draft_computed = r.num_tokens
            r.draft_written = d[:-1]  # positions num_tokens .. num_tokens + k - 2


def _reusable(r: Request) -> int:
    """Leading positions whose draft KV is still right: everything computed before, plus the
    proposals it wrote that the sequence kept; at least the newest token is always fed."""
    valid = r.num_draft_computed
    for token in r.draft_written:
        if valid >= r.num_tokens - 1 or r.all_token_ids[valid] != token:
            break
        valid += 1
    return min(valid, r.num_tokens - 1)

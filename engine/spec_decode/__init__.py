"""Speculative decoding: cheap proposals verified by the target model in one pass.

`config.py` (the `--speculative-config` fields, vLLM's names), `ngram.py` (prompt lookup),
`draft_model.py` (a smaller model of the same tokenizer), `rejection_sampler.py` (accept with
min(1, p/q), resample from the residual: the target distribution exactly), `stats.py` (counters).
"""

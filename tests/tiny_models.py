"""Tiny random-weight models of every supported architecture, saved as HF folders for tests."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
VOCAB_SIZE = 320
_TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "paged attention keeps the kv cache in blocks",
    "prefill on one worker and decode on another",
] * 4


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TRAIN_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def hf_config(arch: str, **overrides):
    import transformers

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=0,
    )
    extra = {
        "LlamaForCausalLM": ("LlamaConfig", {}),
        "MistralForCausalLM": ("MistralConfig", {"sliding_window": None}),
        "Qwen2ForCausalLM": ("Qwen2Config", {"use_sliding_window": False}),
        "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 16, "use_sliding_window": False}),
    }[arch]
    cls = getattr(transformers, extra[0])
    cfg = cls(**{**common, **extra[1], **overrides})
    cfg.architectures = [arch]
    return cfg


def save_tiny_model(path: Path, arch: str = "LlamaForCausalLM", seed: int = 0, **overrides) -> Path:
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    model = getattr(transformers, arch)(cfg).float().eval()
    with torch.no_grad():  # larger random weights give peaky, tie-free distributions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return path

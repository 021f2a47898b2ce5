"""Sampling defaults from a model's `generation_config.json`, as vLLM's `--generation-config`.

The setting is `auto` (vLLM's default: the model folder's file), `vllm` (no file: the contract's
defaults stand) or a folder that holds the file. Only the keys vLLM takes are read, each the
default of one sampling field; a request that sets the field wins. The gateway and the offline
`LLM` both read the file here, so both take the same keys the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

GENERATION_CONFIG_FILE = "generation_config.json"
AUTO = "auto"
VLLM = "vllm"

# generation_config.json key -> (the sampling field it is the default of, the JSON types it may
# have). `do_sample` is not among them: vLLM ignores it, and so do we (a file with
# `do_sample: false` and a temperature samples at that temperature; greedy is temperature 0).
KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "temperature": ("temperature", (int, float)),
    "top_p": ("top_p", (int, float)),
    "top_k": ("top_k", (int,)),
    "min_p": ("min_p", (int, float)),
    "repetition_penalty": ("repetition_penalty", (int, float)),
    "max_new_tokens": ("max_tokens", (int,)),
}
DEFAULTABLE: frozenset[str] = frozenset(name for name, _ in KEYS.values())


def generation_config_folder(setting: str, model_folder: str | Path) -> Path | None:
    """Where the file is read from: the model folder (`auto`), nowhere (`vllm`) or `setting`."""
    if setting == VLLM:
        return None
    if setting == AUTO:
        return Path(model_folder)
    folder = Path(setting).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"generation config {setting!r} is neither {AUTO!r}, {VLLM!r} nor a folder"
        )
    return folder


def read_sampling_defaults(folder: Path | None) -> dict[str, int | float]:
    """sampling field -> default, from `folder`'s generation_config.json (empty without a folder
    or without the file; a key set to null is not set). Raises ValueError when the file is not
    a JSON object or one of the keys has the wrong type."""
    if folder is None:
        return {}
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    defaults: dict[str, int | float] = {}
    for key, (name, types) in KEYS.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            kind = "an integer" if types == (int,) else "a number"
            raise ValueError(f"{path}: {key} must be {kind}, got {value!r}")
        defaults[name] = float(value) if float in types else value
    return defaults


def load_sampling_defaults(setting: str, model_folder: str | Path) -> dict[str, int | float]:
    """`read_sampling_defaults` of the folder `setting` names (see `generation_config_folder`)."""
    return read_sampling_defaults(generation_config_folder(setting, model_folder))


def describe(setting: str, model_folder: str | Path, defaults: dict[str, int | float]) -> str:
    """The start-up log line: which defaults were taken from where, and how to turn them off."""
    folder = generation_config_folder(setting, model_folder)
    if folder is None:
        return "generation config: vllm (the built-in sampling defaults)"
    path = folder / GENERATION_CONFIG_FILE
    if not defaults:
        return f"generation config: no sampling defaults in {path}"
    taken = ", ".join(f"{name}={value}" for name, value in defaults.items())
    return (
        f"sampling defaults from {path}: {taken} (requests that set a field override it; "
        "--generation-config vllm ignores the file)"
    )

"""Reading sampling defaults from generation_config.json (`--generation-config`)."""

from __future__ import annotations

import json

import pytest

from contract.generation_config import (
    GENERATION_CONFIG_FILE,
    describe,
    generation_config_folder,
    load_sampling_defaults,
    read_sampling_defaults,
)
from contract.sampling import FIELD_NAMES


def write(folder, content) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / GENERATION_CONFIG_FILE).write_text(text)


@pytest.mark.parametrize(
    "key, value, field, taken",
    [
        ("temperature", 0.6, "temperature", 0.6),
        ("temperature", 0, "temperature", 0.0),  # an int is a number too
        ("top_p", 0.9, "top_p", 0.9),
        ("top_k", 20, "top_k", 20),
        ("min_p", 0.05, "min_p", 0.05),
        ("repetition_penalty", 1.05, "repetition_penalty", 1.05),
        ("max_new_tokens", 3, "max_tokens", 3),
    ],
)
def test_each_key_is_the_default_of_its_field(tmp_path, key, value, field, taken):
    write(tmp_path, {key: value, "bos_token_id": 1, "eos_token_id": 2})
    defaults = read_sampling_defaults(tmp_path)
    assert defaults == {field: taken}
    assert type(defaults[field]) is type(taken)
    assert field in FIELD_NAMES


def test_a_whole_file_keeps_only_the_sampling_keys(tmp_path):
    write(
        tmp_path,
        {
            "_from_model_config": True,
            "bos_token_id": 1,
            "eos_token_id": [2, 3],
            "do_sample": False,  # ignored, as vLLM: the temperature below still applies
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "repetition_penalty": 1.05,
            "max_length": 4096,  # transformers' total length: not a default vLLM takes
            "num_beams": 1,
            "transformers_version": "4.45.0",
        },
    )
    assert read_sampling_defaults(tmp_path) == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }


def test_null_keys_and_files_without_sampling_keys_give_no_defaults(tmp_path):
    write(tmp_path, {"temperature": None, "eos_token_id": 2})
    assert read_sampling_defaults(tmp_path) == {}


def test_a_missing_file_is_no_defaults(tmp_path):
    assert read_sampling_defaults(tmp_path) == {}
    assert load_sampling_defaults("auto", tmp_path) == {}


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "must hold a JSON object"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
    ],
)
def test_an_invalid_file_is_a_clear_error(tmp_path, content, message):
    write(tmp_path, content)
    with pytest.raises(ValueError, match=message) as err:
        read_sampling_defaults(tmp_path)
    assert GENERATION_CONFIG_FILE in str(err.value)


def test_an_unreadable_file_is_a_clear_error(tmp_path):
    (tmp_path / GENERATION_CONFIG_FILE).write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="cannot read"):
        read_sampling_defaults(tmp_path)


def test_auto_reads_the_model_folder_and_vllm_reads_nothing(tmp_path):
    write(tmp_path, {"temperature": 0.0, "max_new_tokens": 3})
    assert load_sampling_defaults("auto", tmp_path) == {"temperature": 0.0, "max_tokens": 3}
    assert generation_config_folder("vllm", tmp_path) is None
    assert load_sampling_defaults("vllm", tmp_path) == {}
    write(tmp_path, "{not json")  # vllm does not even open the file
    assert load_sampling_defaults("vllm", tmp_path) == {}


def test_a_folder_setting_reads_that_folder_not_the_model(tmp_path):
    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir()
    other.mkdir()
    write(model, {"temperature": 0.5})
    write(other, {"top_p": 0.5})
    assert load_sampling_defaults(str(other), model) == {"top_p": 0.5}
    with pytest.raises(ValueError, match="neither 'auto', 'vllm' nor a folder"):
        load_sampling_defaults(str(tmp_path / "missing"), model)


def test_the_log_line_names_the_file_and_the_values(tmp_path):
    write(tmp_path, {"temperature": 0.0, "max_new_tokens": 3})
    defaults = load_sampling_defaults("auto", tmp_path)
    line = describe("auto", tmp_path, defaults)
    assert str(tmp_path / GENERATION_CONFIG_FILE) in line
    assert "temperature=0.0" in line and "max_tokens=3" in line and "vllm" in line
    assert "no sampling defaults" in describe("auto", tmp_path, {})
    assert "built-in" in describe("vllm", tmp_path, {})

"""Files named by engine flags, read at start-up: --chat-template (a path or the template itself) and
--generation-config (sampling defaults from generation_config.json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine_setup import generation_defaults, parse_generation_defaults
from engine.loader.tokenizer_info import load_chat_template

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def test_chat_template_from_a_file_or_inline(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE  # not a file, holds Jinja characters: the template
    assert load_chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    # The API process's syntax: loop controls and the {% generation %} block of training templates.
    special = "{% for m in messages %}{% generation %}{{ m }}{% endgeneration %}{% break %}{% endfor %}"
    assert load_chat_template(special) == special
    # As vLLM, escapes typed in an inline template are interpreted (a file is taken as written).
    typed = "{% for m in messages %}{{ m['content'] }}\\n{% endfor %}é"
    assert load_chat_template(typed) == "{% for m in messages %}{{ m['content'] }}\n{% endfor %}é"
    path.write_text(typed)
    assert load_chat_template(str(path)) == typed


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("templates/missing.jinja", "looks like a file path, but it cannot be read (No such file"),
        ("{% for m in messages %}{{ m }}", "does not parse as Jinja"),
        ("{{ messages[0] }", "does not parse as Jinja"),
    ],
)
def test_chat_template_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_chat_template(value)


def test_chat_template_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot be read \(Is a directory\)"):
        load_chat_template(str(tmp_path))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if x %}never closed")
    with pytest.raises(ValueError, match=r"chat template file .*bad.jinja' does not parse as Jinja"):
        load_chat_template(str(bad))
    empty = tmp_path / "empty.jinja"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_chat_template(str(empty))


def test_generation_defaults_take_the_sampling_fields_only() -> None:
    raw = {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0,
        "repetition_penalty": 1.05,
        "max_new_tokens": 512.0,
        "do_sample": True,
        "max_length": 4096,
        "eos_token_id": [2, 4],
        "presence_penalty": None,
    }
    defaults = parse_generation_defaults(raw, "g.json")
    assert defaults == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.05,
        "max_tokens": 512,
    }
    assert type(defaults["top_k"]) is int and type(defaults["max_tokens"]) is int
    assert parse_generation_defaults({"top_k": None, "temperature": None}, "g.json") == {}
    assert parse_generation_defaults({"top_k": 0}, "g.json") == {"top_k": 0}  # 0: no cut, as requests
    # transformers' own defaults say nothing (vLLM reads only the fields that differ from them)
    repeated = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
    assert parse_generation_defaults(repeated, "g.json") == {}
    assert parse_generation_defaults({**repeated, "top_k": 40}, "g.json") == {"top_k": 40}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", "0.7"),
        ("top_p", 0),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("max_new_tokens", 0),
        ("max_new_tokens", True),
        ("temperature", float("nan")),
    ],
)
def test_generation_defaults_refuse_values_no_request_could_send(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"g.json: {field} must be .*--generation-config vllm"):
        parse_generation_defaults({field: value}, "g.json")


def _folder(tmp_path: Path, name: str, generation: dict | None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_generation_config_modes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _folder(tmp_path, "model", {"temperature": 0.0, "max_new_tokens": 5, "eos_token_id": 2})
    other = _folder(tmp_path, "other", {"top_k": 1})
    plain = _folder(tmp_path, "plain", None)
    with caplog.at_level(logging.WARNING, logger="engine.engine_setup"):
        assert generation_defaults(EngineConfig(model=str(model))) == {"temperature": 0.0, "max_tokens": 5}
    assert "generation_config.json" in caplog.text and "--generation-config vllm" in caplog.text
    assert generation_defaults(EngineConfig(model=str(model), generation_config="vllm")) == {}
    assert generation_defaults(EngineConfig(model=str(model), generation_config=str(other))) == {"top_k": 1}
    assert generation_defaults(EngineConfig(model=str(plain))) == {}  # auto, and the folder has none
    with pytest.raises(
        ValueError, match="--generation-config .*plain' names no folder with a generation_config.json"
    ):
        generation_defaults(EngineConfig(model=str(model), generation_config=str(plain)))
    (plain / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*generation_config.json"):
        generation_defaults(EngineConfig(model=str(plain)))


def test_a_gguf_file_has_no_generation_config(default_gguf_path: Path) -> None:
    assert generation_defaults(EngineConfig(model=None)) == {}
    assert generation_defaults(EngineConfig(model=str(default_gguf_path))) == {}

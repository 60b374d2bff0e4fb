"""`tandem serve --model-config`: the file's entries become per-model engine command lines, with the
command line's engine options as defaults; bad files stop the launch with a message naming the entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.cli import build_parser
from tandem.model_config import ModelConfigError, load_model_specs


def _serve(argv: list[str]):  # noqa: ANN202
    parser = build_parser()
    ns = parser.parse_args(["serve", *argv])
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr,index]
    return serve_parser, ns


def test_entries_override_the_command_lines_engine_options(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(
        "- model: /models/a\n"
        "  served_model_name: a\n"
        "- model: /models/b\n"
        "  served-model-name: [b, b2]\n"
        "  engines: 2\n"
        "  max_model_len: 128\n"
        "  enable_prefix_caching: false\n"
        "  dtype: bfloat16\n"
    )
    parser, ns = _serve(["--model-config", str(config), "--dtype", "float32", "--num-threads", "1"])
    a, b = load_model_specs(str(config), parser, ns)
    assert (a.model, a.num_engines) == ("/models/a", 1)
    assert a.engine_argv == ["--dtype", "float32", "--num-threads", "1", "--served-model-name", "a"]
    assert (b.model, b.num_engines) == ("/models/b", 2)
    assert b.engine_argv == [
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "128",
        "--no-enable-prefix-caching",
        "--num-threads",
        "1",
        "--served-model-name",
        "b",
        "b2",
    ]


def test_json_works_too_and_a_missing_model_is_the_default_one(tmp_path: Path) -> None:
    config = tmp_path / "models.json"
    config.write_text('[{"served_model_name": "smol", "data_parallel_size": 3}]')
    parser, ns = _serve(["--model-config", str(config)])
    (spec,) = load_model_specs(str(config), parser, ns)
    assert (spec.model, spec.num_engines, spec.engine_argv) == (None, 3, ["--served-model-name", "smol"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "non-empty list"),
        ("model: x", "non-empty list"),
        ("- just-a-path", "must be a mapping"),
        ("- {model: x, max_model_length: 5}", "model 1: unknown option `max_model_length`"),
        ("- {model: x}\n- {model: y, engines: 0}", "model 2: `engines` must be a whole number"),
        ("- {model: x, dtype: float64}", "`dtype` must be one of"),
        ("- {model: x, enable_prefix_caching: maybe}", "must be true or false"),
        ("- {model: x, max_model_len: [1, 2]}", "must be a single value"),
        ("- [unclosed", "not valid YAML or JSON"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(text)
    parser, ns = _serve(["--model-config", str(config)])
    with pytest.raises(ModelConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_model_specs(str(config), parser, ns)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    parser, ns = _serve(["--model-config", str(tmp_path / "none.yaml")])
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_model_specs(str(tmp_path / "none.yaml"), parser, ns)


def test_speculative_config_may_be_a_mapping(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(
        "- served_model_name: fast\n"
        "  speculative_config: {method: ngram, num_speculative_tokens: 3, prompt_lookup_max: 3}\n"
        "- served_model_name: text\n"
        "  speculative_config: '{\"num_speculative_tokens\": 2}'\n"
    )
    parser, ns = _serve(["--model-config", str(config)])
    fast, text = load_model_specs(str(config), parser, ns)
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}'
    assert fast.engine_argv == ["--served-model-name", "fast", "--speculative-config", spec]
    assert text.engine_argv[-2:] == ["--speculative-config", '{"num_speculative_tokens": 2}']
    config.write_text("- speculative_config: {method: eagle, num_speculative_tokens: 3}\n")
    with pytest.raises(ModelConfigError, match="model 1: --speculative-config: method 'eagle'"):
        load_model_specs(str(config), parser, ns)

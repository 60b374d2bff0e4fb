"""vLLM's LoRA flags on `tandem serve` and `tandem engine`: both --lora-modules forms, repeated or listed,
reach the engine config, and survive the launcher's hand-over of engine flags to `tandem engine`."""

from __future__ import annotations

import json

import pytest

from tandem.args import ENGINE_GROUP, engine_config, unparse_group
from tandem.cli import build_parser

JSON_SPEC = json.dumps({"name": "b", "path": "/adapters/b", "base_model_name": "base"})


def test_both_forms_listed_and_repeated_reach_the_engine_config() -> None:
    argv = [
        "serve",
        "--enable-lora",
        "--lora-modules",
        "a=/adapters/a",
        JSON_SPEC,
        "--lora-modules",
        "c=/x=y",
    ]
    argv += ["--max-loras", "4", "--max-lora-rank", "8", "--max-cpu-loras", "6"]
    config = engine_config(build_parser().parse_args(argv), listen="ipc:///tmp/x", engine_id="e")
    assert config.enable_lora
    assert config.lora_modules == (
        ("a", "/adapters/a", None),
        ("b", "/adapters/b", "base"),
        ("c", "/x=y", None),
    )
    assert (config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (4, 8, 6)


def test_defaults_are_vllms() -> None:
    config = engine_config(build_parser().parse_args(["engine"]), listen="ipc:///tmp/x", engine_id="e")
    assert not config.enable_lora and config.lora_modules == ()
    assert (config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (1, 16, None)


def test_the_launcher_hands_the_flags_to_the_engine_unchanged() -> None:
    parser = build_parser()
    serve_ns = parser.parse_args(
        ["serve", "--enable-lora", "--lora-modules", "a=/adapters/a", JSON_SPEC, "--max-loras", "2"]
    )
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    engine_argv = unparse_group(serve_parser, ENGINE_GROUP, serve_ns)
    engine_ns = parser.parse_args(["engine", *engine_argv])
    as_engine = engine_config(engine_ns, listen="l", engine_id="e")
    assert as_engine == engine_config(serve_ns, listen="l", engine_id="e")


@pytest.mark.parametrize(
    "spec", ["no-equals-sign", "=/path", "name=", '{"name": "x"}', "{not json", '{"name": 1, "path": "/p"}']
)
def test_malformed_specs_are_refused_with_the_flag_named(
    spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["engine", "--lora-modules", spec])
    assert "--lora-modules" in capsys.readouterr().err

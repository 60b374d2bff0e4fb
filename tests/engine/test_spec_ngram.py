"""The n-gram proposer and the --speculative-config parser: pure functions, no model."""

from __future__ import annotations

import time
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.spec.config import SpeculativeConfig, parse_speculative_config
from engine.spec.ngram import propose_ngram


def test_proposes_what_followed_the_most_recent_earlier_match() -> None:
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], [], 3, 1, 3) == [4, 5, 1]
    # "2 3" occurs at 1-2 and 4-5: the later one wins.
    assert propose_ngram([1, 2, 3, 9, 2, 3, 7, 2, 3], [], 2, 1, 3) == [7, 2]
    # Output tokens are searched (and matched) like prompt tokens.
    assert propose_ngram([1, 2, 3, 4], [1, 2], 2, 1, 2) == [3, 4]


def test_no_match_gives_no_drafts() -> None:
    assert propose_ngram([1, 2, 3, 4], [5], 3, 1, 3) == []
    assert propose_ngram([7], [], 3, 1, 3) == []
    assert propose_ngram([1, 2, 1, 2], [], 0, 1, 3) == []


def test_the_longest_n_in_bounds_wins_and_min_is_enforced() -> None:
    # Last token 3: a 1-gram matches at position 5 (followed by 8), the 3-gram "1 2 3" at 0-2 (then 4).
    tokens = [1, 2, 3, 4, 9, 3, 8, 1, 2, 3]
    assert propose_ngram(tokens, [], 1, 1, 3) == [4]
    assert propose_ngram(tokens, [], 1, 1, 1) == [8]  # max 1: only the most recent 1-gram
    # min 4: the 3-gram match is too short.
    assert propose_ngram(tokens, [], 1, 4, 5) == []
    # Repeats of one token: the most recent 2-gram match ends one before the last token.
    assert propose_ngram([5, 5, 5, 5], [], 3, 2, 2) == [5]


def test_drafts_are_capped_at_k_and_by_the_end_of_the_sequence() -> None:
    tokens = list(range(20)) + list(range(5))
    assert propose_ngram(tokens, [], 4, 1, 3) == [5, 6, 7, 8]
    assert propose_ngram(tokens, [], 100, 1, 3) == list(range(5, 20)) + list(range(5))


def test_only_the_window_is_searched() -> None:
    old = [1, 2, 3, 4]
    assert propose_ngram(old + [0] * 10, [1, 2], 2, 1, 2, window=20) == [3, 4]
    assert propose_ngram(old + [0] * 10, [1, 2], 2, 1, 2, window=8) == []


def test_a_call_over_four_thousand_tokens_is_cheap() -> None:
    prompt = [(i * 7919) % 30000 for i in range(3000)]
    output = [(i * 104729) % 30000 for i in range(1000)]
    start = time.perf_counter()
    for _ in range(50):
        propose_ngram(prompt, output, 4, 1, 3)
    per_call = (time.perf_counter() - start) / 50
    assert per_call < 0.005  # ~0.1 ms on the 2-core CI machine; far below one decode step


def test_config_defaults_are_vllms() -> None:
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 4}') == SpeculativeConfig(
        4, 5, 5
    )
    assert parse_speculative_config(
        {"num_speculative_tokens": 3, "prompt_lookup_max": 3}
    ) == SpeculativeConfig(3, 3, 3)
    assert parse_speculative_config(
        {"num_speculative_tokens": 2, "prompt_lookup_min": 2}
    ) == SpeculativeConfig(2, 2, 2)
    assert parse_speculative_config(None) is None
    # The offline LLM passes a dict (or JSON text) through EngineConfig, which converts it.
    spec: Any = {"num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    config = EngineConfig(speculative_config=spec)
    assert config.speculative_config == SpeculativeConfig(4, 3, 1)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ('{"method": "eagle", "num_speculative_tokens": 2}', "method 'eagle' is not supported"),
        ('{"method": "ngram"}', "num_speculative_tokens is required"),
        ('{"num_speculative_tokens": 0}', "num_speculative_tokens must be a whole number of at least 1"),
        ('{"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}', "must be <="),
        ('{"num_speculative_tokens": 2, "prompt_lookup_max": "3"}', "prompt_lookup_max must be"),
        ('{"num_speculative_tokens": 2, "model": "x"}', "unsupported key(s) model"),
        ("[1]", "must be a JSON object"),
        ("{bad", "not valid JSON"),
    ],
)
def test_bad_configs_fail_with_the_reason(spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_speculative_config(spec)
    assert reason in str(info.value)
    with pytest.raises(ValueError):
        EngineConfig(speculative_config=spec)  # type: ignore[arg-type]


def test_the_cli_refuses_a_bad_config_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    from tandem.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["engine", "--speculative-config", '{"method": "medusa"}'])
    assert "method 'medusa' is not supported" in capsys.readouterr().err
    ns = build_parser().parse_args(["engine", "--speculative-config", '{"num_speculative_tokens": 3}'])
    assert ns.speculative_config == '{"num_speculative_tokens": 3}'  # passed on to engines as given

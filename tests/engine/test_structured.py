"""Structured outputs in the engine on a tiny random model: every output obeys its constraint, EOS only
where the grammar accepts, compile failures become 400s, and a slow compile never stalls the batch."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema
import llguidance
import pytest
from tokenizers import Tokenizer

import engine.structured
from contract.grammar import GrammarError, grammar_for_spec
from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.stepper import EngineStepper
from engine.structured import GrammarCompiler
from protocol.messages import AddRequest, FinishReason, RequestDelta, SamplingParams, StructuredSpec

PROMPT = [10, 11, 12, 13, 14, 15]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def stepper(tiny_model_dir: Callable[[str], Path]) -> EngineStepper:
    return EngineStepper(
        build_engine_parts(EngineConfig(model=str(tiny_model_dir("llama")), kv_cache_memory=8 * 2**20))
    )


@pytest.fixture(scope="module")
def tokenizer(stepper: EngineStepper) -> Tokenizer:
    return Tokenizer.from_str(stepper.parts.ready.tokenizer_json)


def add(stepper: EngineStepper, request_id: str, spec: StructuredSpec | None, **sampling: object) -> None:
    params = SamplingParams(**{"max_tokens": 64, "temperature": 1.0, **sampling}, structured=spec)  # type: ignore[arg-type]
    assert stepper.add(AddRequest(request_id, PROMPT, params, time.time()), b"test", []) is None


def run_all(stepper: EngineStepper, timeout_s: float = 120.0) -> dict[str, list[RequestDelta]]:
    deltas: dict[str, list[RequestDelta]] = {}
    deadline = time.monotonic() + timeout_s
    while stepper.has_work and time.monotonic() < deadline:
        for _client, delta in stepper.step():
            deltas.setdefault(delta.request_id, []).append(delta)
        if not stepper.last_step_had_work:
            time.sleep(0.002)  # only requests whose grammar still compiles
    assert not stepper.has_work
    return deltas


def text_of(tokenizer: Tokenizer, deltas: list[RequestDelta]) -> str:
    ids = [t for d in deltas for t in d.new_token_ids]
    eos = {2, 4}
    return tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=False)


def test_grammar_for_spec_kinds() -> None:
    for spec in (
        StructuredSpec(json_schema=json.dumps(SCHEMA)),
        StructuredSpec(regex=r"\d+"),
        StructuredSpec(choice=["a", 'b "q"']),
        StructuredSpec(grammar='start: "x" | "y"'),
        StructuredSpec(grammar='root ::= "x" | "y"'),  # GBNF is converted to Lark
        StructuredSpec(any_json_object=True),
    ):
        assert llguidance.LLMatcher.validate_grammar(grammar_for_spec(spec)) == ""
    with pytest.raises(GrammarError):
        grammar_for_spec(StructuredSpec(json_schema="{not json"))


def test_compiler_caches_by_spec(stepper: EngineStepper) -> None:
    ready = stepper.parts.ready
    compiler = GrammarCompiler(ready.tokenizer_json, ready.vocab_size, ready.eos_token_ids, cache_size=2)
    a, b = StructuredSpec(regex="a+"), StructuredSpec(regex="b+")
    first = compiler.submit(a)
    assert compiler.submit(StructuredSpec(regex="a+")) is first  # equal specs share one compile
    compiler.submit(b)
    compiler.submit(StructuredSpec(regex="c+"))  # evicts the least recently used ("a+")
    assert compiler.submit(a) is not first
    assert first.result(timeout=30) is not None
    compiler.shutdown()


def test_regex_and_choice_outputs_always_match(stepper: EngineStepper, tokenizer: Tokenizer) -> None:
    pattern = r"[a-z]{2,5}-[0-9]{1,3}"
    choices = ["alpha", "beta gamma", 'quote " and \\']
    for i in range(6):
        add(stepper, f"re{i}", StructuredSpec(regex=pattern), seed=i)
        add(stepper, f"ch{i}", StructuredSpec(choice=choices), seed=100 + i)
    deltas = run_all(stepper)
    for i in range(6):
        assert re.fullmatch(pattern, text_of(tokenizer, deltas[f"re{i}"]))
        assert text_of(tokenizer, deltas[f"ch{i}"]) in choices
        for rid in (f"re{i}", f"ch{i}"):
            assert deltas[rid][-1].finish_reason is FinishReason.STOP


def test_json_schema_outputs_validate(stepper: EngineStepper, tokenizer: Tokenizer) -> None:
    for i in range(4):
        add(stepper, f"js{i}", StructuredSpec(json_schema=json.dumps(SCHEMA)), max_tokens=120, seed=i)
    add(stepper, "obj", StructuredSpec(any_json_object=True), max_tokens=120, seed=7, temperature=0.0)
    deltas = run_all(stepper)
    for i in range(4):
        assert deltas[f"js{i}"][-1].finish_reason is FinishReason.STOP
        jsonschema.validate(json.loads(text_of(tokenizer, deltas[f"js{i}"])), SCHEMA)
    if deltas["obj"][-1].finish_reason is FinishReason.STOP:
        assert isinstance(json.loads(text_of(tokenizer, deltas["obj"])), dict)


def test_max_tokens_mid_structure_is_length(stepper: EngineStepper, tokenizer: Tokenizer) -> None:
    add(stepper, "short", StructuredSpec(regex=r"[a-z]{20}"), max_tokens=3)
    deltas = run_all(stepper)["short"]
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert len([t for d in deltas for t in d.new_token_ids]) == 3
    assert re.fullmatch(r"[a-z]+", text_of(tokenizer, deltas))


def test_invalid_grammar_finishes_with_400(stepper: EngineStepper) -> None:
    add(stepper, "bad", StructuredSpec(regex="a(b"))
    add(stepper, "good", None, max_tokens=3)
    deltas = run_all(stepper)
    (bad,) = deltas["bad"]
    assert bad.finish_reason is FinishReason.ERROR and bad.error_status == 400
    assert "unclosed group" in (bad.error or "")
    assert len(deltas["good"]) == 3


def test_unexpected_compile_failure_has_a_public_message(
    stepper: EngineStepper, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A compile that fails with something other than GrammarError (a bug, memory) answers 400 with a plain
    sentence: no exception class, no internal path; the detail goes to the engine log with the request id."""
    real_grammar_for_spec = engine.structured.grammar_for_spec

    def broken(spec: StructuredSpec) -> str:
        # Fault injection: no spec makes the real compiler raise anything but GrammarError today.
        if spec.regex == "broken[0-9]+":
            raise RuntimeError("unexpected state in /opt/secret/llguidance/compiler.rs")
        return real_grammar_for_spec(spec)

    monkeypatch.setattr(engine.structured, "grammar_for_spec", broken)
    add(stepper, "broken", StructuredSpec(regex="broken[0-9]+"))
    add(stepper, "fine", None, max_tokens=3)
    with caplog.at_level("ERROR", logger="engine.structured"):
        deltas = run_all(stepper)
    (broken_delta,) = deltas["broken"]
    assert broken_delta.finish_reason is FinishReason.ERROR and broken_delta.error_status == 400
    message = broken_delta.error or ""
    assert message.startswith("Invalid structured output constraint: ") and "request broken" in message
    assert "RuntimeError" not in message and "/opt/secret" not in message and "Error" not in message
    assert any(
        "broken" in r.getMessage() and r.exc_info and "/opt/secret" in str(r.exc_info[1])
        for r in caplog.records
    )
    assert len(deltas["fine"]) == 3


def test_slow_compile_does_not_stall_other_requests(
    stepper: EngineStepper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measured in engine steps: while one grammar compiles, the running request gets a token in every
    step, and the constrained request starts within one step of its compile finishing."""
    release = threading.Event()
    compiled = threading.Event()
    real_grammar_for_spec = engine.structured.grammar_for_spec

    def slow(spec: StructuredSpec) -> str:
        # Fault injection: a compile that takes as long as the test wants (runs on the worker thread).
        if spec.regex == "slow[0-9]+":
            release.wait(timeout=60)
            compiled.set()
        return real_grammar_for_spec(spec)

    monkeypatch.setattr(engine.structured, "grammar_for_spec", slow)
    try:
        add(stepper, "free", None, max_tokens=40, ignore_eos=True)
        add(stepper, "slow", StructuredSpec(regex="slow[0-9]+"), max_tokens=8)
        steps_with_free, steps_with_slow = [], []
        for step in range(40):
            if step == 10:
                release.set()
                assert compiled.wait(timeout=30)
                time.sleep(0.05)  # let the worker thread publish the compiled matcher
            if step < 10:  # waiting on its grammar: vllm:num_requests_waiting_by_reason "deferred"
                assert stepper.stats().num_waiting_deferred == 1
            for _client, delta in stepper.step():
                (steps_with_free if delta.request_id == "free" else steps_with_slow).append(step)
        assert steps_with_free == list(range(40))  # one token every step, compile or not
        assert steps_with_slow and steps_with_slow[0] == 10  # first step after the compile finished
        assert stepper.stats().num_waiting_deferred == 0
        run_all(stepper)
    finally:
        release.set()

"""Every script in examples/ runs against the shared real server and prints what it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.server_process import REPO

EXAMPLES = REPO / "examples"


def run_example(name: str, base_url: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--base-url", base_url, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_example_is_covered() -> None:
    covered = {"chat.py", "streaming.py", "batch_chat.py", "tools.py", "json_schema.py", "prompt_embeds.py"}
    covered |= {"offline_batch.py", "benchmark.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == covered


def test_chat(default_server) -> None:
    out = run_example("chat.py", default_server.base_url, "--max-tokens", "8")
    assert out.startswith("[SmolLM2-135M-Instruct] ") and len(out.splitlines()[0]) > len(
        "[SmolLM2-135M-Instruct] "
    )
    assert "finish_reason=" in out


def test_streaming(default_server) -> None:
    out = run_example("streaming.py", default_server.base_url, "--max-tokens", "6")
    assert "[6 tokens]" in out
    num_chunks = int(out.splitlines()[-1].split()[0])
    assert 1 <= num_chunks <= 6


def test_batch_chat(default_server) -> None:
    out = run_example("batch_chat.py", default_server.base_url, "--max-tokens", "4")
    lines = out.splitlines()
    assert [line.split(" -> ")[0] for line in lines[:3]] == [
        "'What is 2 + 2?'",
        "'Name a color.'",
        "'Say hello in French.'",
    ]
    assert lines[3].startswith("usage:")


def test_tools(default_server) -> None:
    out = run_example("tools.py", default_server.base_url, "--max-tokens", "40")
    call = out.splitlines()[0]
    assert call.startswith("tool call: get_weather({") and "'city'" in call
    assert out.splitlines()[1].startswith("answer: ")


def test_json_schema(default_server) -> None:
    out = run_example("json_schema.py", default_server.base_url, "--max-tokens", "48")
    raw = out.splitlines()[0].removeprefix("raw: ")
    person = json.loads(raw)
    assert set(person) == {"name", "age", "city"} and isinstance(person["age"], int)


def test_prompt_embeds(default_server) -> None:
    out = run_example("prompt_embeds.py", default_server.base_url, "--max-tokens", "4")
    assert "same as the text prompt: True" in out


@pytest.mark.slow
def test_offline_batch(default_server) -> None:
    # The shared test server runs float32; the in-process model must too for identical answers.
    out = run_example("offline_batch.py", default_server.base_url, "--max-tokens", "4", "--dtype", "float32")
    assert out.count(" -> ") == 4
    assert "identical to the server: True" in out


def test_benchmark(default_server) -> None:
    out = run_example(
        "benchmark.py", default_server.base_url, "--num-prompts", "2", "--input-len", "4", "--output-len", "2"
    )
    assert "2 ok, 0 failed" in out

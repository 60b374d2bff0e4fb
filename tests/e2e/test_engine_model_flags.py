"""End to end on tiny model folders: the engine flags that replace what the folder says, `--chat-template`
(a file or inline) and `--generation-config` (sampling defaults from generation_config.json)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jinja2
import pytest
from tokenizers import Tokenizer

from tests.engine.conftest import CHAT_TEMPLATE, TINY_SHAPE, build_tiny_hf_model, write_tokenizer_files
from tests.server_process import REPO, ServerProcess, free_port, serve

# Both differ from the folder's own template (CHAT_TEMPLATE), so a render tells which one was used.
FILE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)
INLINE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] | upper }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GENERATION_CONFIG = {"eos_token_id": [2, 4], "do_sample": True, "temperature": 0.0, "max_new_tokens": 5}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
PROMPT = "Paged attention reads keys"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`templated`: a tiny Llama folder with its own chat template; `bare`: the same without one. Both
    have a generation_config.json asking for greedy decoding and 5 new tokens."""
    templated = tmp_path_factory.mktemp("tiny-templated")
    build_tiny_hf_model("llama").save_pretrained(templated)
    write_tokenizer_files(templated)
    (templated / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    bare = tmp_path_factory.mktemp("tiny-bare")
    shutil.copytree(templated, bare, dirs_exist_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    assert config.pop("chat_template") == CHAT_TEMPLATE
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    template_file = bare.parent / "file_template.jinja"
    template_file.write_text(FILE_TEMPLATE)
    return {"templated": templated, "bare": bare, "template_file": template_file}


@pytest.fixture(scope="module")
def file_server(folders: dict[str, Path]) -> Iterator[ServerProcess]:
    """The folder without a template, `--chat-template FILE`, the generation config read (`auto`)."""
    server = serve([str(folders["bare"]), "--chat-template", str(folders["template_file"])])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def inline_server(folders: dict[str, Path]) -> Iterator[ServerProcess]:
    """The folder with a template, replaced by an inline `--chat-template`; `--generation-config vllm`;
    `--max-logprobs -1` (requests may ask for the whole vocabulary; smaller requests are unchanged)."""
    server = serve(
        [
            str(folders["templated"]),
            "--chat-template",
            INLINE_TEMPLATE,
            "--generation-config",
            "vllm",
            "--max-logprobs",
            "-1",
        ]
    )
    yield server
    server.stop()


def _post(server: ServerProcess, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _expected_ids(folder: Path, template: str) -> list[int]:
    # Rendered as transformers does (trim_blocks, lstrip_blocks), tokenized without added specials.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(
        messages=CHAT, add_generation_prompt=True, bos_token="<s>", eos_token="<|im_end|>"
    )
    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(
    ("server_name", "template"), [("file_server", FILE_TEMPLATE), ("inline_server", INLINE_TEMPLATE)]
)
def test_chats_render_with_the_given_template(
    server_name: str, template: str, folders: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    server: ServerProcess = request.getfixturevalue(server_name)
    expected = _expected_ids(folders["bare"], template)
    assert expected != _expected_ids(folders["bare"], CHAT_TEMPLATE)
    assert _post(server, "/tokenize", {"messages": CHAT})["tokens"] == expected
    chat = _post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
    assert chat["usage"]["prompt_tokens"] == len(expected)
    assert chat["choices"][0]["message"]["role"] == "assistant"


def test_generation_config_defaults_apply_to_requests_that_leave_them_unset(
    file_server: ServerProcess,
) -> None:
    first = _post(file_server, "/v1/completions", {"prompt": PROMPT, "ignore_eos": True})
    again = _post(file_server, "/v1/completions", {"prompt": PROMPT, "ignore_eos": True})
    greedy = _post(
        file_server,
        "/v1/completions",
        {"prompt": PROMPT, "ignore_eos": True, "temperature": 0, "max_tokens": 5},
    )
    assert first["usage"]["completion_tokens"] == 5 and first["choices"][0]["finish_reason"] == "length"
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == greedy["choices"][0]["text"]
    chat = _post(file_server, "/v1/chat/completions", {"messages": CHAT, "ignore_eos": True})
    assert chat["usage"]["completion_tokens"] == 5 and chat["choices"][0]["finish_reason"] == "length"
    batch = _post(
        file_server, "/v1/chat/completions/batch", {"messages": [CHAT, CHAT[1:]], "ignore_eos": True}
    )
    assert [c["finish_reason"] for c in batch["choices"]] == ["length", "length"]
    assert batch["usage"]["completion_tokens"] == 10
    # Tokens in, tokens out: the same defaults (greedy, 5 tokens).
    token_ids = _post(file_server, "/tokenize", {"prompt": PROMPT})["tokens"]
    generated = [
        _post(file_server, "/inference/v1/generate", {"token_ids": token_ids, "sampling_params": sp})
        for sp in ({"ignore_eos": True}, {"max_tokens": 5, "ignore_eos": True, "temperature": 0})
    ]
    assert generated[0]["choices"][0]["token_ids"] == generated[1]["choices"][0]["token_ids"]
    assert len(generated[0]["choices"][0]["token_ids"]) == 5


def test_a_request_value_wins_over_the_generation_config(file_server: ServerProcess) -> None:
    body = {"prompt": PROMPT, "ignore_eos": True}
    shorter = _post(file_server, "/v1/completions", {**body, "max_tokens": 3})
    assert shorter["usage"]["completion_tokens"] == 3
    # The file's max_new_tokens (5) caps longer requests, as vLLM applies it.
    longer = _post(file_server, "/v1/completions", {**body, "max_tokens": 8})
    assert longer["usage"]["completion_tokens"] == 5
    greedy = longer["choices"][0]["text"]
    sampled = [
        _post(file_server, "/v1/completions", {**body, "max_tokens": 8, "temperature": 1.0, "seed": seed})
        for seed in range(4)
    ]
    # A random tiny model's next-token distribution is nearly flat: sampling does not repeat greedy.
    assert any(s["choices"][0]["text"] != greedy for s in sampled)


def test_generation_config_vllm_ignores_the_file(inline_server: ServerProcess) -> None:
    body = {"prompt": PROMPT, "ignore_eos": True, "seed": 3}
    default = _post(inline_server, "/v1/completions", body)
    explicit = _post(inline_server, "/v1/completions", {**body, "temperature": 1.0, "max_tokens": 16})
    greedy = _post(inline_server, "/v1/completions", {**body, "temperature": 0.0, "max_tokens": 16})
    assert default["usage"]["completion_tokens"] == 16  # the completions default, not the file's 5
    assert default["choices"][0]["text"] == explicit["choices"][0]["text"] != greedy["choices"][0]["text"]


def test_minus_one_logprobs_cover_the_whole_vocabulary(inline_server: ServerProcess) -> None:
    """vLLM's `-1` ("all"), allowed by --max-logprobs -1: every token of the vocabulary, once each."""
    vocab_size = TINY_SHAPE["vocab_size"]
    chat = _post(
        inline_server,
        "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 2, "ignore_eos": True, "logprobs": True, "top_logprobs": -1},
    )
    for entry in chat["choices"][0]["logprobs"]["content"]:
        top = entry["top_logprobs"]
        assert len(top) == vocab_size
        assert math.isclose(sum(math.exp(t["logprob"]) for t in top), 1.0, abs_tol=1e-3)
        assert entry["logprob"] in [t["logprob"] for t in top]
    token_ids = _post(inline_server, "/tokenize", {"prompt": PROMPT})["tokens"]
    generated = _post(
        inline_server,
        "/inference/v1/generate",
        {"token_ids": token_ids, "sampling_params": {"max_tokens": 1, "prompt_logprobs": -1, "logprobs": -1}},
    )
    positions = generated["prompt_logprobs"]
    assert positions[0] is None and all(len(p) == vocab_size for p in positions[1:])
    (entry,) = generated["choices"][0]["logprobs"]["content"]
    assert len(entry["top_logprobs"]) == vocab_size
    # Past the vocabulary nothing more exists: a larger count is refused, as vLLM refuses it.
    too_many = httpx.post(
        f"{inline_server.base_url}/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 1, "logprobs": vocab_size + 1},
        timeout=60,
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "logprobs"


def test_generate_defaults_to_the_rest_of_the_context(inline_server: ServerProcess) -> None:
    """/inference/v1/generate without max_tokens generates until the context is full, as current vLLM
    (the model's max_position_embeddings is the context here; --generation-config vllm sets no cap)."""
    token_ids = _post(inline_server, "/tokenize", {"prompt": PROMPT})["tokens"]
    out = _post(
        inline_server,
        "/inference/v1/generate",
        {"token_ids": token_ids, "sampling_params": {"ignore_eos": True}},
    )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["token_ids"]) == TINY_SHAPE["max_position_embeddings"] - len(token_ids)


def test_bad_flags_stop_tandem_serve_at_start(folders: dict[str, Path]) -> None:
    """The engine refuses them before loading the model, and `tandem serve` exits non-zero with the reason."""
    cases = {
        "looks like a file path, but it cannot be read": ["--chat-template", "templates/missing.jinja"],
        "does not parse as Jinja": ["--chat-template", "{% for m in messages %}{{ m }}"],
        "names no folder with a generation_config.json": ["--generation-config", str(folders["bare"] / "x")],
    }
    # A long --shutdown-timeout: the API process still waiting for its first handshake must stop when the
    # launcher tells it to, not sit out the drain period (the communicate() bound below would then expire).
    serve = [sys.executable, "-m", "tandem", "serve", str(folders["bare"]), "--shutdown-timeout", "300"]
    procs = {
        message: subprocess.Popen(
            [*serve, "--port", str(free_port()), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        for message, flags in cases.items()
    }
    for message, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0, stderr
        assert "engine failed to start" in stderr and message in stderr, stderr

"""Project-wide fixtures: one real default-model server per test session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.server_process import ServerProcess, serve

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def default_server() -> Iterator[ServerProcess]:
    """`tandem serve` with the default model; shared by every end-to-end test that needs no special flags."""
    # --enable-prompt-embeds only adds an input kind; requests without embeddings behave the same.
    # The tool flags only change requests that send `tools` (tool_choice auto is parsed, not refused).
    # An explicit float32 (the default also keeps a float16 KV cache): the tests compare tokens with
    # transformers in float32 and rely on the exact greedy behaviour of the dequantized weights.
    server = serve(
        [
            "--dtype",
            "float32",
            "--max-waiting-requests",
            "512",
            "--enable-prompt-embeds",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            "--enable-tokenizer-info-endpoint",  # only adds GET /tokenizer_info
        ]
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hf_gguf_oracle() -> tuple[Any, Any]:
    """transformers' model and tokenizer from the default GGUF (float32), built once per session (~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.loader import resolve_model_path

    path = resolve_model_path(None)
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer

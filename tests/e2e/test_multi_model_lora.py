"""Issue 18 acceptance, LoRA through the API tier: `tandem serve` with two API processes in front of a tiny
Llama with --enable-lora and an adapter from --lora-modules (PEFT adapters with random weights, made
here). Requests naming an adapter get the merged model's greedy answer (transformers + peft as the
reference), base requests stay the base model's; an adapter loaded at run time through one API process
is served by every API process, and gone from all of them once unloaded.

Needs the engine side of LoRA (engine/lora/, the --enable-lora flags) from the lora-engine branch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from tests.e2e.test_multi_model import PROMPT, TINY_FLAGS, tiny_folder
from tests.engine.conftest import build_tiny_hf_model
from tests.server_process import ServerProcess, serve

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_TOKENS = 6


def make_adapter(folder: Path, seed: int, rank: int = 4) -> torch.nn.Module:
    """A PEFT adapter on the tiny Llama with random non-zero A and B (PEFT starts B at zero, which would
    make the adapter a no-op), saved to `folder`; returns the merged model as the reference."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_hf_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload().eval()


def greedy(model: torch.nn.Module, prompt_ids: list[int]) -> list[int]:
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(NUM_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def wait_for_adapters(url: str, predicate, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    """Until 8 /v1/models answers in a row (fresh connections: both API processes) satisfy `predicate`.
    The API process that was asked knows at once; the other learns it from the engine's broadcast,
    which may land a moment after the first one answered."""
    deadline = time.monotonic() + timeout_s
    num_ok = 0
    while num_ok < 8:
        ids = [c["id"] for c in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
        num_ok = num_ok + 1 if predicate(ids) else 0
        assert time.monotonic() < deadline, f"adapters never settled: {ids}"


@dataclass
class LoraServer:
    server: ServerProcess
    base: torch.nn.Module
    merged: dict[str, torch.nn.Module]
    folders: dict[str, Path]

    def complete(self, model: str) -> httpx.Response:
        body = {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": NUM_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        # A fresh connection per call, so both API processes get asked over a few calls.
        return httpx.post(f"{self.server.base_url}/v1/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraServer]:
    base_dir = tiny_folder(tmp_path_factory.mktemp("lora-base"))
    folders = {name: tmp_path_factory.mktemp(f"adapter-{name}") for name in ("sql", "chat")}
    merged = {name: make_adapter(folder, seed) for seed, (name, folder) in enumerate(folders.items())}
    flags = ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"sql={folders['sql']}"]
    server = serve(
        [str(base_dir), "--served-model-name", "tiny", "--api-server-count", "2", *flags, *TINY_FLAGS]
    )
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    try:
        yield LoraServer(server, base, merged, folders)
    finally:
        server.stop()


def test_adapter_requests_match_the_merged_model_and_base_requests_the_base(lora_server: LoraServer) -> None:
    cards = httpx.get(f"{lora_server.server.base_url}/v1/models").json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [("tiny", None), ("sql", "tiny")]
    assert cards[1]["root"] == str(lora_server.folders["sql"])
    adapted = lora_server.complete("sql").json()
    choice = adapted["choices"][0]
    assert adapted["model"] == "sql"
    assert choice["token_ids"] == greedy(lora_server.merged["sql"], choice["prompt_token_ids"])
    base = lora_server.complete("tiny").json()["choices"][0]
    assert base["token_ids"] == greedy(lora_server.base, base["prompt_token_ids"])
    assert base["token_ids"] != choice["token_ids"]


def test_runtime_load_reaches_every_api_process_and_unload_removes_it(lora_server: LoraServer) -> None:
    url = lora_server.server.base_url
    load = {"lora_name": "chat", "lora_path": str(lora_server.folders["chat"])}
    resp = httpx.post(f"{url}/v1/load_lora_adapter", json=load, timeout=120)
    assert (resp.status_code, resp.text) == (200, "Success: LoRA adapter 'chat' added successfully.")
    wait_for_adapters(url, lambda ids: "chat" in ids)
    for _ in range(6):  # fresh connections: both API processes answer some of these
        out = lora_server.complete("chat")
        assert out.status_code == 200, out.text
        choice = out.json()["choices"][0]
        assert choice["token_ids"] == greedy(lora_server.merged["chat"], choice["prompt_token_ids"])
    bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nowhere"})
    assert bad.status_code in (400, 404) and bad.json()["error"]["message"]
    resp = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "chat"}, timeout=120)
    assert (resp.status_code, resp.text) == (200, "Success: LoRA adapter 'chat' removed successfully.")
    wait_for_adapters(url, lambda ids: "chat" not in ids)
    for _ in range(6):
        gone = lora_server.complete("chat")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert lora_server.complete("sql").status_code == 200  # the start-up adapter is untouched

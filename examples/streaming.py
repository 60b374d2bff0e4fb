"""Stream a completion token by token (server-sent events) and time the first token.

python examples/streaming.py --base-url http://127.0.0.1:8000
"""

import argparse
import time

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    client = OpenAI(base_url=f"{args.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    start = time.perf_counter()
    first_token_at = None
    num_chunks = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:  # the last chunk: token counts, no choices
            print(f"\n[{chunk.usage.completion_tokens} tokens]")
            continue
        text = chunk.choices[0].delta.content or ""
        if text:
            first_token_at = first_token_at or time.perf_counter()
            num_chunks += 1
            print(text, end="", flush=True)
    print(
        f"{num_chunks} text chunks; first after {(first_token_at or start) - start:.2f} s, all after {time.perf_counter() - start:.2f} s"
    )


if __name__ == "__main__":
    main()

"""Several conversations in one request: POST /v1/chat/completions/batch (a Tandem extension).

`messages` is a list of conversations; `choices[i]` answers conversation i. They are scheduled together,
so this is cheaper than one request each.

    python examples/batch_chat.py --base-url http://127.0.0.1:8000
"""

import argparse

import httpx

QUESTIONS = ["What is 2 + 2?", "Name a color.", "Say hello in French."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    body = {
        "messages": [[{"role": "user", "content": q}] for q in QUESTIONS],
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    response = httpx.post(f"{args.base_url}/v1/chat/completions/batch", json=body, timeout=300)
    if response.status_code != 200:
        raise SystemExit(f"HTTP {response.status_code}: {response.text}")
    result = response.json()
    for choice in sorted(result["choices"], key=lambda c: c["index"]):
        print(
            f"{QUESTIONS[choice['index']]!r} -> {choice['message']['content']!r} ({choice['finish_reason']})"
        )
    print(f"usage: {result['usage']}")


if __name__ == "__main__":
    main()

"""Chat with a running Tandem (or any OpenAI-compatible) server through the openai SDK.

python examples/chat.py --base-url http://127.0.0.1:8000 "What is the capital of France?"
"""

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is the capital of France?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    client = OpenAI(base_url=f"{args.base_url}/v1", api_key="unused")  # the key matters only with --api-key
    model = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": args.question},
        ],
        max_tokens=args.max_tokens,
        temperature=0,
    )
    choice = response.choices[0]
    print(f"[{model}] {choice.message.content}")
    print(
        f"finish_reason={choice.finish_reason} usage={response.usage.prompt_tokens}+{response.usage.completion_tokens}"
    )


if __name__ == "__main__":
    main()

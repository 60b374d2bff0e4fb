"""Structured output: an answer that is guaranteed to be valid JSON for a given JSON schema.

python examples/json_schema.py --base-url http://127.0.0.1:8000
"""

import argparse
import json

from openai import OpenAI

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=f"{args.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Invent a person: their name, age and city, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
        max_tokens=args.max_tokens,
        temperature=0,
    )
    text = response.choices[0].message.content
    person = json.loads(text)  # guaranteed to parse when finish_reason is "stop"
    print(f"raw: {text}")
    print(f"parsed: name={person['name']!r} age={person['age']} city={person['city']!r}")


if __name__ == "__main__":
    main()

"""Tool calling: the model calls a function, we run it, and send the result back for the final answer.

`tool_choice="required"` makes the server constrain the output to a valid call (structured outputs), so
even a small model produces well-formed arguments. With `"auto"` (server flags
`--enable-auto-tool-choice --tool-call-parser hermes`) the model decides whether to call.

    python examples/tools.py --base-url http://127.0.0.1:8000
"""

import argparse
import json

from openai import OpenAI

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str, unit: str = "C") -> dict:
    return {"city": city, "temperature": 21 if unit == "C" else 70, "unit": unit, "sky": "clear"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=f"{args.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=args.max_tokens,
        temperature=0,
    )
    message = first.choices[0].message
    calls = message.tool_calls or []
    if not calls:
        raise SystemExit(f"no tool call in the answer: {message}")
    # content "" rather than None: templates written for string content (SmolLM2's) cannot join a None.
    assistant = {
        "role": "assistant",
        "content": message.content or "",
        "tool_calls": [c.model_dump() for c in calls],
    }
    messages.append(assistant)
    for call in calls:
        arguments = json.loads(call.function.arguments)
        print(f"tool call: {call.function.name}({arguments})")
        result = get_weather(**arguments)
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0
    )
    print(f"answer: {final.choices[0].message.content}")


if __name__ == "__main__":
    main()

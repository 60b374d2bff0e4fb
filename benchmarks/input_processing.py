"""Per-request input cost in the API process: decode + checks + wire sampling params of one chat body,
on whichever tree PYTHONPATH names (before issue 15's input processor or after). Prints microseconds.

    for r in 1 2 3 4 5 6 7 8; do
      PYTHONPATH=/work/main .venv/bin/python benchmarks/input_processing.py
      PYTHONPATH=$PWD .venv/bin/python benchmarks/input_processing.py
    done
"""

import json
import time

from frontend.sampling_params import build_sampling_params
from frontend.schemas import decode_chat_request

try:
    from frontend.schemas.to_sampling import from_openai
except ImportError:  # the tree before the input processor: build_sampling_params took the body
    from_openai = None

BODY = {
    "model": "m",
    "messages": [{"role": "user", "content": "hello there"}],
    "temperature": 0.7,
    "top_p": 0.9,
    "max_tokens": 64,
    "stop": ["\n\n"],
    "seed": 1,
    "logit_bias": {"5": 1.0},
    "logprobs": True,
    "top_logprobs": 2,
}
ENCODED = json.dumps(BODY).encode()
N = 20000


def one() -> object:
    req = decode_chat_request(ENCODED)
    settings = from_openai(req) if from_openai is not None else req
    return build_sampling_params(
        settings, num_prompt_tokens=20, max_model_len=2048, vocab_size=49152, eos_token_ids=[2]
    )


def main() -> None:
    for _ in range(2000):
        one()
    start = time.perf_counter()
    for _ in range(N):
        one()
    print(f"{(time.perf_counter() - start) / N * 1e6:.2f}")


if __name__ == "__main__":
    main()

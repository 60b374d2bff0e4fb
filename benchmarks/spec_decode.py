"""n-gram speculative decoding against plain decoding: one process, the default model, greedy, single
stream, alternating rounds. Prompts whose answers repeat spans of the input (summaries, quotes, code
edits), where prompt lookup finds drafts.

Both modes share one loaded model: a round flips the scheduler's speculative config on or off, so the
weights, the KV cache and the thread pool are the same. Prints tok/s for each mode per round, the
speed-up, the acceptance rate (accepted / proposed drafts), mean tokens per step while speculating,
whether the outputs matched token for token, and the proposer's cost per call.

    .venv/bin/python benchmarks/spec_decode.py --dtype float16
    .venv/bin/python benchmarks/spec_decode.py --k 3 --lookup-max 3 --rounds 5 --max-tokens 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import cast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CODE = """def load(path):
    with open(path) as f:
        return [line.strip() for line in f]


def count_words(lines):
    total = 0
    for line in lines:
        total += len(line.split())
    return total


def main():
    lines = load("input.txt")
    print(count_words(lines))
"""
ARTICLE = (
    "The city council met on Tuesday evening to discuss the new public library. The library will be "
    "built next to the central park and will open in the spring of next year. It will have a reading "
    "room for children, a computer lab and a small cafe. The council approved a budget of four million "
    "dollars for the building. Some members asked for longer opening hours on weekends, and the mayor "
    "promised that the library would stay open until nine in the evening on Saturdays."
)
PROMPTS = [
    f"Rename the function count_words to word_count everywhere and show the full code:\n\n{CODE}",
    f"Add a docstring to every function and show the full code:\n\n{CODE}",
    f"Summarize this article in three sentences:\n\n{ARTICLE}",
    f"Quote the sentence of this article about the budget, then the one about weekends:\n\n{ARTICLE}",
    f"Rewrite this article as a bulleted list of facts:\n\n{ARTICLE}",
    f"Fix the style of this code (PEP 8) and show it:\n\n{CODE}",
]


def main() -> None:
    from engine.cpu_threads import configure_openmp

    configure_openmp()  # as the engine does, before torch loads
    from engine.spec.config import SpeculativeConfig
    from engine.spec.ngram import propose_ngram
    from engine.stepper import EngineStepper
    from tandem import LLM, SamplingParams

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--lookup-max", type=int, default=3)
    p.add_argument("--lookup-min", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-threads", type=int, default=None)
    args = p.parse_args()

    llm = LLM(dtype=args.dtype, num_threads=args.num_threads, kv_cache_memory="512M")
    stepper = cast(EngineStepper, llm.stepper)
    scheduler = stepper.scheduler
    spec = SpeculativeConfig(args.k, args.lookup_max, args.lookup_min)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    conversations = [[{"role": "user", "content": text}] for text in PROMPTS]
    llm.chat(conversations[0], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up

    def run(speculate: bool) -> tuple[float, int, int, int, int, list[list[int]]]:
        """One pass over the prompts, one at a time: seconds, tokens, steps, drafts, accepted, outputs."""
        scheduler.speculative = spec if speculate else None
        steps0, drafts0, accepted0 = (
            stepper.step_count,
            scheduler.num_draft_tokens,
            scheduler.num_accepted_tokens,
        )
        seconds, tokens, outputs = 0.0, 0, []
        for conversation in conversations:
            start = time.perf_counter()
            (out,) = llm.chat(conversation, params, use_tqdm=False)
            seconds += time.perf_counter() - start
            ids = list(out.outputs[0].token_ids)
            tokens += len(ids)
            outputs.append(ids)
        steps = stepper.step_count - steps0
        return (
            seconds,
            tokens,
            steps,
            scheduler.num_draft_tokens - drafts0,
            scheduler.num_accepted_tokens - accepted0,
            outputs,
        )

    print(
        f"dtype {args.dtype}, {len(PROMPTS)} prompts one at a time, max_tokens {args.max_tokens}, "
        f"ngram K={args.k} lookup {args.lookup_min}..{args.lookup_max}, load {os.getloadavg()[0]:.2f}"
    )
    ratios, rates, per_step, same = [], [], [], []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        results = {mode: run(mode) for mode in order}
        base, fast = results[False], results[True]
        base_tps, fast_tps = base[1] / base[0], fast[1] / fast[0]
        ratios.append(fast_tps / base_tps)
        rates.append(fast[4] / max(fast[3], 1))
        # Steps include each prompt's prefill step, which yields one token either way.
        per_step.append(fast[1] / max(fast[2], 1))
        same.append(sum(a == b for a, b in zip(base[5], fast[5], strict=True)))
        print(
            f"round {r + 1}: plain {base_tps:6.1f} tok/s ({base[2]} steps), speculative {fast_tps:6.1f} tok/s "
            f"({fast[2]} steps), x{ratios[-1]:.2f}; accepted {fast[4]}/{fast[3]} = {rates[-1]:.2f}; "
            f"{per_step[-1]:.2f} tokens/step; identical outputs {same[-1]}/{len(PROMPTS)}"
        )
    print(
        f"median: speed-up x{statistics.median(ratios):.2f}, acceptance {statistics.median(rates):.2f}, "
        f"{statistics.median(per_step):.2f} tokens/step, identical outputs {min(same)}/{len(PROMPTS)}"
    )
    # The proposer alone, on the last outputs' full sequences (prompt + answer).
    sequences = [llm.ctx.encode(text, add_special_tokens=False) for text in PROMPTS]
    calls, start = 0, time.perf_counter()
    for prompt, output in zip(sequences, results[True][5], strict=True):
        for n in range(len(output)):
            propose_ngram(prompt, output[:n], args.k, args.lookup_min, args.lookup_max)
            calls += 1
    print(f"proposer: {(time.perf_counter() - start) / calls * 1e6:.0f} us per call ({calls} calls)")


if __name__ == "__main__":
    main()

"""n-gram (prompt lookup) proposer: drafts copied from what followed an earlier occurrence of the last
few tokens. A pure function of the token ids; numpy, no torch. On the project's CPU a call costs ~15-30 us
over a few hundred tokens (benchmarks/spec_decode.py prints it) and ~0.1 ms over the full window."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Tokens searched (the most recent ones): the cost of a call grows with it, and matches further back
# in a long context rarely predict the next few tokens better than recent ones.
LOOKUP_WINDOW = 4096


def propose_ngram(
    prompt: Sequence[int],
    output: Sequence[int],
    num_tokens: int,
    min_n: int,
    max_n: int,
    window: int = LOOKUP_WINDOW,
) -> list[int]:
    """Up to num_tokens drafts for the sequence prompt + output: the tokens that followed the most recent
    earlier occurrence of its last n tokens, for the largest n in [min_n, max_n] that occurs; [] if none."""
    if num_tokens <= 0:
        return []
    tail_of_prompt = max(window - len(output), 0)
    tokens = list(prompt[-tail_of_prompt:]) if tail_of_prompt else []
    tokens += output[-window:]
    length = len(tokens)
    if length < min_n + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    # mask[j]: arr[j - m] == arr[length - 1 - m] for every m < n, i.e. an n-gram ending at j (j < the
    # last position) equals the sequence's last n tokens. Grows n one token at a time.
    mask = arr[: length - 1] == arr[length - 1]
    best_end = -1
    for n in range(1, min(max_n, length - 1) + 1):
        if n > 1:
            m = n - 1
            mask[m - 1] = False  # an n-gram cannot end before position n - 1
            mask[m:] &= arr[: length - 1 - m] == arr[length - 1 - m]
        if not mask.any():
            break
        if n >= min_n:
            best_end = int(np.flatnonzero(mask)[-1])  # the most recent match of the longest n so far
    if best_end < 0:
        return []
    return arr[best_end + 1 : best_end + 1 + num_tokens].tolist()

"""Benchmark prompts: random ones of a given token length, a JSONL prompt file, or shared-prefix groups.

Prompts are built from common English words. Each word is tokenized once (with its leading space), so
a prompt's token count is the sum of its words' counts: exact for byte-level BPE and SentencePiece
tokenizers, whose merges never cross a space. Token counts come from a local tokenizer (`--tokenizer`),
else the server's `/tokenize`, else an approximation of one token per word; `counter.method` says which.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

_WORD_TEXT = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal point "
    "mother world near build self earth father head stand own page should country found answer school grow "
    "study still learn plant cover food sun four between state keep eye never last let thought city tree"
)
WORDS = tuple(_WORD_TEXT.split())


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int  # tokens, as planned or estimated; the server's reported usage replaces it
    output_len: int


@dataclass
class TokenCounter:
    """Token count of each word in `WORDS` (with its leading space), and how they were measured."""

    method: str  # "tokenizer", "server" or "words"
    word_lens: dict[str, int]
    count_text: Callable[[str], int]

    def single_token_words(self) -> list[str]:
        return [w for w, n in self.word_lens.items() if n == 1]


def local_counter(path: str) -> TokenCounter:
    """Counts with a `tokenizers` tokenizer.json (or a folder holding one)."""
    from tokenizers import Tokenizer

    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(file))

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return TokenCounter("tokenizer", {w: count(" " + w) for w in WORDS}, count)


def _tokens_in(body: object) -> int | None:
    if isinstance(body, dict):
        if isinstance(body.get("count"), int):
            return body["count"]
        if isinstance(body.get("tokens"), list):
            return len(body["tokens"])
    return None


async def server_counter(client: httpx.AsyncClient, base_url: str, model: str) -> TokenCounter | None:
    """Counts with the server's `/tokenize` (vLLM's and llama.cpp's request shapes); None without one."""
    url = base_url.rstrip("/") + "/tokenize"

    async def count_async(text: str) -> int | None:
        body = {"model": model, "prompt": text, "content": text, "add_special_tokens": False}
        try:
            resp = await client.post(url, json=body, timeout=10.0)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        try:
            return _tokens_in(resp.json())
        except ValueError:
            return None

    if await count_async(" the") is None:
        return None
    import asyncio

    counts = await asyncio.gather(*(count_async(" " + w) for w in WORDS))
    known = [n for n in counts if n is not None]
    if len(known) != len(counts):
        return None
    return TokenCounter("server", dict(zip(WORDS, known, strict=True)), _word_count)


def _word_count(text: str) -> int:
    return len(text.split())


def word_counter() -> TokenCounter:
    return TokenCounter("words", dict.fromkeys(WORDS, 1), _word_count)


def random_text(rng: random.Random, counter: TokenCounter, num_tokens: int) -> str:
    """Random words adding up to exactly `num_tokens` tokens (each word keeps its leading space)."""
    singles = counter.single_token_words()
    if len(singles) >= 20:  # the common case: plenty of one-token words, so any length is reachable
        return "".join(" " + rng.choice(singles) for _ in range(num_tokens))
    words, total = [], 0
    pool = list(counter.word_lens)
    while total < num_tokens:
        fits = [w for w in pool if counter.word_lens[w] <= num_tokens - total] or pool
        word = rng.choice(fits)
        words.append(word)
        total += counter.word_lens[word]
    return "".join(" " + w for w in words)


def random_requests(
    rng: random.Random, counter: TokenCounter, num_prompts: int, input_len: int, output_len: int
) -> list[SampleRequest]:
    return [
        SampleRequest(random_text(rng, counter, input_len), input_len, output_len) for _ in range(num_prompts)
    ]


def shared_prefix_requests(
    rng: random.Random,
    counter: TokenCounter,
    num_prompts: int,
    *,
    num_prefixes: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
) -> list[SampleRequest]:
    """`num_prefixes` shared prefixes of `prefix_len` tokens, each prompt one of them plus its own suffix."""
    prefixes = [random_text(rng, counter, prefix_len) for _ in range(max(num_prefixes, 1))]
    out = []
    for i in range(num_prompts):
        text = prefixes[i % len(prefixes)] + random_text(rng, counter, suffix_len)
        out.append(SampleRequest(text, prefix_len + suffix_len, output_len))
    rng.shuffle(out)
    return out


def jsonl_requests(
    path: str, counter: TokenCounter, num_prompts: int | None, default_output_len: int
) -> list[SampleRequest]:
    """One request per line: a JSON string, or an object with `prompt` (or `text`) and optional `output_len`
    (or `max_tokens`). Lines are reused in order when `num_prompts` exceeds the file."""
    samples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
        if isinstance(item, str):
            item = {"prompt": item}
        prompt = item.get("prompt", item.get("text")) if isinstance(item, dict) else None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{number}: expected a string or an object with a 'prompt' string")
        output_len = item.get("output_len", item.get("max_tokens", default_output_len))
        samples.append(SampleRequest(prompt, counter.count_text(prompt), int(output_len)))
    if not samples:
        raise ValueError(f"{path}: no prompts")
    if num_prompts is None:
        return samples
    return [samples[i % len(samples)] for i in range(num_prompts)]

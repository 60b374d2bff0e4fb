"""Structured outputs in the engine: grammars compiled off the loop (cached by spec) and per-step token masks.

The grammar library is llguidance (see docs/structured-outputs-and-tools.md for why). A spec is compiled
into a pristine `LLMatcher` on a small thread pool; each request gets a cheap deep copy once it is ready,
so a slow compile only keeps its own request waiting while the batch runs on.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.numpy as llg_numpy
import msgspec
import numpy as np

from contract.grammar import GrammarError, grammar_for_spec
from engine.request import Request
from engine.sampler import TokenBitmask
from protocol.messages import StructuredSpec

logger = logging.getLogger(__name__)

_spec_encoder = msgspec.msgpack.Encoder()


def _short_reason(matcher: llguidance.LLMatcher) -> str:
    """llguidance's error without the parser state dump that can follow it (for the log, not clients)."""
    message = matcher.get_error() or "grammar error"
    logger.debug("llguidance error: %s", message)
    return " ".join(message.split("<state>", 1)[0].split())[:500]


class GrammarCompiler:
    """Compiles specs to pristine matchers on worker threads; keeps the last `cache_size` results by spec."""

    def __init__(
        self,
        tokenizer_json: str,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        *,
        max_workers: int = 2,
        cache_size: int = 256,
    ) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar")
        self._cache: OrderedDict[bytes, Future[llguidance.LLMatcher]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (~1 s for a 50k vocabulary), on a worker thread, never on the engine loop.
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json, n_vocab=self._vocab_size, eos_token=self._eos_token_ids
                )
            return self._tokenizer

    def submit(self, spec: StructuredSpec) -> Future[llguidance.LLMatcher]:
        key = _spec_encoder.encode(spec)
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        future = self._pool.submit(self._compile, spec)
        self._cache[key] = future
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return future

    def _compile(self, spec: StructuredSpec) -> llguidance.LLMatcher:
        grammar = grammar_for_spec(spec)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_short_reason(matcher))
        return matcher

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RequestGrammar:
    """One request's grammar: the pending compile, then its own matcher."""

    def __init__(self, future: Future[llguidance.LLMatcher]) -> None:
        self.future = future
        self.matcher: llguidance.LLMatcher | None = None

    @property
    def is_ready(self) -> bool:
        return self.matcher is not None


class StructuredOutputs:
    """Engine-side structured outputs: attach grammars, compute token bitmasks for a step, advance matchers."""

    def __init__(self, compiler: GrammarCompiler, vocab_size: int) -> None:
        self.compiler = compiler
        self.vocab_size = vocab_size
        self.compiling: dict[str, Request] = {}
        self._executor = llguidance.LLExecutor()
        self._num_words = (vocab_size + 31) // 32

    @classmethod
    def create(cls, tokenizer_json: str, vocab_size: int, eos_token_ids: Iterable[int]) -> StructuredOutputs:
        return cls(GrammarCompiler(tokenizer_json, vocab_size, eos_token_ids), vocab_size)

    def attach(self, request: Request) -> None:
        spec = request.sampling.structured
        if spec is None:
            return
        request.grammar = RequestGrammar(self.compiler.submit(spec))
        self.compiling[request.request_id] = request

    def forget(self, request_id: str) -> None:
        self.compiling.pop(request_id, None)

    def poll(self) -> list[tuple[Request, str]]:
        """Hands finished compiles to their requests; returns (request, error) for compiles that failed."""
        failed = []
        for request_id, request in list(self.compiling.items()):
            grammar = request.grammar
            if grammar is None or not grammar.future.done():
                continue
            del self.compiling[request_id]
            exc = grammar.future.exception()
            if exc is not None:
                failed.append(
                    (request, f"Invalid structured output constraint: {_public_reason(exc, request_id)}")
                )
            else:
                grammar.matcher = grammar.future.result().deep_copy()
        return failed

    def bitmask(self, rows: list[Request]) -> TokenBitmask | None:
        """Allowed tokens of the constrained requests among `rows` (those that sample this step), as bits;
        None when none is constrained. The sampler expands the bits on the model's device."""
        matchers = [(r, r.grammar.matcher) for r in rows if r.grammar is not None]
        constrained = [(r, m) for r, m in matchers if m is not None]
        if not constrained:
            return None
        words = np.full((len(constrained), self._num_words), -1, dtype=np.int32)  # [B, V/32]
        pairs = [(m, i) for i, (_, m) in enumerate(constrained)]
        llg_numpy.fill_next_token_bitmask_par(self._executor, pairs, words)
        return TokenBitmask([r.request_id for r, _ in constrained], words)

    def advance(self, rows: list[Request], sampled: dict[str, int]) -> dict[str, str]:
        """Feeds each constrained request its new token; returns request_id -> error for rejected tokens."""
        pairs = []
        owners = []
        for request in rows:
            token_id = sampled.get(request.request_id)
            if token_id is None or request.grammar is None or request.grammar.matcher is None:
                continue
            pairs.append((request.grammar.matcher, token_id))
            owners.append(request)
        if not pairs:
            return {}
        results = self._executor.consume_token_par(pairs)
        return {
            request.request_id: f"structured output rejected a token: {_short_reason(matcher)}"
            for request, ok, (matcher, _) in zip(owners, results, pairs, strict=True)
            if not ok
        }


def _public_reason(exc: BaseException, request_id: str) -> str:
    """llguidance's own reason for a GrammarError; anything else (a bug, memory) may carry internal names
    or paths, so the client gets a plain sentence and the detail goes to the engine log."""
    if isinstance(exc, GrammarError):
        return str(exc)
    logger.error("grammar compile failed for request %s", request_id, exc_info=exc)
    return f"the constraint could not be compiled (request {request_id}; details are in the engine log)"

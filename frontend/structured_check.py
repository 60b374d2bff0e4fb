"""Checks a structured-output spec in the API process: a bad schema, regex or grammar is a 400 carrying
llguidance's own message, before anything reaches an engine. No torch is needed.

llguidance reports most resource limits (items in a grammar row, lexer fuel for huge repetitions) only
when tokens are matched, which in the engine is mid-generation, after seconds of work, as a 500. So
specs are also capped by size up front and dry-run for a few tokens against the model's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict

import llguidance

from contract.grammar import GrammarError, grammar_for_spec, grammar_from_text, spec_kind_and_text
from frontend.errors import invalid_request
from protocol.messages import StructuredSpec

# Size caps checked before compiling: past these llguidance either fails mid-generation or takes seconds.
MAX_CHOICES = 5_000
MAX_CHOICE_CHARS = 1_000
MAX_REPEAT = 10_000  # a counted repetition such as a{n} or a{m,n} (also minLength/maxLength in schemas)
MAX_PROPERTY_NAME_CHARS = 1_000
DRY_RUN_STEPS = 4  # tokens matched by the dry run: enough to reach the limits that show on the first ones

_COUNTED_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_LENGTH_KEYS = (
    '"minLength"',
    '"maxLength"',
    '"minItems"',
    '"maxItems"',
    '"minProperties"',
    '"maxProperties"',
)
_LENGTH_VALUE = re.compile(r'"(?:min|max)(?:Length|Items|Properties)"\s*:\s*(\d+)')
# Parser internals (state dumps, statistics) follow the first line of llguidance's messages.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
_MARKUP = re.compile(r"<[a-z-]+/>")  # e.g. the "<non-verbose/>" that ends a limit's message


def _size_error(kind: str, text: str, choice: list[str] | None) -> str | None:
    """Why a spec is too large to serve, from its text alone (microseconds), or None."""
    if choice is not None:
        if len(choice) > MAX_CHOICES:
            return f"`choice` has {len(choice)} entries; at most {MAX_CHOICES} are supported."
        longest = max((len(c) for c in choice), default=0)
        if longest > MAX_CHOICE_CHARS:
            return f"a `choice` entry has {longest} characters; at most {MAX_CHOICE_CHARS} are supported."
    for match in _COUNTED_REPEAT.finditer(text):
        counts = [int(g) for g in match.groups() if g]
        if max(counts) > MAX_REPEAT:
            return f"a counted repetition of {max(counts)} is over the limit of {MAX_REPEAT}."
    if kind == "json" and any(key in text for key in _LENGTH_KEYS):
        for match in _LENGTH_VALUE.finditer(text):
            if int(match.group(1)) > MAX_REPEAT:
                return f"a length bound of {match.group(1)} is over the limit of {MAX_REPEAT}."
    if kind == "json":
        return _property_name_error(text)
    return None


def _property_name_error(schema_text: str) -> str | None:
    try:
        schema = json.loads(schema_text)
    except ValueError:
        return None  # the compile reports it
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in (node.get("properties") or {}) if isinstance(node.get("properties"), dict) else {}:
                if len(key) > MAX_PROPERTY_NAME_CHARS:
                    return f"a property name has {len(key)} characters; at most {MAX_PROPERTY_NAME_CHARS}."
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _grammar_error(kind: str, text: str) -> str | None:
    """llguidance's message for an unusable spec, or None. Cached by a digest of the spec (clients repeat
    the same schemas), so a cache of multi-megabyte specs cannot hold on to their text."""
    key = (kind, _digest(text))
    with _cache_lock:
        if key in _compile_cache:
            _compile_cache.move_to_end(key)
            return _compile_cache[key]
    error = _compile_error(kind, text)
    error = error[:2000] if error else None  # the message can quote the spec: keep the cache small
    with _cache_lock:
        _compile_cache[key] = error
        if len(_compile_cache) > 512:
            _compile_cache.popitem(last=False)
    return error


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


_compile_cache: OrderedDict[tuple[str, str], str | None] = OrderedDict()
_cache_lock = threading.Lock()  # request preparation runs on worker threads


def _compile_error(kind: str, text: str) -> str | None:
    try:
        grammar = grammar_from_text(kind, text)  # the grammar the engine will build (contract/grammar.py)
    except GrammarError as exc:
        return str(exc)
    error = llguidance.LLMatcher.validate_grammar(grammar, limits=_LIMITS)
    return error or None


class GrammarDryRun:
    """Matches a few tokens of each new spec against the model's tokenizer, where llguidance's resource
    limits show; results are cached by spec. The tokenizer is built on first use (~1 s, off the loop)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256):
        self._args = (tokenizer_json, vocab_size, sorted(eos_token_ids))
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, str | None] = OrderedDict()
        self._cache_size = cache_size

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                tokenizer_json, vocab_size, eos = self._args
                self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
            return self._tokenizer

    def error(self, spec: StructuredSpec) -> str | None:
        key = _digest(json.dumps([spec.json_schema, spec.regex, spec.choice, spec.grammar]))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        error = self._run(spec)
        with self._lock:
            self._cache[key] = error
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return error

    def _run(self, spec: StructuredSpec) -> str | None:
        import llguidance.numpy as llg_numpy
        import numpy as np

        tokenizer = self._llg_tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, grammar_for_spec(spec), log_level=0, limits=_LIMITS)
        eos = set(self._args[2])
        mask = llg_numpy.allocate_token_bitmask(1, self._args[1])
        for _ in range(DRY_RUN_STEPS):
            if matcher.is_error() or matcher.is_stopped():
                break
            llg_numpy.fill_next_token_bitmask(matcher, mask, 0)
            allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little"))
            tokens = [int(t) for t in allowed if int(t) not in eos]
            if matcher.is_error() or not tokens:
                break
            # The longest-id token: usually a long piece, so the walk covers more of the grammar.
            if not matcher.consume_token(tokens[-1]):
                break
        if matcher.is_error():
            return matcher.get_error()
        return None


def check_structured_spec(spec: StructuredSpec, param: str, dry_run: GrammarDryRun | None = None) -> None:
    """Raises a 400 APIError when the spec is too large, llguidance rejects it, or (with `dry_run`)
    matching its first tokens hits one of llguidance's limits."""
    kind_text = spec_kind_and_text(spec)
    if kind_text is None:
        return  # any JSON object: always valid
    error = _size_error(*kind_text, spec.choice) or _grammar_error(*kind_text)
    if error is None and dry_run is not None:
        error = dry_run.error(spec)
    if error is not None:
        raise invalid_request(f"Invalid structured output constraint: {_public_reason(error)}", param)


def _public_reason(message: str) -> str:
    """llguidance's reason on one line, without the parser state dump that can follow it."""
    reason = " ".join(_MARKUP.sub("", message.split("<state>", 1)[0]).split())
    return reason[:500] or "rejected by the grammar compiler"

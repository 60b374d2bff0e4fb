"""The JSON nesting bound of frontend.request_body, against a plain recursive depth count."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.request_body import MAX_JSON_DEPTH, json_depth_exceeds

_leaves = st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from('[]{}"\\ab\x00é'))
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=40,
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def _wrap(value: Any, levels: int) -> Any:
    for level in range(levels):
        value = [value] if level % 2 else {"k[{": value}
    return value


@settings(deadline=None)  # the first call imports numpy
@given(_values, st.integers(min_value=0, max_value=2 * MAX_JSON_DEPTH))
def test_agrees_with_the_recursive_depth(value: Any, levels: int) -> None:
    wrapped = _wrap(value, levels)
    body = json.dumps(wrapped, ensure_ascii=False).encode()
    assert json_depth_exceeds(body) == (_depth(wrapped) > MAX_JSON_DEPTH)
    assert json_depth_exceeds(body, max_depth=3) == (_depth(wrapped) > 3)


def test_brackets_in_strings_and_escapes_do_not_count() -> None:
    text = '\\"[' * 1000 + "\\\\" + "{" * 1000
    assert not json_depth_exceeds(json.dumps({"prompt": text}).encode())
    assert json_depth_exceeds(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert not json_depth_exceeds(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)

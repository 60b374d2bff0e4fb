"""Stop strings: hold-back of partial matches, and the same result however the text is split."""

from __future__ import annotations

import random

import pytest

from frontend.serving.stop_strings import StopStringMatcher


def run(stop: list[str], deltas: list[str], include: bool = False) -> tuple[list[str], str | None]:
    """Feed the deltas; return what was emitted after each one (flush appended) and the stop matched."""
    matcher = StopStringMatcher(stop, include_stop_str_in_output=include)
    emitted = []
    for delta in deltas:
        text, matched = matcher.feed(delta)
        emitted.append(text)
        if matched is not None:
            return emitted, matched
    emitted.append(matcher.flush())
    return emitted, None


def test_no_stop_strings_pass_text_through() -> None:
    assert run([], ["ab", "cd"]) == (["ab", "cd", ""], None)


def test_partial_match_is_held_then_released() -> None:
    emitted, matched = run(["STOP"], ["hello ST", "OX", " more"])
    assert emitted == ["hello ", "STOX", " more", ""] and matched is None


def test_match_across_deltas_never_leaks_a_part_of_the_stop() -> None:
    emitted, matched = run(["</end>"], ["result: 42<", "/e", "nd> trailing"])
    assert emitted == ["result: 42", "", ""] and matched == "</end>"
    emitted, matched = run(["</end>"], ["result: 42<", "/e", "nd> trailing"], include=True)
    assert "".join(emitted) == "result: 42</end>" and matched == "</end>"


def test_held_text_comes_out_at_flush() -> None:
    assert run(["abc"], ["xxab"]) == (["xx", "ab"], None)


def test_feed_after_a_match_emits_nothing() -> None:
    matcher = StopStringMatcher(["."])
    assert matcher.feed("one. two") == ("one", ".")
    assert matcher.feed("three") == ("", None)
    assert matcher.flush() == "" and matcher.stop_str == "."


def test_earliest_completed_stop_wins() -> None:
    # "bc" completes before "abcd" does, even though "abcd" starts earlier.
    assert "".join(run(["abcd", "bc"], ["xabcde"])[0]) == "xa"
    # Same end: the longer (earlier-starting) one wins.
    assert run(["bc", "abc"], ["xabc"]) == (["x"], "abc")


def one_shot(stop: list[str], text: str, include: bool) -> tuple[str, str | None]:
    emitted, matched = run(stop, [text], include)
    return "".join(emitted), matched


@pytest.mark.parametrize("include", [False, True])
def test_any_split_gives_the_one_shot_result(include: bool) -> None:
    seed = 1234 + include
    rng = random.Random(seed)
    alphabet = "ab🎉\n"
    for trial in range(400):
        stop = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        expected = one_shot(stop, text, include)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, matched = run(stop, deltas, include)
        assert ("".join(emitted), matched) == expected, (
            f"seed={seed} trial={trial} stop={stop!r} deltas={deltas!r}"
        )
        # The one-shot result is the plain definition: cut at the earliest-ending occurrence.
        ends = [(text.find(s) + len(s), text.find(s), s) for s in stop if s in text]
        if ends:
            end, start, s = min(ends)
            assert expected == (text[:end] if include else text[:start], s)
        else:
            assert expected == (text, None)

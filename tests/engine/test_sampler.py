"""Sampler semantics on hand-made logits: processor order, cuts, seeds, raw logprobs, prompt logprobs."""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.readback import DeviceReadback
from engine.request import Request
from engine.sampler import Sampler, TokenBitmask
from engine.scheduler import add_prompt_logprobs as add_prompt_logprob_chunk
from engine.step_output import PromptLogprobChunk
from protocol.messages import SamplingParams

VOCAB = 16
EOS = 2


def make_request(
    request_id: str = "r",
    *,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    **sampling: object,
) -> Request:
    params = SamplingParams(max_tokens=8, **sampling)  # type: ignore[arg-type]
    request = Request(
        request_id,
        b"client",
        prompt if prompt is not None else [5, 6, 7],
        params,
        arrival_time=0.0,
        eos_token_ids=frozenset({EOS}),
    )
    request.output_token_ids = list(output or [])
    return request


def new_sampler() -> Sampler:
    return Sampler(VOCAB, torch.device("cpu"))


def add_prompt_logprobs(sampler: Sampler, request: Request, logits: torch.Tensor, start: int) -> None:
    """One step's worth: queue, read back, file on the request (as the scheduler does)."""
    readback = DeviceReadback()
    pending = sampler.enqueue_prompt_logprobs(request, logits, start, readback)
    readback.fetch()
    add_prompt_logprob_chunk(
        request, PromptLogprobChunk(start, sampler.prompt_logprob_rows(pending, readback))
    )


def ramp_logits(rows: int = 1) -> torch.Tensor:
    """Token t has logit t / 4: a smooth distribution whose greedy choice is the last token."""
    return (torch.arange(VOCAB, dtype=torch.float32) / 4).repeat(rows, 1)


def draw_many(request_kwargs: dict, logits: torch.Tensor, num: int = 400) -> set[int]:
    """The set of tokens sampled over `num` independent draws."""
    s = new_sampler()
    requests = [make_request(f"r{i}", **request_kwargs) for i in range(num)]
    return set(s.sample(logits.repeat(num, 1), requests).token_ids)


def test_top_k_one_and_tiny_temperature_are_greedy() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    requests = [
        make_request("a", temperature=1.0, top_k=1),
        make_request("b", temperature=1e-7),
        make_request("c", temperature=0.0),
        make_request("d", temperature=1.5, top_k=1, seed=3),
    ]
    assert new_sampler().sample(logits, requests).token_ids == logits.argmax(dim=-1).tolist()


def test_logit_bias_forces_a_token() -> None:
    out = new_sampler().sample(ramp_logits(), [make_request(temperature=1.0, logit_bias={3: 100.0})])
    assert out.token_ids == [3]


def test_logit_bias_is_applied_before_the_repetition_penalty() -> None:
    # Token 15 (in the prompt): (3.75 + 10) / 2 = 6.875 with vLLM's order; 3.75 / 2 + 10 = 11.875 the
    # other way round. Token 14 sits between the two at 3.5 + 5 = 8.5, so only vLLM's order picks it.
    request = make_request(
        temperature=0.0, prompt=[15], logit_bias={15: 10.0, 14: 5.0}, repetition_penalty=2.0
    )
    assert new_sampler().sample(ramp_logits(), [request]).token_ids == [14]


def test_repetition_penalty_covers_the_prompt_and_presence_only_the_output() -> None:
    s = new_sampler()
    # The prompt holds the greedy token 15: a repetition penalty pushes it below 14 ...
    rep = make_request(temperature=0.0, prompt=[15], repetition_penalty=1.2)
    assert s.sample(ramp_logits(), [rep]).token_ids == [14]
    # ... while presence and frequency penalties ignore the prompt ...
    pres = make_request(temperature=0.0, prompt=[15], presence_penalty=2.0, frequency_penalty=2.0)
    assert s.sample(ramp_logits(), [pres]).token_ids == [15]
    # ... and count the output: 15 generated once loses 2 (presence) + 2 x 1 (frequency).
    pres_out = make_request(temperature=0.0, output=[15], presence_penalty=2.0, frequency_penalty=2.0)
    assert s.sample(ramp_logits(), [pres_out]).token_ids == [14]
    # Frequency grows with the count: 14 generated 3 times loses 3 x 0.4 and falls below 13.
    freq = make_request(temperature=0.0, output=[15, 14, 14, 14], frequency_penalty=0.4, presence_penalty=0.0)
    logits = ramp_logits()
    logits[0, 15] = -10.0
    assert s.sample(logits, [freq]).token_ids == [13]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 9] = 9.0
    logits[0, 4] = 8.0
    s = new_sampler()
    early = make_request(temperature=0.0, min_tokens=2, stop_token_ids=[9], output=[4])
    assert s.sample(logits, [early]).token_ids == [4]
    done = make_request(temperature=0.0, min_tokens=2, stop_token_ids=[9], output=[4, 4])
    assert s.sample(logits, [done]).token_ids == [EOS]
    ignore = make_request(temperature=0.0, min_tokens=2, ignore_eos=True, output=[4])
    assert s.sample(logits, [ignore]).token_ids == [EOS]  # with ignore_eos, EOS is an ordinary token


def test_min_tokens_yields_to_a_complete_grammar() -> None:
    # A finished grammar allows only EOS; min_tokens must not then leave no token at all.
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(5))
    only_eos = np.zeros((1, 1), dtype=np.int32)
    only_eos[0, 0] = 1 << EOS
    requests = [
        make_request("done", temperature=1.0, min_tokens=5, output=[4]),
        make_request("other", temperature=0.0, min_tokens=5, output=[4]),
    ]
    logits[1, EOS] = 100.0
    result = new_sampler().sample(logits, requests, TokenBitmask(["done"], only_eos))
    assert result.token_ids[0] == EOS
    assert result.token_ids[1] != EOS  # an unconstrained row keeps its min_tokens ban


def test_top_k_top_p_min_p_cut_the_temperature_scaled_distribution() -> None:
    logits = ramp_logits()
    assert draw_many({"temperature": 1.0, "top_k": 3}, logits) == {13, 14, 15}
    # Probabilities of 15, 14, 13 at temperature 1 are ~0.22, 0.17, 0.13: top_p 0.3 keeps two.
    assert draw_many({"temperature": 1.0, "top_p": 0.3}, logits) == {14, 15}
    # At temperature 0.25 (logits t) they are ~0.63, 0.23, 0.09: top_p 0.3 keeps only 15.
    assert draw_many({"temperature": 0.25, "top_p": 0.3}, logits) == {15}
    # min_p 0.5 keeps tokens with p >= p_max / 2: logits within ln 2 of the top (15, 14, 13 at T=1).
    assert draw_many({"temperature": 1.0, "min_p": 0.5}, logits) == {13, 14, 15}
    # At temperature 2 (logits t / 8) the same cut reaches further: 15 - t <= 8 ln 2, so t >= 10.
    assert draw_many({"temperature": 2.0, "min_p": 0.5}, logits) == set(range(10, 16))
    # Without cuts, a high temperature reaches the bottom of the vocabulary.
    assert 0 in draw_many({"temperature": 2.0}, logits, num=2000)


def test_top_p_is_measured_after_the_min_p_cut() -> None:
    # With min_p keeping {15, 14, 13} (mass renormalized to ~0.42, 0.33, 0.25), top_p 0.5 keeps two;
    # on the full distribution it would keep three (0.22 + 0.17 < 0.5).
    assert draw_many({"temperature": 1.0, "min_p": 0.5, "top_p": 0.5}, ramp_logits()) == {14, 15}


def test_a_seed_gives_the_same_tokens_alone_and_in_any_batch() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1)).repeat(32, 1)

    def run(batch: int, position: int) -> list[int]:
        s = new_sampler()
        requests = [make_request(f"other{i}", temperature=1.0) for i in range(batch)]
        requests[position] = make_request("seeded", temperature=1.0, seed=1234)
        tokens = []
        for _ in range(12):
            tokens.append(s.sample(logits[:batch], requests).token_ids[position])
        return tokens

    alone = run(1, 0)
    assert run(32, 0) == alone
    assert run(32, 17) == alone
    assert len(set(alone)) > 1  # really random draws, not a constant


def test_unseeded_sampling_uses_the_samplers_own_generator_not_torchs_global_one() -> None:
    logits = torch.zeros(8, VOCAB)  # uniform: every draw is decided by the noise alone

    def draws(sampler_seed: int, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)  # what model loading (dummy weights) or any library may do
        s = Sampler(VOCAB, torch.device("cpu"), seed=sampler_seed)
        requests = [make_request(f"r{i}", temperature=1.0) for i in range(8)]
        tokens = s.sample(logits, requests).token_ids
        torch.rand(1000)  # other users of the global generator between steps
        return tokens + s.sample(logits, requests).token_ids

    first = draws(sampler_seed=0, global_seed=1)
    assert draws(sampler_seed=0, global_seed=2) == first
    assert draws(sampler_seed=7, global_seed=1) != first  # --seed decides the unseeded draws
    assert len(set(first)) > 4


def test_logprobs_are_the_raw_distribution() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2))
    raw = torch.log_softmax(logits, dim=-1)[0]
    request = make_request(
        temperature=0.5, top_k=2, logprobs=5, presence_penalty=2.0, output=[int(raw.argmax())], seed=7
    )
    out = new_sampler().sample(logits, [request])
    token = out.token_ids[0]
    logprob, rank, top_ids, top_vals = out.logprobs[0]
    assert math.isclose(logprob, float(raw[token]), rel_tol=1e-6)
    assert rank == int((raw > raw[token]).sum()) + 1
    assert top_ids == raw.topk(5).indices.tolist()
    assert all(
        math.isclose(a, b, rel_tol=1e-6) for a, b in zip(top_vals, raw.topk(5).values.tolist(), strict=True)
    )


def test_logprobs_can_cover_the_whole_vocabulary() -> None:
    """The frontend bounds the count by --max-logprobs (which may allow every token, vLLM's -1); the
    engine then returns the whole distribution, ranked, and never more than the vocabulary."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(4))
    raw = torch.log_softmax(logits, dim=-1)
    requests = [make_request("a", logprobs=VOCAB), make_request("b", logprobs=3, prompt_logprobs=VOCAB + 5)]
    out = new_sampler().sample(logits, requests)
    _, _, all_ids, all_vals = out.logprobs[0]
    assert sorted(all_ids) == list(range(VOCAB))
    assert math.isclose(sum(math.exp(v) for v in all_vals), 1.0, rel_tol=1e-5)
    assert all_ids == raw[0].argsort(descending=True).tolist()
    assert len(out.logprobs[1][2]) == 3  # each request keeps its own count within the shared table
    add_prompt_logprobs(new_sampler(), requests[1], logits, 0)
    rows = requests[1].prompt_logprob_rows
    assert rows is not None and all(len(row[2]) == VOCAB for row in rows[1:])


def test_prompt_logprobs_accumulate_across_chunks_like_one_pass() -> None:
    prompt = [3, 8, 1, 12, 5, 9, 0]
    logits = torch.randn(len(prompt) - 1, VOCAB, generator=torch.Generator().manual_seed(3))
    one = make_request(prompt=prompt, prompt_logprobs=2)
    add_prompt_logprobs(new_sampler(), one, logits, 0)
    whole = one.prompt_logprob_rows
    chunked = new_sampler()
    request = make_request(prompt=prompt, prompt_logprobs=2)
    add_prompt_logprobs(chunked, request, logits[:4], 0)
    add_prompt_logprobs(chunked, request, logits[4:], 4)
    assert request.prompt_logprob_rows == whole
    assert whole is not None and whole[0] is None and len(whole) == len(prompt)
    raw = torch.log_softmax(logits, dim=-1)
    for pos in range(1, len(prompt)):
        entry = whole[pos]
        assert entry is not None
        assert math.isclose(entry[0], float(raw[pos - 1, prompt[pos]]), rel_tol=1e-6)
        assert len(entry[2]) == 2
    # A recompute from position 0 (preemption) starts the list again instead of appending.
    add_prompt_logprobs(chunked, request, logits[:4], 0)
    add_prompt_logprobs(chunked, request, logits[4:], 4)
    assert request.prompt_logprob_rows == whole


def test_a_failed_step_leaves_nothing_queued_for_the_next() -> None:
    """The sampler keeps no step state: what a failed step queued (never read back) cannot leak into
    the rerun, which gives exactly what a sampler that never saw the failure gives."""
    prompt = [3, 8, 1, 12]
    logits = torch.randn(len(prompt) - 1, VOCAB, generator=torch.Generator().manual_seed(4))
    s = new_sampler()
    request = make_request(prompt=prompt, prompt_logprobs=1)
    s.enqueue_prompt_logprobs(request, logits, 0, DeviceReadback())  # that step fails before its readback
    add_prompt_logprobs(s, request, logits, 0)
    alone = make_request(prompt=prompt, prompt_logprobs=1)
    add_prompt_logprobs(new_sampler(), alone, logits, 0)
    assert request.prompt_logprob_rows == alone.prompt_logprob_rows
    assert request.prompt_logprob_rows is not None and len(request.prompt_logprob_rows) == len(prompt)

"""Property test: the scheduler and its real KV block pool keep their invariants under random load.

Random arrivals, prompt lengths, priorities, aborts and tiny KV pools (so preemption is frequent), checked
after every schedule() and every update: each scheduled request is RUNNING and owns the blocks its tokens
need, no request is scheduled twice, every block is either free or owned (reference counts match the
owners, plus the step's pinned copy sources), and a preempted request never appears in the step's output.
A fake runner applies the plan's block copies and writes each computed position's slot with the tokens
up to it (what its KV depends on): every scheduled request must find its cached, shared and copied
positions holding its own tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.kv_cache import NULL_BLOCK_ID, KVCacheManager
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from engine.step_output import ModelRunnerOutput
from protocol.messages import FinishReason, SamplingParams

EOS = 2
MAX_STEPS = 3000


@dataclass(frozen=True)
class Arrival:
    step: int
    prompt_len: int
    max_tokens: int
    priority: int
    family: int  # prompts of one family share a prefix, so the prefix cache gets hits and shared blocks


@dataclass(frozen=True)
class Scenario:
    num_blocks: int
    block_size: int
    budget: int
    max_seqs: int
    priority_policy: bool
    prefix_caching: bool
    long_prefill_threshold: int | None
    arrivals: tuple[Arrival, ...]
    aborts: tuple[tuple[int, int], ...]  # (step, arrival index)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    block_size = draw(st.sampled_from([1, 2, 4]))
    num_blocks = draw(st.integers(3, 12))
    capacity = (num_blocks - 1) * block_size  # every request must fit the pool on its own
    arrival = st.builds(
        Arrival,
        step=st.integers(0, 12),
        prompt_len=st.integers(1, max(1, capacity - 1)),
        max_tokens=st.integers(1, 6),
        priority=st.integers(-2, 2),
        family=st.integers(0, 2),
    ).filter(lambda a: a.prompt_len + a.max_tokens <= capacity)
    arrivals = draw(st.lists(arrival, min_size=1, max_size=10))
    aborts = draw(st.lists(st.tuples(st.integers(0, 20), st.integers(0, len(arrivals) - 1)), max_size=3))
    return Scenario(
        num_blocks=num_blocks,
        block_size=block_size,
        budget=draw(st.integers(1, 24)),
        max_seqs=draw(st.integers(1, 5)),
        priority_policy=draw(st.booleans()),
        prefix_caching=draw(st.booleans()),
        long_prefill_threshold=draw(st.none() | st.integers(1, 8)),
        arrivals=tuple(sorted(arrivals, key=lambda a: a.step)),
        aborts=tuple(aborts),
    )


def fake_next_token(request: Request) -> int:
    """A deterministic 'model' (a function of the request's tokens only, like greedy decoding); never EOS."""
    return (sum(request.all_token_ids) * 31 + request.num_tokens) % 97 + 3


def make_request(index: int, arrival: Arrival) -> Request:
    prompt = [(arrival.family * 7 + k) % 50 + 3 for k in range(arrival.prompt_len)]
    sampling = SamplingParams(max_tokens=arrival.max_tokens)
    return Request(f"r{index}", b"c", prompt, sampling, float(index), arrival.priority, frozenset({EOS}))


def check_pool(scheduler: Scheduler, pinned: list[int] | None = None) -> None:
    """Free + owned blocks = all blocks; each block's reference count is its number of owners (requests,
    and the copies of a plan not yet applied)."""
    pool = scheduler.kv_cache.pool
    owners = Counter(b for r in scheduler.requests.values() for b in r.block_ids)
    owners.update(pinned or [])
    assert NULL_BLOCK_ID not in owners
    for block_id in range(1, pool.num_blocks):
        assert pool.ref_counts[block_id] == owners[block_id], block_id
        assert (block_id in pool.free_blocks) == (owners[block_id] == 0), block_id
    assert pool.num_free_blocks + len(owners) == pool.num_blocks - 1
    for request in scheduler.waiting:
        assert request.status is not RequestStatus.RUNNING and not request.block_ids
    assert all(r.status is RequestStatus.RUNNING for r in scheduler.running)


def check_step(scheduler: Scheduler, out: SchedulerOutput, limits: SchedulerLimits) -> None:
    ids = [r.request_id for r, _ in out.scheduled]
    assert len(ids) == len(set(ids)), f"scheduled twice: {ids}"
    assert len(ids) <= limits.max_num_seqs
    assert 0 < out.num_tokens <= limits.max_num_batched_tokens or out.is_empty
    block_size = scheduler.kv_cache.block_size
    for request, num_new in out.scheduled:
        # A preempted request has status PREEMPTED and no blocks: it must not be in the batch.
        assert request.status is RequestStatus.RUNNING, (request.request_id, request.status)
        assert request in scheduler.running
        assert num_new > 0
        end = request.num_computed_tokens + num_new
        assert end <= request.num_tokens
        # What the model runner reads: blocks[p // block_size] for every position computed this step.
        assert len(request.block_ids) >= -(-end // block_size), (request.request_id, request.block_ids)
    for copy in out.block_copies:
        assert 0 < copy.num_slots <= block_size and copy.src != copy.dst
    check_pool(scheduler, [copy.src for copy in out.block_copies])


Slots = dict[tuple[int, int], tuple[int, ...]]


def run_fake_step(scheduler: Scheduler, out: SchedulerOutput, slots: Slots) -> None:
    """The runner's part: the plan's copies, then a check that every scheduled request's computed positions
    hold its tokens, then this step's positions written."""
    size = scheduler.kv_cache.block_size
    for copy in out.block_copies:
        for i in range(copy.num_slots):
            slots[(copy.dst, i)] = slots[(copy.src, i)]
    for request, num_new in out.scheduled:
        tokens = tuple(request.token_id_at(p) for p in range(request.num_computed_tokens + num_new))
        for p in range(request.num_computed_tokens):
            where = (request.block_ids[p // size], p % size)
            assert slots.get(where) == tokens[: p + 1], (request.request_id, p, where)
        for p in range(request.num_computed_tokens, request.num_computed_tokens + num_new):
            slots[(request.block_ids[p // size], p % size)] = tokens[: p + 1]


def simulate(scenario: Scenario, num_blocks: int) -> tuple[Scheduler, list[Request]]:
    limits = SchedulerLimits(
        max_num_batched_tokens=scenario.budget,
        max_num_seqs=scenario.max_seqs,
        max_model_len=512,
        long_prefill_token_threshold=scenario.long_prefill_threshold,
        priority_policy=scenario.priority_policy,
    )
    kv = KVCacheManager(num_blocks, scenario.block_size, enable_prefix_caching=scenario.prefix_caching)
    scheduler = Scheduler(limits, kv)
    requests = [make_request(i, a) for i, a in enumerate(scenario.arrivals)]
    slots: Slots = {}
    step = 0
    while step < MAX_STEPS:
        for request, arrival in zip(requests, scenario.arrivals, strict=True):
            if arrival.step == step:
                scheduler.add_request(request)
        scheduler.abort_requests(requests[i].request_id for s, i in scenario.aborts if s == step)
        if not scheduler.has_work and step > max(a.step for a in scenario.arrivals):
            break
        out = scheduler.schedule()
        check_step(scheduler, out, limits)
        run_fake_step(scheduler, out, slots)
        sampled = {
            r.request_id: fake_next_token(r)
            for r, n in out.scheduled
            if r.num_computed_tokens + n == r.num_tokens
        }
        scheduler.update_from_output(out, ModelRunnerOutput(sampled))
        check_pool(scheduler)
        step += 1
    assert step < MAX_STEPS, "the scheduler stopped making progress"
    return scheduler, requests


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(scenarios())
def test_scheduler_invariants_hold_under_random_load(scenario: Scenario) -> None:
    scheduler, requests = simulate(scenario, scenario.num_blocks)
    assert scheduler.kv_cache.num_free_blocks == scenario.num_blocks - 1  # nothing leaked
    assert not scheduler.requests
    # Preemption and chunking never change what a request generates: compare with a pool that never runs out.
    _, roomy = simulate(scenario, num_blocks=1024)
    for tight_request, roomy_request in zip(requests, roomy, strict=True):
        if (
            tight_request.finish_reason is FinishReason.ABORT
            or roomy_request.finish_reason is FinishReason.ABORT
        ):
            continue
        assert tight_request.finish_reason is FinishReason.LENGTH
        assert tight_request.output_token_ids == roomy_request.output_token_ids

"""Speculative rows in the scheduler with a fake model output: drafts in the plan, acceptance, stops and
KV accounting. No torch."""

from __future__ import annotations

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus
from engine.scheduler import ScheduledRequest, Scheduler, SchedulerLimits, SchedulerOutput
from engine.spec.config import SpeculativeConfig
from engine.step_output import ModelRunnerOutput
from protocol.messages import FinishReason, SamplingParams

BLOCK = 4
PROMPT = [10, 11, 12, 13, 10, 11, 12]  # after a sampled 13, "11 12 13" recurs: drafts 10 11 12


def make_scheduler(num_blocks: int = 32, budget: int = 64, k: int = 3, max_model_len: int = 512) -> Scheduler:
    limits = SchedulerLimits(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=max_model_len)
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=True)
    return Scheduler(limits, kv, SpeculativeConfig(k, 3, 1))


def make_request(rid: str = "r", max_tokens: int = 20, **sampling: object) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)  # type: ignore[arg-type]
    return Request(rid, b"c", list(PROMPT), params, 0.0, 0, frozenset({2}))


def assert_blocks_add_up(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache
    used = {b for r in scheduler.running for b in r.block_ids}
    assert kv.num_free_blocks + len(used) == kv.pool.num_blocks - 1


def prefill(scheduler: Scheduler, *requests: Request, first_token: int = 13) -> None:
    for request in requests:
        scheduler.add_request(request)
    plan = scheduler.schedule()
    assert all(not row.drafts and row.samples for row in plan.rows)
    scheduler.update_from_output(plan, ModelRunnerOutput({r.request_id: first_token for r in requests}))


def draft_step(scheduler: Scheduler, targets: dict[str, list[int]]) -> tuple[SchedulerOutput, list]:
    plan = scheduler.schedule()
    updates = scheduler.update_from_output(plan, ModelRunnerOutput(draft_targets=targets))
    return plan, updates


def test_a_decode_row_carries_drafts_and_partial_acceptance_rolls_back() -> None:
    scheduler = make_scheduler()
    request = make_request()
    prefill(scheduler, request)
    plan = scheduler.schedule()
    (row,) = plan.rows
    assert row == ScheduledRequest(request, 4, 7, False, False, (10, 11, 12))
    assert len(request.block_ids) == 3  # positions 7..10 need a third block
    # The model agrees with 10 and 11, then says 99: tokens 10 11 99, KV kept for positions 7..9.
    updates = scheduler.update_from_output(plan, ModelRunnerOutput(draft_targets={"r": [10, 11, 99, 5]}))
    assert [u.token_ids for u in updates] == [[10, 11, 99]]
    assert request.output_token_ids == [13, 10, 11, 99]
    assert request.num_computed_tokens == 10 == request.num_tokens - 1
    assert (scheduler.num_draft_tokens, scheduler.num_accepted_tokens) == (3, 2)
    # Prefix-cache hashes cover computed (accepted) tokens only: two full blocks of 8.
    assert len(request.block_hashes) == request.num_registered_blocks == 2
    assert_blocks_add_up(scheduler)


def test_full_acceptance_adds_the_bonus_token() -> None:
    scheduler = make_scheduler()
    request = make_request()
    prefill(scheduler, request)
    _, updates = draft_step(scheduler, {"r": [10, 11, 12, 77]})
    assert [u.token_ids for u in updates] == [[10, 11, 12, 77]]
    assert request.num_computed_tokens == 11 and request.num_tokens == 12
    assert scheduler.num_accepted_tokens == 3
    # The next step continues from the bonus token: "12 77" never occurred, but "77" alone neither.
    plan = scheduler.schedule()
    assert [(row.num_new, row.start, row.drafts) for row in plan.rows] == [(1, 11, ())]
    assert_blocks_add_up(scheduler)


def test_a_stop_token_among_the_accepted_drafts_ends_the_request_there() -> None:
    scheduler = make_scheduler()
    request = make_request(stop_token_ids=[11])
    prefill(scheduler, request)
    _, updates = draft_step(scheduler, {"r": [10, 11, 12, 77]})
    assert [u.token_ids for u in updates] == [[10, 11]]
    assert request.finish_reason is FinishReason.STOP and request.stop_reason == 11
    assert request.status is RequestStatus.FINISHED and not scheduler.has_work
    assert scheduler.kv_cache.num_free_blocks == 31


def test_eos_in_the_drafts_stops_like_a_sampled_eos() -> None:
    scheduler = make_scheduler()
    request = make_request()
    prefill(scheduler, request)
    _, updates = draft_step(scheduler, {"r": [2, 11, 12, 77]})  # the model says EOS first: draft 10 rejected
    assert [u.token_ids for u in updates] == [[2]]
    assert request.finish_reason is FinishReason.STOP and request.output_token_ids == [13, 2]


def test_drafts_stop_at_max_tokens_with_the_bonus_token_last() -> None:
    scheduler = make_scheduler()
    request = make_request(max_tokens=4)
    prefill(scheduler, request)
    plan, updates = draft_step(scheduler, {"r": [10, 11, 99]})
    assert plan.rows[0].drafts == (10, 11)  # 1 output + 2 drafts + the bonus = max_tokens
    assert [u.token_ids for u in updates] == [[10, 11, 99]]
    assert request.finish_reason is FinishReason.LENGTH and request.num_output_tokens == 4
    assert scheduler.kv_cache.num_free_blocks == 31


def test_max_tokens_reached_inside_the_accepted_tokens() -> None:
    # A plan made before max_tokens shrank the room (here: built by hand) still stops at the limit.
    scheduler = make_scheduler()
    request = make_request(max_tokens=3)
    prefill(scheduler, request)
    assert scheduler.kv_cache.allocate_slots(request, 4)
    plan = SchedulerOutput([ScheduledRequest(request, 4, 7, False, False, (10, 11, 12))])
    updates = scheduler.update_from_output(plan, ModelRunnerOutput(draft_targets={"r": [10, 11, 12, 5]}))
    assert [u.token_ids for u in updates] == [[10, 11]]
    assert request.finish_reason is FinishReason.LENGTH and request.output_token_ids == [13, 10, 11]
    assert scheduler.kv_cache.num_free_blocks == 31


def test_drafts_stay_inside_max_model_len() -> None:
    scheduler = make_scheduler(max_model_len=10)
    request = make_request()
    prefill(scheduler, request)
    plan = scheduler.schedule()
    assert plan.rows[0].drafts == (10, 11)  # positions 8 and 9; the context ends at 10


def test_no_free_blocks_for_drafts_means_a_plain_decode_not_a_preemption() -> None:
    scheduler = make_scheduler(num_blocks=3)  # two usable blocks: the 8 tokens fit, drafts would not
    request = make_request()
    prefill(scheduler, request)
    plan = scheduler.schedule()
    assert [(row.num_new, row.drafts) for row in plan.rows] == [(1, ())] and plan.num_preempted == 0
    assert_blocks_add_up(scheduler)


def test_drafts_count_against_the_budget_but_leave_every_row_its_token() -> None:
    scheduler = make_scheduler(budget=4)
    a, b = make_request("a"), make_request("b")
    scheduler.add_request(a)
    scheduler.add_request(b)
    while a.num_output_tokens == 0 or b.num_output_tokens == 0:  # 14 prompt tokens over budget-4 steps
        plan = scheduler.schedule()
        sampled = {row.request.request_id: 13 for row in plan.rows if row.samples}
        scheduler.update_from_output(plan, ModelRunnerOutput(sampled))
    plan = scheduler.schedule()
    assert [(row.request.request_id, row.num_new) for row in plan.rows] == [("a", 3), ("b", 1)]
    assert plan.rows[0].drafts == (10, 11) and plan.rows[1].drafts == ()
    assert_blocks_add_up(scheduler)


def test_requests_that_sample_or_need_logprobs_never_speculate() -> None:
    scheduler = make_scheduler()
    hot = Request("hot", b"c", list(PROMPT), SamplingParams(max_tokens=9, temperature=0.8), 0.0)
    lp = make_request("lp", logprobs=1)
    penalised = make_request("pen", repetition_penalty=1.2)
    early = make_request("early", min_tokens=3)
    greedy = make_request("greedy")
    prefill(scheduler, hot, lp, penalised, early, greedy)
    plan = scheduler.schedule()
    drafts = {row.request.request_id: row.drafts for row in plan.rows}
    assert drafts == {"hot": (), "lp": (), "pen": (), "early": (), "greedy": (10, 11, 12)}


def test_a_run_to_the_end_leaks_no_blocks() -> None:
    scheduler = make_scheduler(num_blocks=16)
    requests = [make_request(f"r{i}", max_tokens=12) for i in range(3)]
    prefill(scheduler, *requests)
    # A "model" that repeats the prompt's cycle: drafts are always right.
    cycle = [10, 11, 12, 13]
    while scheduler.has_work:
        plan = scheduler.schedule()
        output = ModelRunnerOutput()
        for row in plan.rows:
            n = row.request.num_tokens
            if row.drafts:
                output.draft_targets[row.request.request_id] = [
                    cycle[(n + i) % 4] for i in range(row.num_new)
                ]
            elif row.samples:
                output.sampled[row.request.request_id] = cycle[n % 4]
        scheduler.update_from_output(plan, output)
        assert_blocks_add_up(scheduler)
    assert all(r.num_output_tokens == 12 and r.finish_reason is FinishReason.LENGTH for r in requests)
    assert requests[0].output_token_ids == [13] + [cycle[(8 + i) % 4] for i in range(11)]
    assert scheduler.num_accepted_tokens == scheduler.num_draft_tokens > 0
    assert scheduler.kv_cache.num_free_blocks == 15


def test_drafts_never_take_the_block_a_later_request_needs() -> None:
    # Blocks of 4: a and b hold 2 blocks each (8 tokens); 1 block is free. a's drafts would need it, and
    # so does b's next token in a later step: a decodes plainly and nobody is preempted.
    scheduler = make_scheduler(num_blocks=6)
    a, b = make_request("a"), make_request("b")
    prefill(scheduler, a, b)
    assert scheduler.kv_cache.num_free_blocks == 1
    plan = scheduler.schedule()
    assert [(row.request.request_id, row.num_new, row.drafts) for row in plan.rows] == [
        ("a", 1, ()),
        ("b", 4, (10, 11, 12)),
    ]
    assert plan.num_preempted == 0
    assert_blocks_add_up(scheduler)

"""Scheduler: token budget, chunked prefill, preemption, abort, prefix cache and n-groups.

The engine is simulated: requests returned by update_after_step get a dummy token appended and
are finished at max_tokens. A fake KV cache (page -> token ids written there) checks that every
scheduled step reads exactly the request's own tokens through its page table.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from inferflux.request import Request, RequestStatus
from inferflux.sampling_params import SamplingParams
from inferflux.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

DUMMY = 999


def make_req(rid: str, prompt: list[int] | int, max_tokens: int = 4, **kw: Any) -> Request:
    if isinstance(prompt, int):
        prompt = [1000 + 10 * len(rid) + i for i in range(prompt)]
    kw.setdefault("arrival_time", 0.0)
    return Request(rid, list(prompt), SamplingParams(), max_tokens=max_tokens, **kw)


def make_sched(**kw: int | bool) -> Scheduler:
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, page_size=4)
    cfg["num_pages"] = 64
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))  # type: ignore[arg-type]


class FakeEngine:
    """Writes token ids into a fake paged KV cache and checks what each step would read."""

    def __init__(self, sched: Scheduler, token_fn=lambda req: DUMMY):
        self.sched = sched
        self.kv: dict[int, list[int | None]] = {}
        self.token_fn = token_fn

    def step(self) -> SchedulerOutput:
        return self.run(self.sched.schedule())

    def run(self, out: SchedulerOutput) -> SchedulerOutput:
        """Execute a scheduled step: write and check the fake KV, sample, finish."""
        s, ps = self.sched, self.sched.config.page_size
        assert out.num_scheduled_tokens <= s.config.max_num_batched_tokens
        assert len(out.scheduled) <= s.config.max_num_seqs
        for sr in out.scheduled:
            req, nc, n = sr.request, sr.num_computed_tokens, sr.num_new_tokens
            assert n >= 1 and nc + n <= s.config.max_model_len
            assert len(req.page_ids) >= -(-(nc + n) // ps) and 0 not in req.page_ids
            assert sr.token_ids == req.all_token_ids[nc : nc + n]
            for pos, tok in zip(range(nc, nc + n), sr.token_ids, strict=True):
                self.kv.setdefault(req.page_ids[pos // ps], [None] * ps)[pos % ps] = tok
            # Attention over positions < nc + n must see exactly this request's tokens.
            seen = [self.kv[req.page_ids[p // ps]][p % ps] for p in range(nc + n)]
            assert seen == req.all_token_ids[: nc + n], req.request_id
        for req in s.update_after_step(out):
            req.output_token_ids.append(self.token_fn(req))
            if req.num_output_tokens >= req.max_tokens:
                s.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
        return out


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(sr.request.request_id, sr.num_new_tokens) for sr in out.scheduled]


def test_token_budget_and_chunked_prefill() -> None:
    s = make_sched(max_num_batched_tokens=8, enable_prefix_caching=False)
    eng = FakeEngine(s)
    a, b = make_req("a", 10, max_tokens=3), make_req("b", 5, max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    out = eng.step()
    assert plan(out) == [("a", 8)] and out.num_scheduled_tokens == 8
    assert not out.scheduled[0].will_sample and a.num_output_tokens == 0
    assert a.page_ids == [1, 2] and b.status is RequestStatus.WAITING
    out = eng.step()
    assert plan(out) == [("a", 2), ("b", 5)]
    assert [sr.will_sample for sr in out.scheduled] == [True, True]
    assert a.page_ids == [1, 2, 3] and b.page_ids == [4, 5]
    assert (a.all_token_ids[-1], b.all_token_ids[-1]) == (DUMMY, DUMMY)
    assert plan(eng.step()) == [("a", 1), ("b", 1)]
    assert b.status is RequestStatus.FINISHED_LENGTH and b.page_ids == []
    assert s.pool.free_queue()[:2] == [4, 5]  # b's plain pages are reused first
    assert plan(eng.step()) == [("a", 1)]
    assert a.finished and not s.has_unfinished_requests() and s.kv_cache_usage == 0.0
    assert plan(s.schedule()) == [] and s.schedule().num_scheduled_tokens == 0


def test_max_num_seqs() -> None:
    s = make_sched(max_num_seqs=2)
    eng = FakeEngine(s)
    for rid in ("a", "bb", "ccc"):
        s.add_request(make_req(rid, 3, max_tokens=2))
    assert plan(eng.step()) == [("a", 3), ("bb", 3)]
    assert (s.num_running, s.num_waiting) == (2, 1)
    assert plan(eng.step()) == [("a", 1), ("bb", 1)]  # both finish here
    assert plan(eng.step()) == [("ccc", 3)]


def test_waiting_order_priority_then_arrival() -> None:
    s = make_sched(max_num_batched_tokens=4, max_num_seqs=1)
    s.add_request(make_req("late", 2, max_tokens=1, arrival_time=3.0))
    s.add_request(make_req("low", 2, max_tokens=1, arrival_time=1.0, priority=5))
    s.add_request(make_req("early", 2, max_tokens=1, arrival_time=2.0))
    eng = FakeEngine(s)
    order = [plan(eng.step())[0][0] for _ in range(3)]
    assert order == ["early", "late", "low"]


def test_preemption_victim_is_newest_and_recompute() -> None:
    # 4 usable pages of 4 tokens; each 7-token prompt takes 2 pages.
    s = make_sched(num_pages=5, max_model_len=16)
    eng = FakeEngine(s)
    a = make_req("a", 7, max_tokens=3, arrival_time=0.0)
    b = make_req("b", [200 + i for i in range(7)], max_tokens=5, arrival_time=1.0)
    s.add_request(a)
    s.add_request(b)
    assert plan(eng.step()) == [("a", 7), ("b", 7)]
    assert (a.page_ids, b.page_ids, s.pool.num_free_pages) == ([1, 2], [3, 4], 0)
    assert plan(eng.step()) == [("a", 1), ("b", 1)]  # 8 tokens each: still 2 pages
    out = s.schedule()  # a needs a 3rd page: b (newest) is preempted
    assert plan(out) == [("a", 1)] and out.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert b.num_computed_tokens == 0 and b.page_ids == [] and s.waiting == [b]
    assert b.num_tokens == 9 and b.output_token_ids == [DUMMY, DUMMY]
    # b's pages went back (last page first) and a took the head: page 4, evicting its hash.
    assert a.page_ids == [1, 2, 4] and s.pool.free_queue() == [3]
    eng.run(out)
    assert a.finished  # a reached max_tokens=3 in this step
    # a freed: plain page 4 to the head, cached pages 2 and 1 to the tail after b's page 3.
    assert s.pool.free_queue() == [4, 3, 2, 1]
    out = eng.step()  # b recomputes its 9 tokens; its first page (3) is still cached
    assert plan(out) == [("b", 5)] and out.scheduled[0].num_computed_tokens == 4
    assert b.page_ids == [3, 4, 2] and b.num_cached_tokens == 0  # first admission only
    assert b.num_tokens == 10 and b.status is RequestStatus.RUNNING
    assert s.num_preemptions == 1


def test_preemption_of_already_scheduled_victim_refunds_budget() -> None:
    s = make_sched(num_pages=5, max_model_len=16)
    eng = FakeEngine(s)
    low = make_req("low", 7, max_tokens=8, priority=1, arrival_time=0.0)
    s.add_request(low)
    assert plan(eng.step()) == [("low", 7)] and low.page_ids == [1, 2]
    high = make_req("high", [300, 301, 302], max_tokens=8, arrival_time=5.0)
    s.add_request(high)
    assert plan(eng.step()) == [("low", 1), ("high", 3)] and high.page_ids == [3]
    assert plan(eng.step()) == [("low", 1), ("high", 1)] and low.page_ids == [1, 2, 4]
    out = eng.step()
    # high (priority 0) needs a 2nd page; the victim is low (priority 1), already scheduled
    # earlier in this step: its tokens are taken back and its pages go to high.
    assert out.preempted == [low] and plan(out) == [("high", 1)]
    assert out.num_scheduled_tokens == 1 and low.page_ids == [] and high.page_ids == [3, 4]
    assert low.num_computed_tokens == 0 and low.num_tokens == 10


def test_self_preemption_stops_the_step() -> None:
    s = make_sched(num_pages=5, max_model_len=16)
    eng = FakeEngine(s)
    a = make_req("a", 6, max_tokens=8, arrival_time=0.0)
    b = make_req("b", [400 + i for i in range(8)], max_tokens=8, arrival_time=1.0)
    s.add_request(a)
    s.add_request(b)
    assert plan(eng.step()) == [("a", 6), ("b", 8)]  # a: 1 2, b: 3 4; b has 9 tokens now
    out = eng.step()  # a fits; b needs a 3rd page and is itself the victim
    assert plan(out) == [("a", 1)] and out.preempted == [b]
    assert s.waiting == [b] and a.page_ids == [1, 2]


def test_abort_waiting_and_running_frees_pages_at_once() -> None:
    s = make_sched(max_num_batched_tokens=6, enable_prefix_caching=False)
    eng = FakeEngine(s)
    run, wait = make_req("run", 6), make_req("wait", 5)
    s.add_request(run)
    s.add_request(wait)
    assert plan(eng.step()) == [("run", 6)]
    assert run.page_ids == [1, 2] and s.pool.num_free_pages == 61
    assert s.abort_request("run") is run
    assert run.status is RequestStatus.FINISHED_ABORTED and run.page_ids == []
    assert s.pool.num_free_pages == 63 and s.pool.free_queue()[:2] == [1, 2]
    assert s.abort_request("wait") is wait and wait.status is RequestStatus.FINISHED_ABORTED
    assert s.abort_request("wait") is None and s.abort_request("nope") is None
    assert not s.has_unfinished_requests() and s.get_request("run") is None


def test_prefix_cache_hit_leaves_last_token() -> None:
    s = make_sched()
    eng = FakeEngine(s)
    prompt = list(range(50, 58))  # exactly 2 pages
    first = make_req("first", prompt, max_tokens=1, cache_salt="t1")
    s.add_request(first)
    assert plan(eng.step()) == [("first", 8)] and first.finished
    # Same 8 tokens: the hit stops at 1 page so the last token is computed.
    same = make_req("same", prompt, max_tokens=2, cache_salt="t1")
    longer = make_req("longer", prompt + [7], max_tokens=2, cache_salt="t1")
    other = make_req("other", prompt + [7], max_tokens=2, cache_salt="t2")
    for r in (same, longer, other):
        s.add_request(r)
    assert plan(eng.step()) == [("same", 4), ("longer", 1), ("other", 9)]
    assert (same.num_cached_tokens, longer.num_cached_tokens, other.num_cached_tokens) == (4, 8, 0)
    assert same.page_ids[0] == longer.page_ids[0] == first_page(s, prompt, "t1")
    assert longer.page_ids[:2] != other.page_ids[:2]
    assert s.prefix_cache_queries == 8 + 8 + 9 + 9 and s.prefix_cache_hits == 4 + 8


def first_page(s: Scheduler, prompt: list[int], salt: str) -> int:
    return s.pool.get_cached_prefix(s.pool.hash_pages(prompt, salt))[0]


def test_n_group_siblings_share_prompt_pages() -> None:
    s = make_sched(max_num_batched_tokens=16)
    eng = FakeEngine(s)
    prompt = list(range(10))  # 2 full pages + 2 tokens
    sibs = [make_req(f"s{i}", prompt, max_tokens=3, group_id="g") for i in range(3)]
    for r in sibs:
        s.add_request(r)
    x = make_req("x", 3, max_tokens=3)
    s.add_request(x)
    # s1 and s2 are skipped while s0 computes the prompt, but x is still admitted.
    assert plan(eng.step()) == [("s0", 10), ("x", 3)]
    assert sibs[0].page_ids == [1, 2, 3] and x.page_ids == [4]
    assert plan(eng.step()) == [("s0", 1), ("x", 1), ("s1", 2), ("s2", 2)]
    shared = sibs[0].page_ids[:2]
    assert [r.page_ids for r in sibs] == [shared + [3], shared + [5], shared + [6]]
    assert [s.pool.ref_count(p) for p in shared] == [3, 3]
    assert [r.num_cached_tokens for r in sibs] == [0, 8, 8]


def test_n_group_prompt_of_whole_pages() -> None:
    s = make_sched()
    eng = FakeEngine(s)
    prompt = list(range(8))  # 2 full pages: the second is recomputed by each sibling
    sibs = [make_req(f"s{i}", prompt, max_tokens=3, group_id="g") for i in range(2)]
    for r in sibs:
        s.add_request(r)
    assert plan(eng.step()) == [("s0", 8)]
    assert plan(eng.step()) == [("s0", 1), ("s1", 4)]
    assert sibs[1].page_ids == [1, 4] and s.pool.ref_count(1) == 2


def test_config_and_request_validation() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        make_sched(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_model_len=32"):
        make_sched(num_pages=8)  # 7 pages of 4 tokens < 32
    with pytest.raises(ValueError, match="num_pages"):
        make_sched(num_pages=1)
    s = make_sched()
    s.add_request(make_req("a", 3))
    with pytest.raises(ValueError, match="duplicate"):
        s.add_request(make_req("a", 3))
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(make_req("long", 33))
    with pytest.raises(ValueError, match="empty"):
        s.add_request(make_req("empty", []))
    with pytest.raises(ValueError, match="finished status"):
        s.finish_request("a", RequestStatus.RUNNING)


@pytest.mark.parametrize("seed", range(10))
def test_random_workload_invariants(seed: int) -> None:
    rng = random.Random(seed)
    s = make_sched(
        max_num_seqs=rng.choice([2, 4, 6]),
        max_num_batched_tokens=rng.choice([5, 16, 40]),
        max_model_len=24,
        page_size=rng.choice([2, 4]),
        num_pages=rng.choice([14, 20, 40]),
        enable_prefix_caching=seed % 3 != 0,
    )
    eng = FakeEngine(s, token_fn=lambda req: rng.randrange(4))
    prefixes = [[rng.randrange(4) for _ in range(12)] for _ in range(3)]
    reqs, aborted = [], set()
    for i in range(40):
        prompt = rng.choice(prefixes)[: rng.randint(1, 12)] + [rng.randrange(4)] * rng.randint(0, 4)
        r = make_req(f"r{i}", prompt, max_tokens=rng.randint(1, 24 - len(prompt)))
        r.cache_salt, r.priority = rng.choice([None, "a", "b"]), rng.randrange(2)
        r.group_id = f"g{i // 3}" if i % 2 else None
        r.arrival_time = float(i)
        s.add_request(r)
        reqs.append(r)
        if rng.random() < 0.1:
            victim = rng.choice(reqs)
            if s.abort_request(victim.request_id) is not None:
                aborted.add(victim.request_id)
        for _ in range(rng.randint(0, 3)):
            eng.step()
            check_pool(s)
    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        eng.step()
        check_pool(s)
    assert not s.has_unfinished_requests()
    for r in reqs:
        if r.request_id not in aborted:
            assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == r.max_tokens
    assert s.pool.num_free_pages == s.config.num_pages - 1


def check_pool(s: Scheduler) -> None:
    refs = [0] * s.config.num_pages
    for r in s.running:
        assert len(r.page_ids) == len(set(r.page_ids))
        for p in r.page_ids:
            refs[p] += 1
    for r in s.waiting:
        assert r.page_ids == [] and r.num_computed_tokens == 0
    assert refs == [s.pool.ref_count(p) for p in range(s.config.num_pages)]
    assert sorted(s.pool.free_queue()) == [p for p in range(1, len(refs)) if refs[p] == 0]

"""Token-budget scheduler in the vLLM v1 style: no prefill/decode modes (plain Python, no JAX).

Every request has `num_computed_tokens` (KV already in the cache) and `num_tokens` (prompt plus
outputs). Each step hands out new tokens to compute under a token budget: running requests
first, in order, then waiting ones by (priority, arrival). A long prompt simply takes several
steps (chunked prefill); a decoding request takes one token. When KV pages run out, the
lowest-priority newest running request is preempted and later recomputed from scratch.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field

from inferflux.block_pool import BlockPool
from inferflux.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine's scheduler. The pool must hold at least one max_model_len sequence."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    num_pages: int  # including the reserved page 0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_pages, int) or self.num_pages < 2:
            raise ValueError(
                f"num_pages must be an int >= 2 (page 0 is reserved), got {self.num_pages!r}"
            )
        # NOTE: this guarantees progress: a request running alone can always grow to
        # max_model_len, so preemption can never loop on a request that could never fit.
        if self.num_pages - 1 < self.max_pages_per_seq:
            raise ValueError(
                f"num_pages={self.num_pages} holds {self.num_pages - 1} usable pages of "
                f"{self.page_size} tokens, fewer than the {self.max_pages_per_seq} that one "
                f"max_model_len={self.max_model_len} sequence needs"
            )

    @property
    def max_pages_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.page_size)


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute `all_token_ids[nc : nc + num_new_tokens]`."""

    request: Request
    num_new_tokens: int
    # Snapshots taken when the step was scheduled (the request moves on after the step).
    num_computed_tokens: int = field(init=False)  # nc: KV already cached before this step
    will_sample: bool = field(init=False)  # this step reaches num_tokens: logits are needed

    def __post_init__(self) -> None:
        self.num_computed_tokens = self.request.num_computed_tokens
        end = self.num_computed_tokens + self.num_new_tokens
        self.will_sample = end >= self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        """The tokens this step computes (their positions start at `num_computed_tokens`)."""
        start = self.num_computed_tokens
        return token_range(self.request, start, start + self.num_new_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]  # lost their KV this step; they wait to be recomputed
    num_scheduled_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def token_range(req: Request, start: int, end: int) -> list[int]:
    """`req.all_token_ids[start:end]` without building the whole list."""
    prompt, n_prompt = req.prompt_token_ids, req.num_prompt_tokens
    if end <= n_prompt:
        return prompt[start:end]
    if start >= n_prompt:
        return req.output_token_ids[start - n_prompt : end - n_prompt]
    return prompt[start:] + req.output_token_ids[: end - n_prompt]


class Scheduler:
    """Owns the waiting/running queues and the block pool; see the module docstring."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.pool = BlockPool(config.num_pages, config.page_size, config.enable_prefix_caching)
        self.waiting: list[Request] = []  # kept sorted by self._wait_key
        self.running: list[Request] = []  # in admission order
        self._requests: dict[str, Request] = {}
        self._wait_keys: dict[str, tuple[int, int, float, int]] = {}
        self._hashes: dict[str, list[int]] = {}  # chained hashes of the request's full pages
        self._num_registered: dict[str, int] = {}  # leading pages already offered to the cache
        self._seq = itertools.count()
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens of admitted requests
        self.prefix_cache_hits = 0  # of those, tokens served by the prefix cache

    # ---------------------------------------------------------------- queries
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_cache_usage(self) -> float:
        return self.pool.usage

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ---------------------------------------------------------------- lifecycle
    def add_request(self, req: Request) -> None:
        """Queue a new request. Raises ValueError if it is malformed or can never fit."""
        if req.request_id in self._requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.status is not RequestStatus.WAITING or req.page_ids or req.num_computed_tokens:
            raise ValueError(f"request {req.request_id!r} is not a fresh WAITING request")
        if req.num_prompt_tokens < 1:
            raise ValueError(f"request {req.request_id!r} has an empty prompt")
        if req.num_tokens > self.config.max_model_len:
            raise ValueError(
                f"request {req.request_id!r} has {req.num_tokens} tokens, more than "
                f"max_model_len={self.config.max_model_len}"
            )
        self._requests[req.request_id] = req
        self._push_waiting(req, (req.priority, 1, req.arrival_time, next(self._seq)))

    def abort_request(self, request_id: str) -> Request | None:
        """Abort a waiting or running request and free its pages now; None if unknown."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Mark a request finished with `status` and free its pages; None if unknown."""
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        if request_id in self._wait_keys:
            self.waiting.remove(req)
            del self._wait_keys[request_id]
        else:
            self.running.remove(req)
        self._free_pages(req)
        self._hashes.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        req.status = status
        return req

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    # ---------------------------------------------------------------- the step
    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then waiting ones."""
        scheduled: dict[str, ScheduledRequest] = {}  # insertion-ordered
        preempted: list[Request] = []
        budget = self._schedule_running(scheduled, preempted, self.config.max_num_batched_tokens)
        # NOTE: no admissions in a step that had to preempt: pages are scarce.
        if not preempted:
            self._schedule_waiting(scheduled, budget)
        out = list(scheduled.values())
        return SchedulerOutput(out, preempted, sum(s.num_new_tokens for s in out))

    def update_after_step(self, out: SchedulerOutput) -> list[Request]:
        """Advance computed tokens after the step ran; return requests that need a new token.

        Newly full pages (whose KV is now computed) are registered in the prefix cache.
        Requests finished, aborted or preempted since `schedule()` are skipped.
        """
        ready = []
        for sched in out.scheduled:
            req = sched.request
            if req.status is not RequestStatus.RUNNING or (
                req.num_computed_tokens != sched.num_computed_tokens
            ):
                continue
            req.num_computed_tokens += sched.num_new_tokens
            if self.config.enable_prefix_caching:
                self._register_full_pages(req)
            if req.num_computed_tokens >= req.num_tokens:
                ready.append(req)
        return ready

    # ---------------------------------------------------------------- internals
    def _num_new_tokens(self, req: Request, budget: int) -> int:
        nc = req.num_computed_tokens
        return min(req.num_tokens - nc, budget, self.config.max_model_len - nc)

    def _schedule_running(
        self, scheduled: dict[str, ScheduledRequest], preempted: list[Request], budget: int
    ) -> int:
        """Schedule running requests in order, preempting when pages run out. Returns budget."""
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._num_new_tokens(req, budget)
            if n <= 0:
                i += 1
                continue
            while not self._grow_pages(req, req.num_computed_tokens + n):
                j = self._victim_index()
                victim = self.running[j]
                self._preempt(j)
                preempted.append(victim)
                undone = scheduled.pop(victim.request_id, None)
                if undone is not None:
                    budget += undone.num_new_tokens
                if victim is req:
                    return budget  # NOTE: the request itself lost; stop scheduling this step
                if j < i:
                    i -= 1
            scheduled[req.request_id] = ScheduledRequest(req, n)
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, scheduled: dict[str, ScheduledRequest], budget: int) -> None:
        """Admit waiting requests in order while budget, sequence slots and pages allow."""
        busy_groups = {r.group_id for r in self.running if self._computing_shared_prompt(r)}
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            # NOTE: skip (not block) siblings of a group whose prompt pages are still being
            # computed: next steps they hit those pages in the prefix cache instead.
            if req.group_id is not None and req.group_id in busy_groups:
                continue
            n = self._admit(req, budget)
            if n is None:
                break  # NOTE: strict FCFS on pages, so a large request is not starved
            scheduled[req.request_id] = ScheduledRequest(req, n)
            budget -= n
            if self._computing_shared_prompt(req):
                busy_groups.add(req.group_id)

    def _computing_shared_prompt(self, req: Request) -> bool:
        """A group member whose full prompt pages are not all computed (and cached) yet."""
        full_prompt = req.num_prompt_tokens // self.config.page_size * self.config.page_size
        return req.group_id is not None and req.num_computed_tokens < full_prompt

    def _admit(self, req: Request, budget: int) -> int | None:
        """Move `req` to running with a prefix-cache hit and pages for its first chunk.

        Returns its number of new tokens, or None (nothing changed) if pages are short.
        """
        ps = self.config.page_size
        hashes: list[int] = []
        hit: list[int] = []
        # NOTE: prompt logprobs need the logits of every prompt position, so such requests
        # compute their whole prompt instead of taking it from the prefix cache.
        wants_prompt = req.sampling_params.prompt_logprobs is not None
        if self.config.enable_prefix_caching and not wants_prompt:
            hashes = self._page_hashes(req, req.num_tokens // ps)
            # NOTE: the hit never covers the last token: the step must produce its logits.
            hashes = hashes[: (req.num_tokens - 1) // ps]
            hit = self.pool.get_cached_prefix(hashes)
        nc = len(hit) * ps
        n = min(req.num_tokens - nc, budget, self.config.max_model_len - nc)
        if n <= 0:
            return None
        need = math.ceil((nc + n) / ps) - len(hit)
        # Hit pages that sit in the free queue count against the free pages too.
        if need + self.pool.num_free_in(hit) > self.pool.num_free_pages:
            return None
        hit = self.pool.lookup_and_ref(hashes)
        new_pages = self.pool.allocate(need)
        assert new_pages is not None and len(hit) * ps == nc
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += nc
        self.waiting.remove(req)
        del self._wait_keys[req.request_id]
        if req.status is RequestStatus.WAITING:
            req.num_cached_tokens = nc  # NOTE: only the first admission counts for usage
        req.page_ids = hit + new_pages
        req.num_computed_tokens = nc
        req.status = RequestStatus.RUNNING
        self._num_registered[req.request_id] = len(hit)
        self.running.append(req)
        return n

    def _grow_pages(self, req: Request, num_tokens: int) -> bool:
        """Make req.page_ids cover positions < num_tokens; False (no change) if pages are short."""
        need = math.ceil(num_tokens / self.config.page_size) - len(req.page_ids)
        if need <= 0:
            return True
        pages = self.pool.allocate(need)
        if pages is None:
            return False
        req.page_ids.extend(pages)
        return True

    def _victim_index(self) -> int:
        """Index in self.running of the lowest-priority, newest request."""
        run = self.running
        return max(range(len(run)), key=lambda j: (run[j].priority, run[j].arrival_time, j))

    def _preempt(self, index: int) -> None:
        """Recompute preemption: drop the KV and requeue at the front of its priority."""
        req = self.running.pop(index)
        self._free_pages(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(req, (req.priority, 0, 0.0, -next(self._seq)))

    def _push_waiting(self, req: Request, key: tuple[int, int, float, int]) -> None:
        # NOTE: key = (priority, band, arrival, seq). Preempted requests use band 0 and a
        # decreasing seq, so each goes to the front of the queue within its priority.
        self._wait_keys[req.request_id] = key
        bisect.insort(self.waiting, req, key=lambda r: self._wait_keys[r.request_id])

    def _free_pages(self, req: Request) -> None:
        self.pool.free(req.page_ids)
        req.page_ids = []
        self._num_registered[req.request_id] = 0

    def _page_hashes(self, req: Request, num_pages: int) -> list[int]:
        """Hashes of the request's first `num_pages` full pages, computed incrementally."""
        hashes = self._hashes.setdefault(req.request_id, [])
        if len(hashes) < num_pages:
            ps = self.config.page_size
            tokens = token_range(req, len(hashes) * ps, num_pages * ps)
            parent = hashes[-1] if hashes else None
            hashes.extend(self.pool.hash_pages(tokens, req.cache_salt, parent))
        return hashes[:num_pages]

    def _register_full_pages(self, req: Request) -> None:
        """Offer pages that became full (KV computed) to the prefix cache."""
        full = req.num_computed_tokens // self.config.page_size
        done = self._num_registered.get(req.request_id, 0)
        if full > done:
            hashes = self._page_hashes(req, full)
            self.pool.cache_pages(req.page_ids[done:full], hashes[done:full])
            self._num_registered[req.request_id] = full

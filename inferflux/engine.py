"""The synchronous engine: validates and admits requests, runs scheduler -> runner steps, and
turns sampled tokens into per-request text deltas (detokenization, stop conditions, logprobs).

`step()` returns DELTA outputs: each RequestOutput carries only what is new since the last
step (text, token ids, logprobs) for each of its n completions; `merge_delta` accumulates them.
The engine is single-threaded: `AsyncEngine` runs it on its own thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.typing import ArrayLike

from inferflux.config import EngineConfig
from inferflux.detokenizer import IncrementalDetokenizer
from inferflux.model_loader import load_model
from inferflux.outputs import CompletionOutput, Logprob, RequestOutput
from inferflux.request import Request, RequestStatus
from inferflux.runner import ModelRunner, StepResult
from inferflux.sampling import RowSampling
from inferflux.sampling_params import SamplingParams
from inferflux.scheduler import Scheduler, SchedulerConfig
from inferflux.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096


@dataclass
class _Sequence:
    """Host-side state of one of a prompt's n completions."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    emitted_logprobs: int = 0
    finish_reason: str | None = None
    final_emitted: bool = False


@dataclass
class _Parent:
    """One added prompt: its n sequences and what the caller gave."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    arrival_time: float
    first_token_time: float | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # filled as prefill runs
    prompt_logprobs_emitted: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


@dataclass
class PreparedRequest:
    """A validated, tokenized prompt, ready for `LLMEngine.submit` (built off the engine thread)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seeds: list[int]
    cache_salt: str | None
    priority: int
    arrival_time: float


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        cache_dir = config.resolved_compilation_cache_dir()
        if cache_dir and not getattr(jax.config, "jax_compilation_cache_dir", None):
            # NOTE: restarts then load the compiled step buckets instead of recompiling them
            # (~10 s -> ~1 s for the tiny model on 2 cores). An explicitly configured JAX
            # cache (JAX_COMPILATION_CACHE_DIR) wins.
            jax.config.update("jax_compilation_cache_dir", cache_dir)
        self.model = load_model(config.model, config.dtype)
        self.tokenizer = Tokenizer.from_pretrained(config.tokenizer or config.model)
        model_cfg = self.model.config
        self.vocab_size = int(model_cfg.vocab_size)
        self.eos_token_ids = _eos_token_ids(Path(config.model), self.tokenizer)
        self.max_model_len = config.max_model_len or min(
            int(model_cfg.max_position_embeddings), DEFAULT_MAX_MODEL_LEN
        )
        self.num_pages = self._resolve_num_pages(model_cfg)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                page_size=config.page_size,
                num_pages=self.num_pages,
                enable_prefix_caching=config.enable_prefix_caching,
            )
        )
        self.runner = ModelRunner(
            self.model,
            num_pages=self.num_pages,
            page_size=config.page_size,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            token_buckets=config.resolved_token_buckets(),
        )
        self.warm_up_seconds = self.runner.warm_up()
        self._parents: dict[str, _Parent] = {}
        self._by_child: dict[str, tuple[_Parent, _Sequence]] = {}
        self._seed_rng = np.random.default_rng(config.seed)
        self._ids = itertools.count()

    def _resolve_num_pages(self, model_cfg: Any) -> int:
        ps = self.config.page_size
        per_seq = -(-self.max_model_len // ps)
        if self.config.num_pages is not None:
            if self.config.num_pages < per_seq + 1:
                raise ValueError(
                    f"num_pages ({self.config.num_pages}) cannot hold one max_model_len "
                    f"({self.max_model_len}) sequence: need at least {per_seq + 1} pages of {ps}"
                )
            return self.config.num_pages
        itemsize = np.dtype(self.model.dtype).itemsize
        page_bytes = 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim * ps
        budget_pages = self.config.kv_cache_bytes // (page_bytes * itemsize)
        return int(max(min(self.config.max_num_seqs * per_seq, budget_pages), per_seq) + 1)

    # ---- requests -----------------------------------------------------------------------
    def prepare_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        cache_salt: str | None = None,
        priority: int = 0,
    ) -> PreparedRequest:
        """Validates and tokenizes; raises ValueError naming the field. Thread-safe."""
        params = params or SamplingParams()
        params.validate()
        params.validate_for_model(self.vocab_size)
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
            for i, tok in enumerate(token_ids):
                if isinstance(tok, bool) or not isinstance(tok, int | np.integer):
                    raise ValueError(f"prompt_token_ids[{i}] must be an integer, got {tok!r}")
                if not 0 <= tok < self.vocab_size:
                    raise ValueError(
                        f"prompt_token_ids[{i}] = {tok} is out of the vocabulary "
                        f"[0, {self.vocab_size})"
                    )
            token_ids = [int(t) for t in token_ids]
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens, but max_model_len is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one output token"
            )
        room = self.max_model_len - len(token_ids)
        max_tokens = min(params.max_tokens or room, room)
        if params.seed is not None:
            seeds = [params.seed + i for i in range(params.n)]
        else:
            seeds = [int(s) for s in self._seed_rng.integers(0, 2**31, size=params.n)]
        return PreparedRequest(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt=text,
            prompt_token_ids=token_ids,
            params=params,
            max_tokens=max_tokens,
            seeds=seeds,
            cache_salt=cache_salt,
            priority=priority,
            arrival_time=time.monotonic(),
        )

    def submit(self, prep: PreparedRequest) -> None:
        """Queues a prepared request (engine thread only)."""
        if prep.request_id in self._parents:
            raise ValueError(f"request_id {prep.request_id!r} is already in use")
        group = prep.request_id if prep.params.n > 1 else None
        sequences = []
        for i in range(prep.params.n):
            child_id = prep.request_id if prep.params.n == 1 else f"{prep.request_id}#{i}"
            req = Request(
                request_id=child_id,
                prompt_token_ids=prep.prompt_token_ids,
                sampling_params=prep.params,
                max_tokens=prep.max_tokens,
                eos_token_ids=self.eos_token_ids,
                seed=prep.seeds[i],
                group_id=group,
                cache_salt=prep.cache_salt,
                priority=prep.priority,
                arrival_time=prep.arrival_time,
            )
            detok = IncrementalDetokenizer(
                self.tokenizer, prep.prompt_token_ids, prep.params.skip_special_tokens
            )
            sequences.append(_Sequence(i, req, detok))
        parent = _Parent(
            prep.request_id,
            prep.prompt,
            prep.prompt_token_ids,
            prep.params,
            sequences,
            prep.arrival_time,
        )
        self._parents[prep.request_id] = parent
        for seq in sequences:
            self._by_child[seq.request.request_id] = (parent, seq)
            self.scheduler.add_request(seq.request)

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> str:
        prep = self.prepare_request(request_id, prompt, params, **kwargs)
        self.submit(prep)
        return prep.request_id

    def abort_request(self, request_id: str) -> bool:
        """Drops a request (queued or running) and frees its pages now."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return False
        for seq in parent.sequences:
            self._by_child.pop(seq.request.request_id, None)
            if not seq.request.finished:
                self.scheduler.abort_request(seq.request.request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self._parents and not self.scheduler.has_unfinished_requests():
                raise RuntimeError("engine has requests the scheduler does not know")
            return []
        rows = [
            RowSampling.from_request(s.request) if s.will_sample else None for s in sched.scheduled
        ]
        result = self.runner.execute(self.runner.prepare(sched, rows))
        if result.prompt is not None:
            self._record_prompt_logprobs(sched.scheduled, result)
        row_of = {id(s.request): i for i, s in enumerate(sched.scheduled)}
        touched: dict[str, _Parent] = {}
        now = time.monotonic()
        for req in self.scheduler.update_after_step(sched):
            parent, seq = self._by_child[req.request_id]
            self._append_token(parent, seq, result, row_of[id(req)])
            if parent.first_token_time is None:
                parent.first_token_time = now
            touched[parent.request_id] = parent
        return [self._delta_output(p) for p in touched.values()]

    def _append_token(self, parent: _Parent, seq: _Sequence, res: StepResult, row: int) -> None:
        req, params = seq.request, parent.params
        token = int(res.token_ids[row])
        req.output_token_ids.append(token)
        if params.logprobs is not None:
            k = params.logprobs
            seq.logprobs.append(
                self._logprob_entry(
                    token,
                    res.logprobs[row],
                    res.ranks[row],
                    res.top_ids[row, :k],
                    res.top_logprobs[row, :k],
                )
            )
        n_out = req.num_output_tokens
        # NOTE: the stop token itself is not detokenized; text held back (an incomplete
        # character) is flushed so the text equals the full decode.
        if token in req.eos_token_ids and not params.ignore_eos:
            seq.text += seq.detokenizer.flush()
            return self._finish(seq, RequestStatus.FINISHED_STOPPED, None)
        if params.stop_token_ids and token in params.stop_token_ids:
            seq.text += seq.detokenizer.flush()
            return self._finish(seq, RequestStatus.FINISHED_STOPPED, token)
        before = len(seq.text)
        seq.text += seq.detokenizer.add_tokens([token])
        if params.stop_strings and n_out >= params.min_tokens:
            search_from = max(0, before - params.max_stop_len + 1)
            hit = _find_stop(seq.text, params.stop_strings, search_from)
            if hit is not None:
                start, stop = hit
                keep = start + len(stop) if params.include_stop_str_in_output else start
                seq.text = seq.text[:keep]
                return self._finish(seq, RequestStatus.FINISHED_STOPPED, stop)
        if n_out >= req.max_tokens:
            seq.text += seq.detokenizer.flush()
            self._finish(seq, RequestStatus.FINISHED_LENGTH, None)

    def _record_prompt_logprobs(self, scheduled: list[Any], result: StepResult) -> None:
        """Prompt token p + 1 is scored by the logits at position p (packed at start + p - nc)."""
        prompt_lp = result.prompt
        assert prompt_lp is not None
        start = 0
        for item in scheduled:
            req, first, n = item.request, item.num_computed_tokens, item.num_new_tokens
            k = req.sampling_params.prompt_logprobs
            parent, seq = self._by_child.get(req.request_id, (None, None))
            if k is not None and parent is not None and seq is not None and seq.index == 0:
                entries = parent.prompt_logprobs
                if entries is None:
                    entries = parent.prompt_logprobs = [None]
                prompt = req.prompt_token_ids
                # NOTE: positions recorded before a preemption are not recorded twice.
                for p in range(max(first, len(entries) - 1), min(first + n, len(prompt) - 1)):
                    t = start + p - first
                    entries.append(
                        self._logprob_entry(
                            prompt[p + 1],
                            prompt_lp.target_logprobs[t],
                            prompt_lp.target_ranks[t],
                            prompt_lp.top_ids[t, :k],
                            prompt_lp.top_logprobs[t, :k],
                        )
                    )
            start += n

    def _finish(self, seq: _Sequence, status: RequestStatus, reason: int | str | None) -> None:
        seq.finish_reason = status.value
        seq.request.stop_reason = reason
        self.scheduler.finish_request(seq.request.request_id, status)

    def _logprob_entry(
        self,
        token: int,
        logprob: ArrayLike,  # []
        rank: ArrayLike,  # []
        top_ids: ArrayLike,  # [K]
        top_logprobs: ArrayLike,  # [K]
    ) -> dict[int, Logprob]:
        """The chosen token and its top alternatives (host copies of step outputs), by id."""
        entry = {
            token: Logprob(
                float(np.asarray(logprob)), int(np.asarray(rank)), self._token_text(token)
            )
        }
        alternatives = zip(np.asarray(top_ids), np.asarray(top_logprobs), strict=True)
        for alt_rank, (tid, lp) in enumerate(alternatives, start=1):
            if int(tid) not in entry:
                entry[int(tid)] = Logprob(float(lp), alt_rank, self._token_text(int(tid)))
        return entry

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _delta_output(self, parent: _Parent) -> RequestOutput:
        outs = []
        for seq in parent.sequences:
            if seq.final_emitted:
                continue
            finished = seq.finish_reason is not None
            held = 0
            if not finished and parent.params.stop_strings:
                # NOTE: hold back a possible stop-string prefix until it is resolved.
                held = parent.params.max_stop_len - 1
            upto = max(seq.emitted_chars, len(seq.text) - held)
            text = seq.text[seq.emitted_chars : upto]
            seq.emitted_chars = upto
            tokens = seq.request.output_token_ids[seq.emitted_tokens :]
            seq.emitted_tokens = seq.request.num_output_tokens
            logprobs = None
            if parent.params.logprobs is not None:
                logprobs = seq.logprobs[seq.emitted_logprobs :]
                seq.emitted_logprobs = len(seq.logprobs)
            seq.final_emitted = finished
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(tokens),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.request.stop_reason if finished else None,
                    logprobs=logprobs,
                )
            )
        finished = parent.finished
        if finished:
            self._parents.pop(parent.request_id, None)
            for seq in parent.sequences:
                self._by_child.pop(seq.request.request_id, None)
        prompt_logprobs = None
        entries = parent.prompt_logprobs
        if (
            entries is not None
            and not parent.prompt_logprobs_emitted
            and len(entries) == len(parent.prompt_token_ids)
        ):
            prompt_logprobs, parent.prompt_logprobs_emitted = entries, True
        metrics = {"arrival_time": parent.arrival_time}
        if parent.first_token_time is not None:
            metrics["first_token_time"] = parent.first_token_time
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outs,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=min(s.request.num_cached_tokens for s in parent.sequences),
            metrics=metrics,
        )


def merge_delta(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Accumulates DELTA outputs into one cumulative RequestOutput."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [])
    by_index = {o.index: o for o in acc.outputs}
    for d in delta.outputs:
        cur = by_index.get(d.index)
        if cur is None:
            cur = CompletionOutput(d.index, "", [], logprobs=[] if d.logprobs is not None else None)
            by_index[d.index] = cur
        cur.text += d.text
        cur.token_ids.extend(d.token_ids)
        if d.logprobs is not None and cur.logprobs is not None:
            cur.logprobs.extend(d.logprobs)
        cur.finish_reason = d.finish_reason
        cur.stop_reason = d.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished = delta.finished
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    acc.num_cached_tokens = delta.num_cached_tokens
    acc.metrics.update(delta.metrics)
    return acc


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for stop in stops:
        i = text.find(stop, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def _eos_token_ids(folder: Path, tokenizer: Tokenizer) -> frozenset[int]:
    """EOS ids: generation_config.json's eos_token_id (int or list) plus the tokenizer's."""
    ids: set[int] = set()
    path = folder / "generation_config.json"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)

"""One generation request as the scheduler and engine see it (plain Python, no JAX)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from inferflux.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False)
class Request:
    """A single sequence. `n > 1` prompts become n Requests that share `group_id`.

    Token bookkeeping follows vLLM v1: `num_computed_tokens` tokens of `all_token_ids` have KV in
    the cache; the scheduler hands out the rest under a token budget. A request samples a new
    token in a step iff that step brings `num_computed_tokens` up to `num_tokens`.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never past max_model_len
    eos_token_ids: frozenset[int] = frozenset()
    seed: int = 0  # resolved: the request's own or one drawn by the engine
    group_id: str | None = None  # n-sample siblings share the prompt's pages
    cache_salt: str | None = None  # prefix-cache namespace (tenant); None: shared default
    priority: int = 0  # lower runs first (vLLM convention); FCFS within a priority
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    page_ids: list[int] = field(default_factory=list)  # the block table, in token order
    stop_reason: int | str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status.finished

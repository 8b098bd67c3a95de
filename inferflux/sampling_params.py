"""Per-request sampling settings, validated once with errors that name the field and the bound."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# NOTE: OpenAI caps top_logprobs at 20 and logit_bias at 300 entries; the jitted step has fixed
# array widths for both, so the caps live here where validation happens.
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300


@dataclass
class SamplingParams:
    """How to pick the tokens of one request (vLLM's names and defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: the sampled token plus k alternatives
    prompt_logprobs: int | None = None  # None: off; k: each prompt token plus k alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strings: tuple[str, ...] = field(init=False, default=())
    max_stop_len: int = field(init=False, default=0)  # longest stop string, 0 if none

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_strings = (self.stop,)
        elif self.stop is None:
            self.stop_strings = ()
        else:
            self.stop_strings = tuple(self.stop)
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()
        self.max_stop_len = max((len(s) for s in self.stop_strings), default=0)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self) -> None:
        """Model-independent checks; raises ValueError naming the field and the bound."""
        _check_int("n", self.n, lo=1, hi=128)
        _check_float("temperature", self.temperature, lo=0.0, hi=100.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=0, hi=1 << 30)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, hi=100.0, lo_open=True)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1, hi=1 << 30)
        _check_int("min_tokens", self.min_tokens, lo=0, hi=1 << 30)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(1 << 63), hi=(1 << 64) - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, "
                    f"got {len(self.logit_bias)}"
                )
            for token_id, bias in self.logit_bias.items():
                _check_float(f"logit_bias[{token_id}]", bias, lo=-100.0, hi=100.0)
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop_strings) > 16:
            raise ValueError(f"stop may have at most 16 strings, got {len(self.stop_strings)}")

    def validate_for_model(self, vocab_size: int) -> None:
        """Checks that need the model: token ids inside the vocabulary."""
        for token_id in self.logit_bias or {}:
            if not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"logit_bias key {token_id} is out of the vocabulary [0, {vocab_size})"
                )
        for token_id in self.stop_token_ids or []:
            if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"stop_token_ids entry {token_id} is out of the vocabulary [0, {vocab_size})"
                )


def _check_int(name: str, value: object, *, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _check_float(name: str, value: object, *, lo: float, hi: float, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or v > hi or v < lo or (lo_open and v == lo):
        low = f"({lo}" if lo_open else f"[{lo}"
        raise ValueError(f"{name} must be in {low}, {hi}], got {value}")

"""The offline API for notebooks and batch jobs: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from inferflux.config import EngineConfig
from inferflux.engine import LLMEngine, PreparedRequest, merge_delta
from inferflux.outputs import RequestOutput
from inferflux.sampling_params import SamplingParams
from inferflux.tokenizer import Tokenizer

PromptInput = str | list[int] | dict[str, Any]


class LLM:
    """An engine for offline use. Keyword arguments are `EngineConfig` fields."""

    def __init__(self, model: str, **engine_args: Any):
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_args))

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings, token-id lists, or
        dicts with `prompt` or `prompt_token_ids`. Everything is validated before anything runs."""
        batch = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(batch))
        prepared = [
            self.engine.prepare_request(None, _prompt_value(p, i), sp)
            for i, (p, sp) in enumerate(zip(batch, params, strict=True))
        ]
        return self._run(prepared, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Renders each conversation with the checkpoint's chat template, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts: list[PromptInput] = []
        for conv in conversations:
            text = tok.apply_chat_template(
                list(conv),  # type: ignore[arg-type]
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                **(chat_template_kwargs or {}),
            )
            # NOTE: the template already wrote BOS where it wants one.
            prompts.append(tok.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, prepared: list[PreparedRequest], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        order = {p.request_id: i for i, p in enumerate(prepared)}
        results: list[RequestOutput | None] = [None] * len(prepared)
        for prep in prepared:
            engine.submit(prep)
        bar = tqdm(total=len(prepared), desc="Generating", disable=not use_tqdm, unit="prompt")
        try:
            while any(r is None or not r.finished for r in results):
                for delta in engine.step():
                    i = order.get(delta.request_id)
                    if i is None:
                        continue
                    results[i] = merge_delta(results[i], delta)
                    if delta.finished:
                        bar.update(1)
        except BaseException:
            for prep in prepared:
                engine.abort_request(prep.request_id)
            raise
        finally:
            bar.close()
        return [r for r in results if r is not None]


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, str | dict):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _prompt_value(prompt: PromptInput, i: int) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return str(prompt["prompt"])
        raise ValueError(f"prompts[{i}] needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return prompt
    raise ValueError(
        f"prompts[{i}] must be a string or a list of token ids, got {type(prompt).__name__}"
    )


def _per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    plist = list(params)
    if len(plist) != n:
        raise ValueError(f"got {len(plist)} sampling_params for {n} prompts")
    return plist

"""Chat-template rendering in a sandboxed Jinja2 environment, the way transformers does it.

Templates come with checkpoints from the Hub and are untrusted code: they are rendered in
`jinja2.sandbox.ImmutableSandboxedEnvironment`, with only plain JSON-like data (dicts, lists,
str, int, float, bool, None) as inputs. The environment matches transformers'
`apply_chat_template`: trim_blocks and lstrip_blocks, the loop-controls extension, the
`raise_exception(msg)` and `strftime_now(fmt)` globals, a `tojson` filter that keeps non-ASCII
text, a `dict(...)` constructor and a `namespace(...)` that refuses underscore names.
Each distinct template is compiled once (cache keyed by its text). Rendering is thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render_chat", "compile_chat_template"]


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or called `raise_exception`."""


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """What `raise_exception` raises inside a template (its message is the template's own)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # NOTE: jinja's own tojson HTML-escapes '<', '>', '&' and "'"; chat templates expect
    # plain json.dumps output (as transformers renders it).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """`dict(...)` inside templates: builds plain dicts, exposes nothing else."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses attribute names starting with '_'."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's signature trick)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore attributes on a namespace: {name!r}"
            )


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but reaching for an unsafe attribute fails at once.

    NOTE: jinja's sandbox answers `''.__class__` with an undefined value that renders as ''.
    Failing loudly instead turns every escape attempt into a ChatTemplateError.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
        )


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
        undefined=jinja2.Undefined,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _SafeNamespace
    return env


_ENV = _make_environment()


@lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile `template` once (cached by its text); ChatTemplateError on a syntax error."""
    try:
        return _ENV.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from e


def _plain(value: Any) -> Any:
    """A copy of `value` made only of JSON-like types; anything else becomes '<TypeName>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)):
        return _plain(value.item())  # numpy scalars
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain-data copies of the messages, with None-valued keys dropped (as transformers does:
    many templates handle a missing key but print 'None' for a null one)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        plain = _plain(message)
        if not isinstance(plain, dict):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        out.append({k: v for k, v in plain.items() if v is not None})
    return out


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: list[dict[str, Any]] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with a chat template; ChatTemplateError on any template failure.

    Extra keyword arguments (e.g. `enable_thinking`, `documents`, `unk_token`) become template
    variables, like transformers' `chat_template_kwargs`.
    """
    compiled = compile_chat_template(template)
    variables = {k: _plain(v) for k, v in template_kwargs.items()}
    variables.setdefault("documents", None)
    try:
        return compiled.render(
            messages=_normalize_messages(messages),
            tools=_plain(tools),
            add_generation_prompt=bool(add_generation_prompt),
            bos_token=bos_token,
            eos_token=eos_token,
            **variables,
        )
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template error: {e.message}") from e
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e

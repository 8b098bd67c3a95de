"""Tokenizer wrapper over a local Hugging Face model folder (`tokenizers` or `sentencepiece`).

`Tokenizer.from_pretrained(folder)` picks the backend from the files present:
- `tokenizer.json`: the `tokenizers` library, set up the way transformers 5's generic
  `TokenizersBackend` does (the tokenizer.json post-processor alone decides BOS/EOS).
- `tokenizer.model` only: `sentencepiece`, Llama-2 style (BOS prepended unless
  `add_bos_token` is false; special tokens in the text are matched first and every chunk in
  between is encoded on its own, with its own dummy prefix, as the reference Llama-2 code does).

Thread safety: after construction a `Tokenizer` is read-only; `encode`, `decode` and the other
lookups may be called from several threads at once (both backends are immutable native objects
and nothing here mutates shared state after `from_pretrained`). Do not mutate its attributes.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# transformers writes this placeholder (int(1e30)) when a checkpoint has no length limit.
_UNSET_MAX_LENGTH = 10**20


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as an AddedToken dict ({"content": ...})."""
    if value is None:
        return None
    if isinstance(value, dict):
        content = value.get("content")
        return str(content) if content is not None else None
    return str(value)


@dataclass(frozen=True)
class AddedTokenSpec:
    """One entry of tokenizer_config.json `added_tokens_decoder`."""

    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False


@dataclass(frozen=True)
class TokenizerConfig:
    """What InferFlux reads from tokenizer_config.json (+ chat_template.jinja)."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool | None = None  # None: not set in the file
    add_eos_token: bool | None = None
    chat_template: str | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)  # named ones, incl. "default"
    added_tokens: dict[int, AddedTokenSpec] = field(default_factory=dict)
    model_max_length: int | None = None

    @classmethod
    def load(cls, folder: Path) -> TokenizerConfig:
        path = folder / "tokenizer_config.json"
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        templates = _parse_chat_templates(raw.get("chat_template"))
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.exists():
            # NOTE: as in transformers, a separate chat_template.jinja wins over the config's.
            templates["default"] = jinja_file.read_text(encoding="utf-8")
        added = {
            int(k): AddedTokenSpec(
                content=str(v["content"]),
                special=bool(v.get("special", True)),
                lstrip=bool(v.get("lstrip", False)),
                rstrip=bool(v.get("rstrip", False)),
                normalized=bool(v.get("normalized", False)),
                single_word=bool(v.get("single_word", False)),
            )
            for k, v in (raw.get("added_tokens_decoder") or {}).items()
        }
        max_len = raw.get("model_max_length")
        if not isinstance(max_len, (int, float)) or max_len >= _UNSET_MAX_LENGTH:
            max_len = None
        return cls(
            bos_token=_token_content(raw.get("bos_token")),
            eos_token=_token_content(raw.get("eos_token")),
            pad_token=_token_content(raw.get("pad_token")),
            unk_token=_token_content(raw.get("unk_token")),
            add_bos_token=_opt_bool(raw.get("add_bos_token")),
            add_eos_token=_opt_bool(raw.get("add_eos_token")),
            chat_template=templates.get("default"),
            chat_templates=templates,
            added_tokens=added,
            model_max_length=int(max_len) if max_len is not None else None,
        )


def _opt_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _parse_chat_templates(value: Any) -> dict[str, str]:
    """`chat_template` is a string or a list of {"name", "template"}; return them by name."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {str(t["name"]): str(t["template"]) for t in value if "name" in t}
    raise ValueError(f"tokenizer_config.json: unsupported chat_template of type {type(value)}")


class Tokenizer(ABC):
    """Encode/decode text for one model; build with `Tokenizer.from_pretrained(folder)`."""

    def __init__(self, folder: Path, config: TokenizerConfig) -> None:
        self.folder = folder
        self.config = config

    @staticmethod
    def from_pretrained(folder: str | Path) -> Tokenizer:
        """Load the tokenizer of a local HF model folder (tokenizer.json, else tokenizer.model)."""
        folder = Path(folder)
        config = TokenizerConfig.load(folder)
        if (folder / "tokenizer.json").exists():
            return HFTokenizer(folder, config)
        if (folder / "tokenizer.model").exists():
            return SentencePieceTokenizer(folder, config)
        raise FileNotFoundError(
            f"no tokenizer in {folder}: expected 'tokenizer.json' or 'tokenizer.model'"
        )

    # --- backend-specific -------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in the text become their ids."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (incomplete UTF-8 at the end shows as U+FFFD)."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary string of one id (raw piece, e.g. 'Ġthe' or '▁the'), None if unknown."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary string, None if absent."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids including added tokens (max id + 1)."""

    @property
    @abstractmethod
    def all_special_ids(self) -> set[int]:
        """Ids of special tokens (bos/eos/pad/unk and added tokens marked special)."""

    # --- shared -----------------------------------------------------------------------------
    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Raw pieces of `ids` ('' for an id outside the vocabulary)."""
        return [self.id_to_piece(int(i)) or "" for i in ids]

    @property
    def bos_token(self) -> str | None:
        return self.config.bos_token

    @property
    def eos_token(self) -> str | None:
        return self.config.eos_token

    @property
    def pad_token(self) -> str | None:
        return self.config.pad_token

    @property
    def unk_token(self) -> str | None:
        return self.config.unk_token

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    @property
    def chat_template(self) -> str | None:
        return self.config.chat_template

    @property
    def model_max_length(self) -> int | None:
        """tokenizer_config.json `model_max_length`, None when unset."""
        return self.config.model_max_length

    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens as template variables (bos_token, eos_token, ...)."""
        named = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        return {k: v for k, v in named.items() if v is not None}

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the checkpoint's chat template (or `chat_template`: a name
        from the checkpoint's named templates, or a template string). ValueError if none."""
        from inferflux.chat_template import render_chat

        template = self._pick_template(chat_template, tools)
        variables: dict[str, Any] = {**self.special_tokens_map(), **kwargs}
        variables.setdefault("bos_token", "")
        variables.setdefault("eos_token", "")
        return render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **variables,
        )

    def _pick_template(self, chat_template: str | None, tools: list[dict[str, Any]] | None) -> str:
        named = self.config.chat_templates
        if chat_template is not None:
            return named.get(chat_template, chat_template)
        if tools and "tool_use" in named:
            return named["tool_use"]
        if "default" in named:
            return named["default"]
        if named:
            raise ValueError(
                f"the checkpoint in {self.folder} has named chat templates {sorted(named)} but no "
                "'default'; pass chat_template=<name>"
            )
        raise ValueError(
            f"the checkpoint in {self.folder} has no chat template (tokenizer_config.json "
            "'chat_template' or chat_template.jinja); pass one explicitly"
        )


def special_token_pattern(tokens: Sequence[str]) -> re.Pattern[str] | None:
    """A regex matching any of `tokens` (longest first), or None if there are none."""
    uniq = sorted({t for t in tokens if t}, key=len, reverse=True)
    if not uniq:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in uniq) + ")")


class HFTokenizer(Tokenizer):
    """A tokenizer.json tokenizer (Hugging Face `tokenizers`), as transformers 5 loads it."""

    def __init__(self, folder: Path, config: TokenizerConfig) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        super().__init__(folder, config)
        tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        # NOTE: transformers only truncates/pads when asked; tokenizer.json may enable both.
        tok.no_truncation()
        tok.no_padding()
        for _, spec in sorted(config.added_tokens.items()):
            if tok.token_to_id(spec.content) is None:
                added = AddedToken(
                    spec.content,
                    single_word=spec.single_word,
                    lstrip=spec.lstrip,
                    rstrip=spec.rstrip,
                    normalized=spec.normalized,
                    special=spec.special,
                )
                tok.add_tokens([added])
        for name in (config.bos_token, config.eos_token, config.unk_token, config.pad_token):
            if name is not None and tok.token_to_id(name) is None:
                tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        # NOTE: transformers 5 (generic TokenizersBackend) lets tokenizer.json's post-processor
        # alone decide BOS/EOS; tokenizer_config.json add_bos_token/add_eos_token are ignored
        # (checked against AutoTokenizer in tests). Model-specific transformers classes that
        # rebuild the pipeline (e.g. LlamaTokenizer) are not replicated.
        self._tok = tok
        self._vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        for name in (config.bos_token, config.eos_token, config.unk_token, config.pad_token):
            if name is not None and (tid := tok.token_to_id(name)) is not None:
                specials.add(tid)
        self._special_ids = frozenset(specials)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        valid = [int(i) for i in ids if 0 <= int(i) < self._vocab_size]
        return str(self._tok.decode(valid, skip_special_tokens=skip_special_tokens))

    def id_to_piece(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id)) if token_id >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def all_special_ids(self) -> set[int]:
        return set(self._special_ids)


class SentencePieceTokenizer(Tokenizer):
    """A tokenizer.model (SentencePiece) tokenizer, Llama-2 style."""

    def __init__(self, folder: Path, config: TokenizerConfig) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))

        def model_piece(index: int) -> str | None:
            return sp.id_to_piece(index) if index >= 0 else None

        config = replace(
            config,
            bos_token=config.bos_token or model_piece(sp.bos_id()),
            eos_token=config.eos_token or model_piece(sp.eos_id()),
            unk_token=config.unk_token or model_piece(sp.unk_id()),
            pad_token=config.pad_token or model_piece(sp.pad_id()),
        )
        super().__init__(folder, config)
        self._sp = sp
        self._num_pieces = int(sp.get_piece_size())
        self._added_by_id = {i: spec.content for i, spec in config.added_tokens.items()}
        self._added = {content: i for i, content in self._added_by_id.items()}
        self._add_bos = config.add_bos_token is not False  # Llama-2 default: True
        self._add_eos = bool(config.add_eos_token)
        named = [config.bos_token, config.eos_token, config.unk_token, config.pad_token]
        specials = {i for i, spec in config.added_tokens.items() if spec.special}
        specials |= {i for i in range(self._num_pieces) if sp.is_control(i)}
        specials |= {t for n in named if n is not None and (t := self.token_to_id(n)) is not None}
        self._special_ids = frozenset(specials)
        self._split = special_token_pattern([n for n in named if n is not None] + list(self._added))
        self._vocab_size = max([self._num_pieces - 1, *self._added_by_id]) + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        bos, eos = self.bos_token_id, self.eos_token_id
        if add_special_tokens and self._add_bos and bos is not None:
            ids.append(bos)
        chunks = self._split.split(text) if self._split is not None else [text]
        for k, chunk in enumerate(chunks):
            if k % 2 == 1:  # a matched special/added token (capturing group)
                tid = self.token_to_id(chunk)
                assert tid is not None
                ids.append(tid)
            elif chunk:
                # NOTE: each chunk gets its own dummy prefix, as Meta's Llama-2 code (and
                # transformers' legacy mode) encode the text between special tokens.
                ids.extend(self._sp.encode(chunk))
        if add_special_tokens and self._add_eos and eos is not None:
            ids.append(eos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []  # plain SentencePiece ids decoded together
        for raw in ids:
            i = int(raw)
            is_special = i in self._special_ids
            if not is_special and i not in self._added_by_id and 0 <= i < self._num_pieces:
                run.append(i)
                continue
            if run:
                parts.append(self._sp.decode(run))
                run = []
            if is_special and skip_special_tokens:
                continue
            parts.append(self.id_to_piece(i) or "")
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def id_to_piece(self, token_id: int) -> str | None:
        if token_id in self._added_by_id:
            return self._added_by_id[token_id]
        if 0 <= token_id < self._num_pieces:
            return str(self._sp.id_to_piece(int(token_id)))
        return None

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        tid = int(self._sp.piece_to_id(token))
        # NOTE: piece_to_id answers unk_id for unknown pieces.
        if tid == self._sp.unk_id() and self._sp.id_to_piece(tid) != token:
            return None
        return tid

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def all_special_ids(self) -> set[int]:
        return set(self._special_ids)

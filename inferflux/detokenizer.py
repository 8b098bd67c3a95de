"""Incremental detokenization: turn generated token ids into text deltas as they arrive.

The text of a token depends on its neighbours (SentencePiece drops the leading space of the
first piece it decodes; byte-level BPE and byte-fallback tokens may hold a part of a UTF-8
character), so each step decodes a short window twice: from `prefix_offset` to
`read_offset` (text already emitted) and from `prefix_offset` to the end. The delta is what
the second has beyond the first. The window starts on the last few prompt tokens and slides
forward after every emitted delta, so a step costs O(1) in the length of the sequence.

Text that ends with U+FFFD (an incomplete character) is held back until a later token
completes it. One detokenizer serves one request and is not thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferflux.tokenizer import Tokenizer

# Prompt tokens used as decoding context. NOTE: 5 is enough for any SentencePiece word
# boundary and for a 4-byte UTF-8 character split into single-byte tokens.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"
# NOTE: a UTF-8 character spans at most 4 byte tokens, so text that still ends in U+FFFD
# after this many held tokens is almost surely invalid bytes, not a character in progress; it
# is then emitted as is. The same bound applies to runs of tokens that decode to nothing
# (skipped special tokens), so the decoded window, and the cost of a step, stay O(1).
_MAX_HOLD_TOKENS = 16


class IncrementalDetokenizer:
    """Streams the text of generated tokens; `add_tokens` returns each new delta."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only the prompt's tail is kept: all later decodes look at most this far back.
        context = [int(t) for t in prompt_token_ids[-_CONTEXT_TOKENS:]]
        self._ids: list[int] = context  # context + generated ids not yet out of the window
        self._prefix_offset = 0  # window start (index into self._ids)
        self._read_offset = len(context)  # ids before this are already emitted
        self._pieces: list[str] = []
        self._output_text: str | None = ""
        self.num_output_tokens = 0

    @property
    def output_text(self) -> str:
        """All text emitted so far (the concatenation of the deltas)."""
        if self._output_text is None:
            self._output_text = "".join(self._pieces)
            self._pieces = [self._output_text]
        return self._output_text

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly complete text (possibly "")."""
        if not new_ids:
            return ""
        self._ids.extend(int(t) for t in new_ids)
        self.num_output_tokens += len(new_ids)
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], skip)
        full_text = decode(self._ids[self._prefix_offset :], skip)
        lag = len(self._ids) - self._read_offset
        if full_text.endswith(_REPLACEMENT) and lag < _MAX_HOLD_TOKENS:
            return ""  # the last character is still incomplete: wait for more tokens
        # NOTE: full_text normally starts with prefix_text; when it does not (a decoder that
        # rewrites earlier text), the part past the old length is still the best delta, since
        # emitted text cannot be taken back.
        delta = full_text[len(prefix_text) :]
        if not delta and lag < _MAX_HOLD_TOKENS:
            return ""  # e.g. skipped special tokens: keep them in the window for context
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._compact()
        if delta:
            self._pieces.append(delta)
            self._output_text = None
        return delta

    def flush(self) -> str:
        """At the end of generation: emit whatever is still held back (an incomplete
        character decodes to U+FFFD, as the full decode shows it)."""
        if self._read_offset >= len(self._ids):
            return ""
        skip = self.skip_special_tokens
        prefix_text = self.tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], skip
        )
        full_text = self.tokenizer.decode(self._ids[self._prefix_offset :], skip)
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
            self._output_text = None
        return delta

    def _compact(self) -> None:
        """Drop ids before the window so memory stays bounded on long generations."""
        if self._prefix_offset > 64:
            drop = self._prefix_offset
            del self._ids[:drop]
            self._prefix_offset -= drop
            self._read_offset -= drop

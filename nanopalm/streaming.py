"""Decoding tokens to text while they are generated, without ever printing half a character.

A token need not end on a character boundary: GPT-2's byte-level BPE and the byte-fallback pieces of
the `palm` SentencePiece vocabulary can split one multi-byte UTF-8 character (an emoji is 4 bytes)
over several tokens. Decoding such a token alone gives U+FFFD, the replacement character, where the
unfinished character is. So the stream decodes the whole sequence and holds back a trailing U+FFFD
until the next token completes the character (or `flush` says nothing more is coming).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """Feed token ids with `push`; each call returns only the newly completed text.

    The pieces it returns, joined and followed by `flush()`, are exactly `decode(all ids)`.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(self.ids) already returned

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        # Whole-sequence decoding: O(length) a token, cheap next to a forward pass, and it lets the
        # tokenizer handle what depends on context (SentencePiece's spaces, byte runs).
        text = self.decode(self.ids).rstrip(REPLACEMENT_CHAR)
        new = text[self.emitted:]
        self.emitted += len(new)
        return new

    def flush(self) -> str:
        """The held-back rest: a character that never completed stays a U+FFFD, as in decode."""
        text = self.decode(self.ids)
        new = text[self.emitted:]
        self.emitted += len(new)
        return new

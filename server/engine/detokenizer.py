"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a UTF-8 character, and never the start of
what might become a stop string (those characters are held back until they are known not to
be one). When a stop string appears, the text is cut before it (OpenAI semantics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # all decoded text so far (cut at a stop string once one is found)
        self.num_emitted_chars = 0
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly final text (possibly empty)."""
        self.token_ids.append(token_id)
        self.text += self._decode_new()
        if self.stop and self._cut_at_stop():
            self.stopped = True
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """Everything still held back, at the end of the sequence (an incomplete character too)."""
        if not self.stopped:
            self.text += self._decode_new(force=True)
        return self._release(final=True)

    def _decode_new(self, force: bool = False) -> str:
        ids = self.token_ids
        prefix = self._decode(ids[self._prefix_offset : self._read_offset])
        full = self._decode(ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not force):
            return ""  # no new complete characters yet
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return full[len(prefix) :]

    def _decode(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        # decode's type covers batches too (-> list[str]); one list of ids decodes to one string
        assert isinstance(text, str)
        return text

    def _cut_at_stop(self) -> bool:
        longest = max(len(s) for s in self.stop)
        search_from = max(0, self.num_emitted_chars - longest)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final or not self.stop else len(self.text) - self._held_back()
        end = max(end, self.num_emitted_chars)
        delta = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:size]):
                    best = size
                    break
        return best

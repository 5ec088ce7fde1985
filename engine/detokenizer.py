"""Incremental detokenization with stop strings.

Decoding only a short window of recent tokens each step keeps this O(1) per token; text
is released only once the window decodes without a dangling U+FFFD (a multi-byte character
split across tokens), and the tail that could still grow into a stop string is held back.
"""
from __future__ import annotations

import re

from engine.request import Request

_CONTEXT = 5  # prompt tokens decoded before the output, so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, req: Request) -> None:
        self.tokenizer = tokenizer
        self.stop = req.sampling_params.stop
        # one automaton for every stop string: the earliest match (the longest one there)
        self._stop_re = re.compile("|".join(re.escape(s) for s in sorted(self.stop, key=len, reverse=True))) \
            if self.stop else None
        self.include_stop = req.sampling_params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids = list(req.prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        # Where transformers' decode is exactly its Rust tokenizer's (no clean-up of spaces),
        # that is called directly: the Python wrapper cost more than the decoding (~10 us a token).
        backend = getattr(tokenizer, "_tokenizer", None)
        exact = backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False
        self._decoder = backend if exact else tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=True)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Appends one token's text. With `check_stop`, returns the stop string if the new
        text completes one (the text is then cut before it, or after it with
        include_stop_str_in_output); text added without it is never searched again."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        start = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self._stop_re is not None and check_stop:
            return self._check_stop(start)
        return None

    def _check_stop(self, new_from: int) -> str | None:
        match = self._stop_re.search(self.text, max(0, new_from - self.hold))
        if match is None:
            return None
        idx, s = match.start(), match.group()
        self.text = self.text[:idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def releasable(self, finished: bool) -> str:
        """Text safe to stream now: all of it once finished, else minus a possible stop prefix."""
        if finished or not self.hold:
            return self.text
        return self.text[:max(0, len(self.text) - self.hold)]

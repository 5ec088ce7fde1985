"""An agent program's next call continues its last call token for token.

A call that ends in a tool call comes back as the next call's prompt: the chat template
renders the reply as the same text (tool_formats and the grammar's fixed JSON separators
see to that), but tokenizing that text again can split it otherwise than the model wrote
it (the model wrote ' {' '"', the tokenizer writes ' {"'). From the first such token on,
the prompt no longer matches the KV the program kept (pinned or in the prefix cache), and
the reply and everything after it are computed again. So each program's last call's token
ids (prompt and output) are kept, and the next call's prompt takes them in place of its own
tokens for the same text: the model sees the same text, in the tokens it wrote itself.

Only where that is exact: the prompt's own tokens spell the last call's whole text through
one of their boundaries, with the same control tokens (a control token the model wrote
stands only where the prompt has it too). Else the prompt keeps its own tokens. The first
difference can lie far back (each call's reply, respelled, is in every later prompt), so
the boundary is found by a binary search over decodes of the differing stretch: a few
decodes, each no longer than the prompt. Written by the step thread, read by the input
thread.
"""
from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from typing import Callable

MAX_TOKENS = 1 << 22       # ids kept over all programs (4 bytes each), least recently used out first


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` share from their start."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ProgramTokens:
    def __init__(self, decode: Callable[[list[int]], str], control_ids: frozenset[int],
                 max_tokens: int = MAX_TOKENS) -> None:
        self._decode = decode            # ids -> text, control tokens spelled out
        self._control = control_ids
        self._max_tokens = max_tokens
        self._ids: OrderedDict[str, array] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()
        self.num_continued = 0           # prompts that took a program's own tokens

    def record(self, program: str, ids: list[int]) -> None:
        """`program`'s call ended with `ids` (its prompt and its output)."""
        kept = array("i", ids)
        with self._lock:
            old = self._ids.pop(program, None)
            self._total += len(kept) - (len(old) if old is not None else 0)
            self._ids[program] = kept
            while self._total > self._max_tokens and self._ids:
                self._total -= len(self._ids.popitem(last=False)[1])

    def continued(self, program: str, ids: list[int]) -> list[int]:
        """The prompt `ids` of `program`'s next call, with the last call's tokens where they
        spell the same text (see the module's docstring); else `ids` unchanged."""
        with self._lock:
            last = self._ids.get(program)
            if last is not None:
                self._ids.move_to_end(program)
        if last is None:
            return ids
        last = last.tolist()
        same = common_prefix(last, ids)
        if same == len(last) or same == len(ids):
            return ids  # continues it already; or the prompt ends within it
        text = self._decode(last[same:])
        # the fewest of the prompt's next tokens that spell as much text (log2 of the stretch
        # decodes, on the input thread every client shares)
        lo, hi = same + 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(ids[same:mid])) >= len(text):
                hi = mid
            else:
                lo = mid + 1
        end = lo
        if self._decode(ids[same:end]) != text or [t for t in last[same:] if t in self._control] != [
                t for t in ids[same:end] if t in self._control]:
            return ids
        self.num_continued += 1
        return last + ids[end:]

"""Streaming text that may end in the start of a tag (a tool call's opening, the end of a
thinking block): how much of its tail to hold back until the next delta decides. Shared by
the reply's text filter (chat_format.py) and the thinking splitter (reasoning.py)."""
from __future__ import annotations


def held_tail(text: str, tag: str) -> int:
    """How many characters at the end of `text` could still grow into `tag` (a streamer
    holds them back until the next delta decides)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0

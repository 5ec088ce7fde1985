"""A reasoning model's thinking, split from its answer (Qwen3's `<think>...</think>`).

The thinking arrives as `reasoning_content` over the OpenAI API and as `thought=True`
parts in ADK; it is never parsed for tool calls and never sent back to the model in the
history. Qwen3 opens its reply with `<think>`; with thinking switched off
(`enable_thinking=False`) its template writes an empty think block into the prompt and the
reply is all answer. Where the template opens the block itself (the prompt ends with
`<think>`), the reply starts inside it.
"""
from __future__ import annotations

from dataclasses import dataclass

from adk_backend.stream_tags import held_tail

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    open: str
    close: str

    def opened_by(self, prompt: str) -> bool:
        """Whether the prompt itself opened the thinking block."""
        return prompt.rstrip().endswith(self.open)

    def split(self, text: str, opened: bool = False) -> tuple[str | None, str]:
        """(reasoning or None, answer) of a whole reply; `opened`: see opened_by. Thinking
        cut short (no closing tag) is all reasoning."""
        stripped = text.lstrip()
        if not opened and not stripped.startswith(self.open):
            return None, text
        body = stripped if opened else stripped[len(self.open):]
        thought, closed, answer = body.partition(self.close)
        return thought.strip(), answer.lstrip() if closed else ""


QWEN3 = ReasoningFormat("qwen3", THINK_OPEN, THINK_CLOSE)
REASONING_FORMATS = {"qwen3": QWEN3, "deepseek_r1": QWEN3}  # the same tags


def reasoning_format_from_template(template: str | None) -> ReasoningFormat | None:
    """A template that knows `</think>` (it strips old thinking, or writes an empty block
    when thinking is off) belongs to a reasoning model."""
    return QWEN3 if template and THINK_CLOSE in template else None


def reasoning_format(name: str | None) -> ReasoningFormat | None:
    if name in (None, "", "none"):
        return None
    if name not in REASONING_FORMATS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {sorted(REASONING_FORMATS)}")
    return REASONING_FORMATS[name]


class ReasoningStreamSplitter:
    """Splits streamed text into (thinking delta, answer delta), holding back only a tail
    that may still become a tag."""

    def __init__(self, fmt: ReasoningFormat, opened: bool = False) -> None:
        self.fmt = fmt
        self.buffer = ""
        self.state = "thinking" if opened else "start"  # start -> (thinking ->) answer
        self.strip_lead = False  # the answer after thinking starts at its first non-space

    def feed(self, delta: str) -> tuple[str, str]:
        self.buffer += delta
        thought = answer = ""
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(self.fmt.open):
                    self.buffer, self.state = head[len(self.fmt.open):], "thinking"
                elif self.fmt.open.startswith(head):  # may still become the opening tag
                    return thought, answer
                else:
                    self.state = "answer"
            elif self.state == "thinking":
                i = self.buffer.find(self.fmt.close)
                if i != -1:
                    thought += self.buffer[:i]
                    self.buffer, self.state = self.buffer[i + len(self.fmt.close):], "answer"
                    self.strip_lead = True
                    continue
                keep = held_tail(self.buffer, self.fmt.close)
                thought += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return thought, answer
            else:  # answer
                if self.strip_lead:
                    self.buffer = self.buffer.lstrip()
                    self.strip_lead = not self.buffer
                answer += self.buffer
                self.buffer = ""
                return thought, answer

    def finish(self) -> tuple[str, str]:
        """What was held back, once the reply has ended."""
        rest, self.buffer = self.buffer, ""
        if self.state == "thinking":
            return rest, ""
        return "", rest


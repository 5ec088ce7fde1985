"""Jump-forward decoding: text a grammar forces is appended at once, not a token a step.

Where a request's grammar allows one continuation only (a tool call's
`<tool_call>\\n{"name": "lookup", "arguments": {"step": ` once its first character is out,
the keys of a JSON object, a tag's end), decoding it a token per step spends a forward pass
of the whole batch on each token, and a small model under a mask spells it in fragments:
SmolLM2 wrote a `lookup` call in 59 tokens, 55 of them forced. After each sampled token the
engine asks the request's matcher for the forced text (xgrammar's
`find_jump_forward_string`), tokenizes it as the tokenizer does, and appends those tokens as
output; the next step computes them as one chunk with the request's last token and samples
after them (SGLang's jump-forward). The text is exactly what the grammar forces; the tokens
are the tokenizer's own spelling of it, which is also how the chat template renders a call
back into the next prompt.

The stretch's last token is left to the model, since it could merge with the free text that
follows (a forced `": ` is tokenized `":`, ` `; the model would write ` 1`), and so is any
special token: the tokenizer reads `<|im_end|>` in forced text as the control token, which the
grammar means as text.
"""
from __future__ import annotations


class JumpForward:
    """The forced tokens after a matcher's state, for one tokenizer's vocabulary."""

    def __init__(self, token_bytes: list[bytes], special_ids: set[int]) -> None:
        self.token_bytes = token_bytes    # each token id's bytes (xgrammar's decoded vocabulary)
        self.special_ids = special_ids

    def forced_tokens(self, matcher, tokenizer) -> list[int]:
        """Token ids spelling the text `matcher` forces next, short of its last token; empty
        where the next token is the model's to choose. `tokenizer`: the calling thread's."""
        if matcher.is_terminated():
            return []
        text = matcher.find_jump_forward_string()
        if not text:
            return []
        want = text.encode()
        ids: list[int] = []
        at = 0
        for t in tokenizer.encode(text, add_special_tokens=False)[:-1]:
            piece = self.token_bytes[t] if 0 <= t < len(self.token_bytes) else b""
            if t in self.special_ids or not piece or want[at:at + len(piece)] != piece:
                break  # only tokens whose bytes are the forced text, in order
            ids.append(t)
            at += len(piece)
        return ids

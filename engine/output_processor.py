"""Sequences' tokens in, the RequestOutputs callers see out.

One RequestState per request a caller added: its n sequences, each with an incremental
detokenizer, and how much of each sequence's output has been returned already. Stop
strings are checked here, only from `min_tokens` on (vLLM's rule), so text is never cut
before a stop may count. Runs on the thread that steps the engine, with that thread's own
tokenizer. A request is forgotten once its finished output has been built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.request import CompletionOutput, Request, RequestOutput


@dataclass
class _OutputProgress:
    """One sequence of a request, and how much of its output has been returned."""
    req: Request
    detok: IncrementalDetokenizer | None
    sent_text: int = 0     # chars of text already returned
    sent_tokens: int = 0   # tokens already returned
    finish_sent: bool = False


@dataclass
class RequestState:
    delta: bool                                  # outputs carry only what is new
    seqs: list[_OutputProgress] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.req.is_finished for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}   # request (group) id -> state
        self._token_text: dict[int, str] = {}        # decoded single tokens, for logprobs

    def add(self, first: Request, delta: bool) -> None:
        assert first.index == 0 and first.group_id not in self.states
        state = RequestState(delta)
        for req in [first, *first.forks]:
            detok = IncrementalDetokenizer(self.tokenizer, req) if self.tokenizer is not None else None
            state.seqs.append(_OutputProgress(req, detok))
        self.states[first.group_id] = state

    def on_token(self, req: Request, token: int, check_stop: bool) -> str | None:
        """Appends a sampled token's text; returns the stop string it completes, if any."""
        detok = self.states[req.group_id].seqs[req.index].detok
        return detok.add_token(token, check_stop=check_stop) if detok is not None else None

    def make_output(self, group_id: str) -> RequestOutput:
        """The request's output: in delta mode what is new since the last call (only the
        sequences that changed), else all of it. The finished output forgets the request."""
        state = self.states[group_id]
        finished = state.finished
        completions = []
        for seq in state.seqs:
            c = self._completion(seq, state.delta)
            if not state.delta or c.token_ids or c.text or c.finished:
                completions.append(c)
        if finished:
            del self.states[group_id]
        first = state.seqs[0].req
        errors = [s.req.error for s in state.seqs if s.req.error]
        return RequestOutput(request_id=group_id, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
                             outputs=completions, finished=finished, metrics=first.metrics,
                             error=errors[0] if errors else None)

    def _completion(self, seq: _OutputProgress, delta: bool) -> CompletionOutput:
        req = seq.req
        done = req.is_finished
        text = seq.detok.releasable(done) if seq.detok is not None else ""
        token_ids, logprobs = req.output_token_ids, req.logprobs
        finish_reason = req.finish_reason if done else None
        if delta:
            text, token_ids = text[seq.sent_text:], token_ids[seq.sent_tokens:]
            logprobs = logprobs[seq.sent_tokens:] if logprobs is not None else None
            seq.sent_text, seq.sent_tokens = seq.sent_text + len(text), seq.sent_tokens + len(token_ids)
            if seq.finish_sent:
                finish_reason = None  # reported already: this sequence has nothing new
            seq.finish_sent = seq.finish_sent or finish_reason is not None
        if logprobs:
            self._decode_logprobs(logprobs)
        return CompletionOutput(index=req.index, text=text, token_ids=list(token_ids), finish_reason=finish_reason,
                                stop_reason=req.stop_reason if finish_reason else None, logprobs=logprobs,
                                cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None)

    def _decode_logprobs(self, logprobs) -> None:
        if self.tokenizer is None:
            return
        for entry in logprobs:
            for token, lp in entry.items():
                if lp.decoded_token is None:
                    text = self._token_text.get(token)
                    if text is None:
                        text = self._token_text[token] = self.tokenizer.decode([token])
                    lp.decoded_token = text


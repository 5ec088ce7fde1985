"""Batched sampling: penalties, grammar masks, min_tokens, temperature, top-k, top-p, min-p,
per-request seeds.

A batch that fails to sample (a value no validation foresaw) is sampled again row by row,
and only the rows that fail again fail: one request's parameters never cost the others
their step.
"""
from __future__ import annotations

import logging

import torch

from engine.request import Logprob, Request
from engine.structured_output import GrammarBitmask

log = logging.getLogger(__name__)


class Sampler:
    def __init__(self, device: torch.device, platform, seed: int = 0) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.platform = platform  # its argmax and grammar bitmask kernels
        self.grammar_bitmask: GrammarBitmask | None = None  # made at the first constrained step

    def __call__(self, logits: torch.Tensor, reqs: list[Request]
                 ) -> tuple[list[int | None], list[dict[int, Logprob] | None], dict[int, str]]:
        """logits: [N, V] fp32, one row per request to sample. Returns token ids and, for
        requests that asked for them, the top-n logprobs (raw model distribution) plus the
        sampled token's; and the rows that could not be sampled (token None) with why."""
        try:
            tokens, logprobs = self._sample_batch(logits, reqs)
            return tokens, logprobs, {}
        except Exception:
            log.exception("sampling a batch of %d failed; sampling its rows apart", len(reqs))
        tokens, logprobs, errors = [], [], {}
        for i, r in enumerate(reqs):
            try:
                t, lp = self._sample_batch(logits[i:i + 1], [r])
                tokens.append(t[0])
                logprobs.append(lp[0])
            except Exception as exc:
                tokens.append(None)
                logprobs.append(None)
                errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
        return tokens, logprobs, errors

    def _sample_batch(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list]:
        logprobs_wanted = [r.sampling_params.logprobs is not None for r in reqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(logprobs_wanted) else None
        if any(r.sampling_params.uses_penalties for r in reqs):
            logits = logits.clone()  # penalties are not idempotent: a retried row starts afresh
        self._apply_penalties(logits, reqs)
        matchers = [r.grammar for r in reqs]
        if any(m is not None for m in matchers):
            if self.grammar_bitmask is None:
                self.grammar_bitmask = GrammarBitmask(logits.shape[-1], self.platform)
            self.grammar_bitmask.apply(logits, matchers)
        self._apply_min_tokens(logits, reqs)
        params = [r.sampling_params for r in reqs]
        if all(p.greedy for p in params):
            tokens = self.platform.argmax_rows(logits)
        else:
            tokens = self._sample(logits, reqs)
        token_list = tokens.tolist()
        out_logprobs: list[dict[int, Logprob] | None] = [None] * len(reqs)
        if raw_logprobs is not None:
            for i, r in enumerate(reqs):
                if logprobs_wanted[i]:
                    out_logprobs[i] = _top_logprobs(raw_logprobs[i], token_list[i], r.sampling_params.logprobs)
        return token_list, out_logprobs

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
        for i, r in enumerate(reqs):
            p = r.sampling_params
            if not p.uses_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:  # over prompt and output, as in vLLM / CTRL
                seen = torch.tensor(sorted(set(r.all_token_ids)), device=row.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            out = r.output_token_ids
            if out and (p.presence_penalty or p.frequency_penalty):
                ids, counts = torch.tensor(out, device=row.device).unique(return_counts=True)
                row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty

    @staticmethod
    def _apply_min_tokens(logits: torch.Tensor, reqs: list[Request]) -> None:
        for i, r in enumerate(reqs):
            p = r.sampling_params
            if r.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
                if not banned:
                    continue
                kept = logits[i, banned].clone()
                logits[i, banned] = float("-inf")
                if r.grammar is not None and bool(torch.isneginf(logits[i]).all()):
                    logits[i, banned] = kept  # the grammar can only end here: it wins over min_tokens

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in reqs]
        greedy_tokens = self.platform.argmax_rows(logits)
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                             device=logits.device, dtype=logits.dtype)
        logits = logits / temps[:, None]
        vocab = logits.shape[-1]
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(tp < 1.0 for tp in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ks = torch.tensor(top_k, device=logits.device)
            cut = torch.arange(vocab, device=logits.device)[None, :] >= ks[:, None]
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already cover top_p (keeps at least one).
            cut |= (probs.cumsum(dim=-1) - probs) > torch.tensor(top_p, device=logits.device)[:, None]
            sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p; seeded requests draw
        # their noise from their own generator, so their output does not depend on the batch.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if r.generator is not None:
                noise[i] = torch.empty(probs.shape[-1], dtype=probs.dtype).exponential_(generator=r.generator).to(probs.device)
        sampled = self.platform.argmax_rows(probs / noise)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(greedy, greedy_tokens, sampled)


def _top_logprobs(row: torch.Tensor, token: int, n: int) -> dict[int, Logprob]:
    """The sampled token's logprob and rank, and the n most likely tokens' (ranks 1..n)."""
    entry: dict[int, Logprob] = {}
    if n:
        vals, ids = row.topk(n)
        entry = {t: Logprob(v, rank) for rank, (t, v) in enumerate(zip(ids.tolist(), vals.tolist()), start=1)}
    if token not in entry:
        value = row[token]
        entry[token] = Logprob(value.item(), int((row > value).sum().item()) + 1)
    return entry

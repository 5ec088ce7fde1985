"""Offline batch API: `LLM(model=...).generate(prompts, params)` and `.chat(messages, params)`."""
from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from engine.config import DEFAULT_MODEL, EngineConfig
from engine.input_processor import PromptType
from engine.llm_engine import LLMEngine
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_options) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Runs every prompt to completion in one continuous batch; outputs in input order.
        A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.get_default_sampling_params()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams carrying the checkpoint's generation_config defaults (as vLLM's)."""
        return self.engine.default_sampling_params()

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of {'role', 'content'}) or a list of them; `tools` and
        `chat_template_kwargs` (e.g. {'enable_thinking': False}) go to the chat template."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [self.engine.apply_chat_template(c, tools, chat_template_kwargs) for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        # Validate everything before queueing anything, so a bad prompt leaves nothing behind.
        for p in prompts:
            engine.tokenize(p)
        reqs = []
        try:
            for p, sp in zip(prompts, params):
                reqs.append(engine.add_request(p, sp))
        except ValueError:
            for r in reqs:
                engine.abort(r.request_id)
            raise
        pending = {r.request_id for r in reqs}
        outputs: dict[str, RequestOutput] = {}
        with tqdm(total=len(reqs), disable=not use_tqdm, desc="generate") as bar:
            while pending:
                for out in engine.step().outputs:
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        outputs[out.request_id] = out
                        bar.update(1)
                if not engine.has_unfinished() and pending:
                    raise RuntimeError(f"engine stopped with {len(pending)} requests unfinished")
        return [outputs[r.request_id] for r in reqs]

    def stats(self) -> dict:
        return self.engine.stats()

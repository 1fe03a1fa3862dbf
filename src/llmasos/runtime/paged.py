"""A decoder on the paged kernel, as a `Backend`: the kernel's LLMEngine, stepped in the caller's thread
until a call's requests finish. (`AsyncLLM` steps the same engine in a thread of its own instead.)"""

from __future__ import annotations

import torch

from llmasos.errors import InvalidRequestError
from llmasos.kernel.engine import LLMEngine, RequestState
from llmasos.outputs import RequestOutput, RequestOutputKind
from llmasos.runtime import scoring
from llmasos.sampling_params import SamplingParams, with_output_kind


class PagedBackend:
    kind = "decoder"
    labels: tuple[str, ...] = ()

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.name = engine.model_name
        self.model_dir = engine.model_dir
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.device, self.dtype = engine.device, engine.dtype
        self.batch_size = engine.config.max_num_seqs

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.model

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """All prompts as one continuous batch; every request is validated before any is queued."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError(
                f"{len(prompts)} prompts but {len(params_list)} SamplingParams: give one, or one per prompt"
            )
        final_only = [
            with_output_kind(sp, RequestOutputKind.FINAL_ONLY) for sp in params_list
        ]  # all a call needs
        states = [self.engine.make_request(p, sp) for p, sp in zip(prompts, final_only)]
        return self.run(states, progress)

    def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        """One vector per input: its last token's final hidden state, L2-normalized, batched as usual."""
        states = [self.engine.make_request(p, pooling=True) for p in inputs]
        return [out.embedding for out in self.run(states)]

    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        raise InvalidRequestError(
            f"classify() needs a classifier model with its own head, but {self.name} is a decoder: "
            "classify by the labels' likelihood instead (LLM.classify(text, labels))"
        )

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        return scoring.loglikelihood(self, pairs, progress=progress)

    def run(self, states: list[RequestState], progress: bool = False) -> list[RequestOutput]:
        """Step the engine until every request is finished; outputs in the order of the states (progress:
        a bar on stderr that advances as requests finish)."""
        from rich.progress import Progress

        for state in states:
            self.engine.enqueue(state)
        finals: dict[str, RequestOutput] = {}
        try:
            with Progress(disable=not progress, transient=True) as bar:
                task = bar.add_task("requests", total=len(states))
                while len(finals) < len(states):
                    for out in self.engine.step():
                        if out.finished:
                            finals[out.request_id] = out
                            bar.advance(task)
        finally:
            for state in states:
                if state.request_id not in finals:
                    self.engine.abort_request(state.request_id)
        return [finals[state.request_id] for state in states]

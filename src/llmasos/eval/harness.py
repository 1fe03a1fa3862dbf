"""LLMasOS as a model backend of lm-evaluation-harness: `--model llmasos`.

lm_eval 0.4 looks a `--model NAME` up in its own registry only: its built-in table, plus whatever was
registered in the same process before its CLI parses the arguments. It reads no entry points of
installed packages, so no package can add a model to a plain `lm_eval` command. Hence the wrapper:

    python -m llmasos.eval.harness --model llmasos --model_args model=smollm2 --tasks hellaswag

registers "llmasos" and then runs lm_eval's own CLI, unchanged, on the same arguments. From Python,
`import llmasos.eval.harness` is enough for `lm_eval.simple_evaluate(model="llmasos", ...)`.

Every request goes through the model opened by `llmasos.runtime.open_model`: loglikelihoods through
`llmasos.runtime.scoring` (batched in the kernel's engine), generations through the backend's
`generate`; nothing here runs the model by itself.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import torch

from llmasos.config import EngineConfig
from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.runtime import open_model, scoring
from llmasos.sampling_params import SamplingParams

try:
    # lm_eval's own models first: it adds them only to an empty registry, so after ours they would be missing
    import lm_eval.models  # noqa: F401
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import simple_parse_args_string
except ModuleNotFoundError as error:
    if error.name != "lm_eval":
        raise
    raise LLMasOSError(
        "lm-evaluation-harness is not installed, so LLMasOS cannot run as its model: "
        "pip install 'llmasos[eval]'"
    ) from error

log = logging.getLogger(__name__)

# gen_kwargs that are SamplingParams fields of the same name and meaning; `until`, `max_gen_toks` (and
# its aliases) and `do_sample` are mapped by `sampling_params`, and anything else is refused
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
ENGINE_FIELDS = tuple(field.name for field in dataclasses.fields(EngineConfig))


def sampling_params(gen_kwargs: dict, default_max_gen_toks: int) -> SamplingParams:
    """A harness request's gen_kwargs as SamplingParams: `until` are stop strings, `max_gen_toks` is
    max_tokens, and decoding is greedy unless `do_sample` (or a temperature above 0) asks otherwise.

    lm_eval's own `normalize_gen_kwargs` resolves the aliases and do_sample/temperature, so a task
    means here what it means for lm_eval's other backends.
    """
    kwargs = dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=default_max_gen_toks))
    until, max_gen_toks = kwargs.pop("until"), kwargs.pop("max_gen_toks")
    if not kwargs.pop("do_sample"):
        kwargs["temperature"] = 0.0
    unknown = sorted(set(kwargs) - set(SAMPLING_FIELDS))
    if unknown:
        raise InvalidRequestError(
            f"the task's gen_kwargs {', '.join(unknown)} have no LLMasOS equivalent; remove them from the "
            f"task's generation_kwargs (or --gen_kwargs). Accepted: until, max_gen_toks, do_sample, "
            f"{', '.join(SAMPLING_FIELDS)}"
        )
    return SamplingParams(max_tokens=max_gen_toks, stop=until, **kwargs)


def max_num_seqs(batch_size: int | str, max_batch_size: int | None) -> int | None:
    """lm_eval's batch size as the engine's most sequences per step; "auto" (or "auto:N") lets the
    engine's scheduler fill its token budget, up to max_batch_size when given."""
    if str(batch_size).startswith("auto"):
        return max_batch_size
    try:
        size = int(batch_size)
    except ValueError:
        size = 0
    if size < 1:
        raise InvalidRequestError(f"batch_size={batch_size!r}: give an integer >= 1, or auto")
    return size


class LLMasOSLM(LM):
    """An LLMasOS model in lm_eval: `--model llmasos --model_args model=NAME,max_model_len=2048,...`.

    model_args: `model` (a store name, catalog name or path), `max_gen_toks` (the default length of a
    generation, 256 as in lm_eval's HF and vLLM backends) and any EngineConfig field (max_model_len,
    dtype, device, seed, max_num_seqs, ...). lm_eval's `--batch_size N` becomes max_num_seqs=N unless
    model_args set max_num_seqs, and `--device` (or model_args device=) is the engine's device.
    """

    def __init__(
        self,
        model: str | None = None,
        max_gen_toks: int = 256,
        batch_size: int | str = "auto",
        max_batch_size: int | None = None,
        device: str | None = None,
        **engine_config: object,
    ):
        super().__init__()
        if not model:
            raise InvalidRequestError(
                "--model llmasos needs the model to evaluate: --model_args model=NAME "
                "(a model in the store, a catalog name such as smollm2, or a path)"
            )
        unknown = sorted(set(engine_config) - set(ENGINE_FIELDS))
        if unknown:
            raise InvalidRequestError(
                f"unknown model_args {', '.join(unknown)} for --model llmasos; it takes model, "
                f"max_gen_toks, batch_size and the engine settings {', '.join(ENGINE_FIELDS)}"
            )
        if engine_config.get("max_num_seqs") is None:
            engine_config["max_num_seqs"] = max_num_seqs(batch_size, max_batch_size)
        self.model_name = model
        self.max_gen_toks = int(max_gen_toks)
        engine_config["device"] = device
        self.llm = open_model(
            model, EngineConfig(**{k: v for k, v in engine_config.items() if v is not None})
        )

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LLMasOSLM:
        """How lm_eval builds the model. Its CLI always adds its own settings (batch_size 1, device
        cuda:0) whether the user chose them or not, so model_args win over them, and a CUDA device it
        names on a machine without one means the engine's own choice, as in lm_eval's HF backend."""
        settings = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if str(settings.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            log.warning("lm_eval's device %s is not available here: using the CPU", settings.pop("device"))
        return cls(**(settings | dict(arg_dict)))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LLMasOSLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        return scoring.loglikelihood(self.llm, pairs, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return scoring.loglikelihood_rolling(
            self.llm, [r.args[0] for r in requests], progress=not disable_tqdm
        )

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """All requests in one call, so the engine batches them continuously. Contexts are tokenized as
        for scoring (no special tokens; an empty one is the BOS/EOS token), and one too long keeps its
        end, leaving room for max_gen_toks, as in lm_eval's vLLM backend."""
        if not requests:
            return []
        if self.llm.kind != "decoder":
            raise InvalidRequestError(
                f"generate_until runs decoder models on the kernel; this one is a {self.llm.kind} "
                "(the harness's loglikelihood tasks do run on it)"
            )
        max_model_len = self.llm.max_model_len
        prompts, params = [], []
        for context, gen_kwargs in (r.args for r in requests):
            sp = sampling_params(gen_kwargs, self.max_gen_toks)
            sp.truncate_prompt_tokens = max_model_len - sp.max_tokens
            if sp.truncate_prompt_tokens < 1:
                raise InvalidRequestError(
                    f"max_gen_toks={sp.max_tokens} leaves no room for the prompt in the model's context of "
                    f"{max_model_len} tokens; lower max_gen_toks (in the task or with --gen_kwargs)"
                )
            ids = self.llm.tokenizer.encode(context, add_special_tokens=False)
            prompts.append(ids or [scoring.prefix_token_id(self.llm)])
            params.append(sp)
        outputs = self.llm.generate(prompts, params, progress=not disable_tqdm)
        return [out.outputs[0].text for out in outputs]

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.llm.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt
        )

    @property
    def tokenizer_name(self) -> str:
        """Part of the key of lm_eval's request cache when a chat template is applied."""
        return self.model_name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm_eval records in its results when it applies one."""
        return self.llm.tokenizer.chat_template if chat_template else None


if "llmasos" not in model_registry:  # registered by name, so `python -m` (a second copy) agrees
    model_registry.register("llmasos", target="llmasos.eval.harness:LLMasOSLM")


def main() -> None:
    """`python -m llmasos.eval.harness ARGS`: lm_eval's own CLI on ARGS, with `--model llmasos` known."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except LLMasOSError as error:
        sys.exit(f"Error: {error}")


if __name__ == "__main__":
    main()

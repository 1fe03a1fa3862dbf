"""User-facing errors.

Every error a user can cause is an `LLMasOSError` whose message names the problem and the fix.
The CLI prints the message as one clean line and the server turns it into an OpenAI error object,
so no traceback ever reaches a user for a mistake they can correct.
"""


class LLMasOSError(Exception):
    """Base class: the message is shown to the user as is."""


class ModelNotFoundError(LLMasOSError):
    """A model name that is neither in the store, nor a catalog name, nor a path."""


class StoreError(LLMasOSError):
    """A store operation failed (pull, import, verify) and the store was left unchanged."""


class UnsupportedModelError(LLMasOSError):
    """The model's architecture or file format has no driver."""


class EngineDeadError(LLMasOSError):
    """The engine can run no more steps (a tensor-parallel worker process died): reload the model.
    The server answers 503 with this message."""


class InvalidRequestError(LLMasOSError, ValueError):
    """A request the engine cannot serve: bad sampling values, prompt too long, cache too small."""


class ContextLengthError(InvalidRequestError):
    """A request that does not fit the model's context or the KV cache, with the numbers and the fix.

    `param` names what to change: "prompt" (it alone is too long) or "max_tokens".
    """

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int, kv_capacity_tokens: int):
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.max_model_len, self.kv_capacity_tokens = max_model_len, kv_capacity_tokens
        needed = min(prompt_tokens + max_tokens, max_model_len)
        if prompt_tokens >= max_model_len:
            self.param = "prompt"
            message = (
                f"the prompt has {prompt_tokens} tokens but the model's context is {max_model_len}; "
                "shorten it, or set truncate_prompt_tokens to keep only its end"
            )
        elif needed > kv_capacity_tokens:
            self.param = "prompt" if prompt_tokens >= kv_capacity_tokens else "max_tokens"
            message = (
                f"the KV cache holds {kv_capacity_tokens} tokens but this request needs up to {needed} "
                f"(prompt {prompt_tokens} + max_tokens {max_tokens}); lower max_tokens or give the cache "
                "more memory (kv_cache_gib)"
            )
        else:
            self.param = "max_tokens"
            message = (
                f"this model's maximum context length is {max_model_len} tokens, but {prompt_tokens} are in "
                f"the prompt and max_tokens asks for {max_tokens} more; lower max_tokens to at most "
                f"{max_model_len - prompt_tokens}"
            )
        super().__init__(message)

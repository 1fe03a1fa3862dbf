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


class InvalidRequestError(LLMasOSError, ValueError):
    """A request the engine cannot serve: bad sampling values, prompt too long, cache too small."""

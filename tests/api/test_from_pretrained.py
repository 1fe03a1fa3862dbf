"""`LLM.from_pretrained`, the product brief's SDK example, end to end: a tiny random T5 and a tiny Llama
pulled from a local stand-in for the Hugging Face hub (HF_ENDPOINT, HF_TOKEN), then a store name, a
local folder and a local .gguf. Each test has its own LLMASOS_HOME."""

import pytest
import torch

from llmasos import LLM, SamplingParams
from llmasos.errors import StoreError
from llmasos.store import ModelStore

from hub import commit_of, folder_files, serve_hub, unreachable_url
from tiny import save_tiny_model
from tiny_families import save_t5
from tiny_gguf import Q, write_tiny_gguf

T5, LLAMA = "org/tiny-t5", "org/tiny-llama"
TOKEN = "hf_local_test_token"
CHINESE = (
    "人工智能正在改变我们的生活方式。从智能手机上的语音助手到自动驾驶汽车，"
    "这项技术已经深入到各个领域。专家认为，未来十年人工智能将继续快速发展。"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    return {
        T5: save_t5(tmp_path_factory.mktemp("t5")),
        LLAMA: save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"),
    }


@pytest.fixture
def home(tmp_path, monkeypatch) -> ModelStore:
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    return ModelStore()


@pytest.fixture
def hub(folders, home, monkeypatch):
    with serve_hub({repo: folder_files(folder) for repo, folder in folders.items()}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield hub


def test_the_briefs_example_summarizes_chinese_with_a_t5_pulled_from_the_hub(hub, home, monkeypatch, capfd):
    model = LLM.from_pretrained(T5)  # with the progress bar, as a user gets it

    assert model.kind == "seq2seq" and model.name == T5 and model.model_dir == home.path(T5)
    assert home.get(T5).source == f"hf:{T5}@{commit_of(T5)}"
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}
    out, err = capfd.readouterr()
    assert out == "", "the progress bars go to stderr, never stdout"
    assert "Fetching" in err and "storing" in err  # huggingface_hub's download bar, then the store's

    seen = []
    generate = model.backend.generate

    def recording(prompts, params, progress=False):
        seen.extend(generate(prompts, params, progress))
        return seen[-len(prompts) :]

    monkeypatch.setattr(model.backend, "generate", recording)
    summary = model.summarize(CHINESE)
    assert isinstance(summary, str)
    [request] = seen
    assert CHINESE in request.prompt and request.prompt_token_ids
    assert request.outputs[0].token_ids, "the engine generated tokens"
    assert summary == request.outputs[0].text.strip()

    monkeypatch.setenv("HF_ENDPOINT", unreachable_url())  # pulled once: the store answers offline
    assert LLM.from_pretrained(T5).model_dir == home.path(T5)


def test_engine_settings_pass_through(hub, home):
    llm = LLM.from_pretrained(LLAMA, progress=False, max_model_len=48, dtype="bfloat16", device="cpu")
    assert llm.name == LLAMA and llm.kind == "decoder" and llm.model_dir == home.path(LLAMA)
    assert llm.engine.config.max_model_len == 48 and llm.max_model_len == 48  # the model's own is 256
    assert llm.engine.dtype == torch.bfloat16
    out = llm.generate("Hello", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


def test_a_store_name_a_folder_and_a_gguf_open_without_the_hub(folders, home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", unreachable_url())
    home.import_path(folders[LLAMA], name="mine", progress=False)
    assert LLM.from_pretrained("mine", device="cpu").model_dir == home.path("mine")
    assert LLM.from_pretrained(str(folders[LLAMA]), device="cpu").model_dir == folders[LLAMA].resolve()

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q8_0)
    llm = LLM.from_pretrained(str(gguf), progress=False, device="cpu", gguf_blocks=False)
    assert llm.model_dir.parent == home.cache and (llm.model_dir / "config.json").is_file()
    assert llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids
    assert [m.name for m in home.list()] == ["mine"]


def test_a_hub_id_offline_is_a_clear_error(home, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", unreachable_url())
    with pytest.raises(StoreError) as error:
        LLM.from_pretrained("google/flan-t5-xl", progress=False)
    message = str(error.value)
    assert "HF_ENDPOINT" in message and "`llmasos pull google/flan-t5-xl` again" in message
    assert home.list() == []

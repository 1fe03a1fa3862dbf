"""Tiny random models of the families the transformers engine runs: T5 (FLAN-T5's layout), BART,
BERT with a 3-label classification head, and RoBERTa, saved with `save_pretrained` with their own
small tokenizers (model hubs are unreachable from tests)."""

import shutil
from pathlib import Path

import torch

from tiny import CORPUS, save_tiny_bert

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def save_bpe_tokenizer(path: Path, specials: list[str], template: str, **named: str):
    """A byte-level BPE tokenizer whose post-processor adds `template`'s special tokens, as T5's
    (`$A </s>`) and BART's and RoBERTa's (`<s> $A </s>`) do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=alphabet)
    )
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials if s in template]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.save_pretrained(path)
    return fast


def widen(model: torch.nn.Module, std: float) -> None:
    """Random init is small; widen it so greedy choices are far from ties (as tests/tiny.py does), and
    so that with untied output embeddings the greedy text varies instead of repeating one token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)


def save_t5(path: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = save_bpe_tokenizer(path, ["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>",
                             unk_token="<unk>")  # fmt: skip
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip
    model = T5ForConditionalGeneration(config)  # FLAN-T5's layout
    widen(model, 0.5)
    model.save_pretrained(path)
    return path


def save_roberta_style_tokenizer(path: Path, max_length: int | None = None):
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    names = dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    if max_length:
        names["model_max_length"] = max_length
    return save_bpe_tokenizer(path, specials, "<s> $A </s>", **names)


def save_bart(path: Path) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration

    tok = save_roberta_style_tokenizer(path)
    torch.manual_seed(1)
    config = BartConfig(
        vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = BartForConditionalGeneration(config)
    widen(model, 0.1)
    model.save_pretrained(path)
    return path


def save_bert_classifier(path: Path) -> Path:
    """tests/tiny.py's BERT folder (its WordPiece tokenizer and config) with a 3-label head instead of
    the sentence-transformers recipe."""
    from transformers import BertConfig, BertForSequenceClassification

    save_tiny_bert(path)
    for recipe in ("modules.json", "sentence_bert_config.json"):
        (path / recipe).unlink()
    shutil.rmtree(path / "1_Pooling")
    config = BertConfig.from_pretrained(path, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(2)
    model = BertForSequenceClassification(config)
    widen(model, 0.2)
    model.save_pretrained(path)
    return path


def save_roberta(path: Path) -> Path:
    from transformers import RobertaConfig, RobertaModel

    tok = save_roberta_style_tokenizer(path, max_length=64)  # positions start after the pad id: 64 of 66
    torch.manual_seed(3)
    config = RobertaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    model = RobertaModel(config)
    widen(model, 0.2)
    model.save_pretrained(path)
    return path


SAVERS = {
    "t5": save_t5,
    "bart": save_bart,
    "bert-classifier": save_bert_classifier,
    "bert": save_tiny_bert,
    "roberta": save_roberta,
}

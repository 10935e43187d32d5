"""The ``prune_vocabulary`` recipe stage: keep only the token ids the train split uses, in model and tokenizer.

For small encoders the word embeddings are most of the bytes (51.6% of all-MiniLM-L6-v2), and a task's train split
uses a small part of the vocabulary (11,547 of 30,522 ids for SST-2). The stage runs
:func:`hf_compress.vocabulary.prune.prune_vocabulary` on the latest (float) model with the tokenised train split as
corpus, saves the pruned tokenizer next to the model, and records on the eval split how often a removed id would have
been used; later stages train, save and evaluate with the pruned tokenizer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from hf_compress.api import prune_vocabulary
from hf_compress.recipes.data import token_rows
from hf_compress.recipes.schema import Recipe, Stage
from hf_compress.recipes.stages.context import StageContext, finish


def _token_counts(rows, kept: set[int], special: set[int]) -> dict[str, Any]:
    """How many rows / tokens of ``rows`` (id sequences) hit an id outside ``kept``; special ids are not counted."""
    sentences = hit = tokens = 0
    removed: Counter = Counter()
    for ids in rows:
        ids = [i for i in ids if i not in special]
        missing = [i for i in ids if i not in kept]
        sentences, tokens, hit = sentences + 1, tokens + len(ids), hit + bool(missing)
        removed.update(missing)
    return {
        "sentences": sentences,
        "sentences_with_removed": hit,
        "sentence_oov_rate": hit / max(sentences, 1),
        "tokens": tokens,
        "removed_tokens": sum(removed.values()),
        "token_oov_rate": sum(removed.values()) / max(tokens, 1),
        "top_removed": removed.most_common(10),
    }


def _vocabulary_corpus(ctx: StageContext, files: list[str]) -> list:
    """The tokenised train split (id sequences) followed by the non-empty lines of each text file."""
    corpus: list = token_rows(ctx.train_dataset, ctx.tokenizer, ctx.task)
    for path in files:
        corpus += [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return corpus


def run(stage: Stage, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Keep only the token ids of the train split (+ ``corpus_files``) in the latest model and its tokenizer.

    The corpus is the tokenised train split (what the model was trained on; never the eval split, which would leak)
    plus the lines of each ``corpus_files`` text file. The report records the kept ids and, on the eval split, how
    many sentences / tokens used a removed id (the tokenizer now re-splits those words or maps them to unk).
    """
    corpus = _vocabulary_corpus(ctx, stage.corpus_files)
    eval_rows = None if ctx.eval_dataset is None else token_rows(ctx.eval_dataset, ctx.tokenizer, ctx.task)
    kwargs = {"eval_corpus": eval_rows, **stage.vocabulary}
    model = ctx.load(ctx.model)
    tokenizer = None if ctx.sentence_embedding else ctx.tokenizer  # a SentenceTransformer: its own tokenizer
    model, tokenizer, vocabulary = prune_vocabulary(model, tokenizer, corpus, **kwargs)
    details = {"vocabulary": {**vocabulary.to_dict(), "corpus_files": stage.corpus_files}, "input": ctx.model}
    if eval_rows is not None:
        special = set(ctx.tokenizer.all_special_ids)
        details["eval_coverage"] = _token_counts(eval_rows, set(vocabulary.kept_ids), special)
        top = details["eval_coverage"]["top_removed"]
        details["eval_coverage"]["top_removed"] = [[ctx.tokenizer.convert_ids_to_tokens(i), n] for i, n in top]
    # the folder this stage is renamed to on success; its datasets are tokenised once, here
    _, eval_dataset = ctx.datasets_for(str(ctx.out / stage.name), tokenizer=tokenizer)
    return finish(model, ctx, out_dir, details, tokenizer=tokenizer, eval_dataset=eval_dataset)


def plan_vocabulary(model, recipe: Recipe, stage: Stage):
    """Dry run of a ``prune_vocabulary`` stage for ``hf-compress check``: the same kept ids, on a meta-device model.

    Tokenises the recipe's train split (and reads ``stage.corpus_files``) and runs the real
    :func:`hf_compress.vocabulary.prune.prune_vocabulary` on ``model`` (shapes only on the meta device); nothing is
    written.

    Returns:
        `tuple`: ``(model, report)``, the model with sliced embeddings and the `VocabularyReport`.

    Example:

    ```python
    >>> model, report = plan_vocabulary(meta_model, recipe, recipe.stage("vocab"))  # doctest: +SKIP
    >>> report.kept_vocab_size  # doctest: +SKIP
    11549

    ```
    """
    ctx = StageContext.from_recipe(recipe, Path("."))
    corpus = _vocabulary_corpus(ctx, stage.corpus_files)
    model, _, report = prune_vocabulary(model, ctx.tokenizer, corpus, **stage.vocabulary)
    return model, report

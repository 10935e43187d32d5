"""What the model card of a ``SentenceTransformer`` result says differently from a transformers model's card.

Its metadata follows sentence-transformers' own cards (``library_name: sentence-transformers``, ``pipeline_tag:
sentence-similarity``, tags ``sentence-transformers`` and ``feature-extraction``), its loading code is
``SentenceTransformer(repo)`` when plain sentence-transformers loads the folder and
``hf_compress.from_pretrained(repo)`` (a ``SentenceTransformer``) when the transformer's config records shapes or int8
modules it cannot express, and its results table keeps the pair metrics (cosine accuracy, average precision, F1) and
the loss, not the evaluator's thresholds, precision, recall or MCC. :func:`hf_compress.reporting.cards.render_card`
uses it with ``sentence_transformers=True``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from hf_compress.reporting.measure import metric_name

LIBRARY_NAME = "sentence-transformers"
PIPELINE_TAG = "sentence-similarity"
TAGS = ["sentence-transformers", "feature-extraction"]
# `BinaryClassificationEvaluator` keys end in these, after its name: `eval_pairs_cosine_ap`, `cosine_accuracy` ...
CARD_METRIC = re.compile(r"(^|_)(accuracy|ap|f1|loss)$")
EXAMPLE_SENTENCES = '["A man is eating food.", "A man is eating a piece of bread."]'


def sentence_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """The metrics a sentence-embedding card shows: pair accuracy, average precision and F1 (and the loss), named
    without the ``eval_`` / ``test_`` prefix.

    >>> sentence_metrics({"eval_pairs_cosine_accuracy": 0.7, "eval_pairs_cosine_accuracy_threshold": 0.8,
    ...                   "eval_pairs_cosine_ap": 0.75, "eval_pairs_cosine_mcc": 0.3, "eval_loss": 0.1})
    {'pairs_cosine_accuracy': 0.7, 'pairs_cosine_ap': 0.75, 'loss': 0.1}
    """
    named = {metric_name(key): value for key, value in (metrics or {}).items()}
    return {key: value for key, value in named.items() if CARD_METRIC.search(key)}


def sentence_load_code(repo_id: str, plain: bool, onnx: bool = False) -> str:
    """The Python that loads the sentence-transformers repo ``repo_id`` and embeds two sentences.

    Args:
        repo_id (`str`): the repo (or folder) to load.
        plain (`bool`): plain ``SentenceTransformer(repo_id)`` loads it; otherwise the code uses
            ``hf_compress.from_pretrained``, which rebuilds the compressed layers and returns a
            ``SentenceTransformer``.
        onnx (`bool`, *optional*, defaults to `False`): the repo has ``onnx/model_quantized.onnx``: also show how
            sentence-transformers' ONNX backend runs it (the folder's pooling applied, no hf_compress needed).

    >>> print(sentence_load_code("me/tiny", plain=True))
    from sentence_transformers import SentenceTransformer
    <BLANKLINE>
    model = SentenceTransformer("me/tiny")
    embeddings = model.encode(["A man is eating food.", "A man is eating a piece of bread."])
    similarities = model.similarity(embeddings, embeddings)
    """
    if plain:
        code = f'from sentence_transformers import SentenceTransformer\n\nmodel = SentenceTransformer("{repo_id}")'
    else:
        code = (
            "import hf_compress\n\n"
            f'model = hf_compress.from_pretrained("{repo_id}")  # a SentenceTransformer; rebuilds the compressed '
            "layers from config.json"
        )
    code += (
        f"\nembeddings = model.encode({EXAMPLE_SENTENCES})\nsimilarities = model.similarity(embeddings, embeddings)"
    )
    if not onnx:
        return code
    return (
        f"{code}\n\n# ONNX Runtime (onnx/model_quantized.onnx: int8 weights), no hf_compress needed:\n"
        "# pip install sentence-transformers[onnx]\n"
        "from sentence_transformers import SentenceTransformer\n\n"
        f'model = SentenceTransformer("{repo_id}", backend="onnx", '
        'model_kwargs={"file_name": "onnx/model_quantized.onnx"})\n'
        f"embeddings = model.encode({EXAMPLE_SENTENCES})"
    )


__all__ = ["LIBRARY_NAME", "PIPELINE_TAG", "TAGS", "sentence_load_code", "sentence_metrics"]

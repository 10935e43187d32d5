"""The one table of task heads: which Auto class builds a head, its Hub pipeline task, and its recipe task name.

Every part of the library that needs to know about heads reads it here: the distillation teacher (loading a teacher
path with the student's Auto class, checking that both have the same head), the model cards (``pipeline_tag`` and
the loading snippet) and the recipe runner (``model.task`` -> Auto class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers
from transformers.models.auto import modeling_auto


@dataclass(frozen=True)
class Head:
    """One task head.

    Args:
        auto_class (`str`): The transformers Auto class that builds it, e.g. `"AutoModelForCausalLM"`.
        pipeline_task (`str`): The Hub / `pipeline()` task, e.g. `"text-generation"`.
        class_names (`dict`): transformers' `model_type -> class name(s)` mapping of this head.
        recipe_task (`str`, *optional*): The `model.task` name a recipe uses for it, when recipes support it.
    """

    auto_class: str
    pipeline_task: str
    class_names: Any
    recipe_task: str | None = None

    def auto(self) -> type:
        """The Auto class itself."""
        return getattr(transformers, self.auto_class)


# Checked in this order: BART is both seq2seq and masked LM.
HEADS: dict[str, Head] = {
    "seq2seq_lm": Head(
        "AutoModelForSeq2SeqLM", "text2text-generation", modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    ),
    "causal_lm": Head(
        "AutoModelForCausalLM", "text-generation", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal-lm"
    ),
    "masked_lm": Head("AutoModelForMaskedLM", "fill-mask", modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    "qa": Head(
        "AutoModelForQuestionAnswering", "question-answering", modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES
    ),
    "token_cls": Head(
        "AutoModelForTokenClassification",
        "token-classification",
        modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    ),
    "seq_cls": Head(
        "AutoModelForSequenceClassification",
        "text-classification",
        modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "sequence-classification",
    ),
    "image_cls": Head(
        "AutoModelForImageClassification",
        "image-classification",
        modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    ),
}
LM_HEADS = ("seq2seq_lm", "causal_lm", "masked_lm")
BACKBONE = Head("AutoModel", "feature-extraction", {})  # a model without a task head
# a SentenceTransformer: the transformers backbone inside it, pooled by sentence-transformers (not a head class)
SENTENCE_EMBEDDING = Head("AutoModel", "sentence-similarity", {}, "sentence-embedding")
RECIPE_TASKS: dict[str, Head] = {
    head.recipe_task: head for head in (*HEADS.values(), SENTENCE_EMBEDDING) if head.recipe_task
}


def detect_head(class_name: str | None) -> str | None:
    """The head (a key of `HEADS`) of a model class name such as `"BertForMaskedLM"`, or `None`.

    >>> detect_head("LlamaForCausalLM"), detect_head("BartForConditionalGeneration"), detect_head("BertModel")
    ('causal_lm', 'seq2seq_lm', None)
    """
    for name, head in HEADS.items():
        for names in head.class_names.values():
            if class_name == names or (isinstance(names, (list, tuple)) and class_name in names):
                return name
    return None


def head_of(architectures: list[str] | None) -> Head:
    """The :class:`Head` of a `config.architectures` list (its first class), or `BACKBONE` when it has none.

    >>> head_of(["BertForSequenceClassification"]).pipeline_task
    'text-classification'
    """
    name = detect_head(architectures[0]) if architectures else None
    return HEADS[name] if name is not None else BACKBONE


def auto_class_for_task(task: str) -> type:
    """The Auto class of a recipe `model.task` (`"sequence-classification"`, `"causal-lm"` or `"sentence-embedding"`,
    whose backbone sits inside a ``SentenceTransformer``).

    >>> auto_class_for_task("causal-lm").__name__
    'AutoModelForCausalLM'
    """
    if task not in RECIPE_TASKS:
        raise ValueError(f"`task` must be one of {list(RECIPE_TASKS)}, got {task!r}.")
    return RECIPE_TASKS[task].auto()

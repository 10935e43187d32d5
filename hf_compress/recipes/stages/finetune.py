"""The ``finetune_teacher`` stage: fine-tune the teacher (a fresh classification head for classification)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer

from hf_compress.models.heads import auto_class_for_task
from hf_compress.recipes.schema import Stage
from hf_compress.recipes.stages.context import StageContext, finish, train, training_args


def run(stage: Stage, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Fine-tune the teacher with a plain ``Trainer`` on the recipe's train split; it teaches the later stages."""
    kwargs = {}
    if ctx.task == "sequence-classification":
        names = ctx.recipe.data.label_names or getattr(ctx.train_dataset.features["labels"], "names", None)
        names = names or [f"LABEL_{i}" for i in range(ctx.num_labels)]
        if len(names) != ctx.num_labels:
            raise ValueError(
                f"`data.label_names` has {len(names)} names for {ctx.num_labels} labels, got {names}; "
                "give one name per label."
            )
        kwargs = {
            "ignore_mismatched_sizes": True,
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }
    model = auto_class_for_task(ctx.task).from_pretrained(ctx.teacher, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = ctx.tokenizer.pad_token_id
    args = training_args(stage.training, out_dir, ctx.seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ctx.train_dataset,
        data_collator=ctx.collator,
        processing_class=ctx.tokenizer,
    )
    return finish(trainer.model, ctx, out_dir, train(trainer) | {"source": ctx.recipe.model.teacher})

"""The ``prune`` stage: ``PruningCallback`` on the latest model, recovering by distillation, fine-tuning or nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transformers import Trainer

from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.recipes.schema import Stage
from hf_compress.recipes.stages import sentence
from hf_compress.recipes.stages.context import StageContext, finish, train, training_args

# `recovery: none` is one-shot: masks at step 0, a single step that cannot move the weights, surgery at the end
ONE_SHOT_TRAINING = {"max_steps": 1, "learning_rate": 0.0, "weight_decay": 0.0}


def run(stage: Stage, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Prune the latest model while training (``recovery``: ``distill``, ``finetune`` or ``none``).

    Sentence embeddings train in a ``SentenceTransformerTrainer``: distillation of the teacher's embeddings, or
    (``finetune``) ``CosineSimilarityLoss`` on the pair labels; ``none`` is the one-shot distillation run.
    """
    config = PruningConfig(**stage.pruning)
    model = ctx.load(ctx.model)
    training = stage.training | (ONE_SHOT_TRAINING if stage.recovery == "none" else {})
    details = {"recovery": stage.recovery, "pruning": dataclasses.asdict(config)}
    if ctx.sentence_embedding:
        teacher = ctx.load(ctx.teacher) if stage.recovery != "finetune" else None
        trainer = sentence.trainer(
            model, teacher, training, out_dir, ctx.seed, ctx.train_dataset, callbacks=[PruningCallback(config)]
        )
        return finish(trainer.model, ctx, out_dir, train(trainer) | details)
    common = dict(
        train_dataset=ctx.train_dataset,
        data_collator=ctx.collator,
        processing_class=ctx.tokenizer,
        callbacks=[PruningCallback(config)],
    )
    if stage.distills:
        args = training_args(training, out_dir, ctx.seed, distill=True)
        trainer = DistillationTrainer(model=model, teacher_model=ctx.load(ctx.teacher), args=args, **common)
    else:
        trainer = Trainer(model=model, args=training_args(training, out_dir, ctx.seed), **common)
    return finish(trainer.model, ctx, out_dir, train(trainer) | details)

"""The ``distill`` stage: distil the teacher into a student made by ``make_student`` (or given as a folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_compress.api import make_student
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.models.builtin import resolve_model_path
from hf_compress.recipes.schema import Stage
from hf_compress.recipes.stages import sentence
from hf_compress.recipes.stages.context import StageContext, finish, train, training_args


def run(stage: Stage, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Distil the teacher into ``student.model`` (a folder) or ``make_student(teacher, **student)``.

    Sentence embeddings: the student's embeddings regress the teacher's (``training.hidden_loss``) in a
    ``SentenceTransformerTrainer`` (:mod:`hf_compress.recipes.stages.sentence`).
    """
    teacher = ctx.load(ctx.teacher)
    if stage.student_model is not None:
        path = resolve_model_path(stage.student_model)
        student, info = ctx.load(path), {"student": path}
    else:
        student, info = make_student(teacher, **stage.student), {"student": dict(stage.student)}
    if ctx.sentence_embedding:
        trainer = sentence.trainer(student, teacher, stage.training, out_dir, ctx.seed, ctx.train_dataset)
        return finish(trainer.model, ctx, out_dir, train(trainer) | info | {"teacher": ctx.teacher})
    args = training_args(stage.training, out_dir, ctx.seed, distill=True)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=ctx.train_dataset,
        data_collator=ctx.collator,
        processing_class=ctx.tokenizer,
    )
    return finish(trainer.model, ctx, out_dir, train(trainer) | info | {"teacher": ctx.teacher})

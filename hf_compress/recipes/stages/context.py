"""The stages of a recipe: each one reads the models of earlier stages and writes its own folder.

A stage is a function ``(stage, ctx, out_dir) -> dict``: ``stage`` is the recipe's stage section (plain dict),
``ctx`` the :class:`StageContext` (task, tokenizer, datasets, teacher and latest model folders), ``out_dir`` the
temporary folder to write into. The returned dict goes into the stage's ``report.json``. Training stages use the
stock ``Trainer`` or ``DistillationTrainer`` with the stage's ``training`` section as their arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from hf_compress.checks import check_label_values
from hf_compress.recipes.data import data_collator, load_text_dataset, resolve_model_path
from hf_compress.recipes.stages.report import card, evaluate
from hf_compress.recipes.stages.vocabulary import prune_vocabulary
from hf_compress.recipes.validate import MODEL_STAGES, RESERVED_TRAINING_KEYS

logger = logging.getLogger(__name__)

RECOVERIES = ("distill", "finetune", "none")
# the pipeline owns where and how stages write; recipes tune everything else
TRAINING_DEFAULTS = {"report_to": "none", "save_strategy": "no", "eval_strategy": "no", "logging_steps": 50}


@dataclass
class StageContext:
    """What the stages share: the recipe sections, lazily loaded tokenizers / datasets, and the model folders.

    ``tokenizer`` and ``datasets`` are those of the latest model: the recipe's tokenizer until a
    ``prune_vocabulary`` stage writes a pruned one (later stages then train, save and evaluate with it).
    """

    spec: dict[str, Any]
    out: Path
    is_main_process: bool = True
    teacher: str = ""  # folder (or Hub id) of the teacher: the `finetune_teacher` output once it ran
    reference: str = ""  # the teacher `evaluate` compares against (never a vocabulary-pruned one)
    model: str = ""  # folder of the latest model-producing stage (the next stage's input)
    tokenizer_source: str = ""  # folder (or Hub id) of the latest model's tokenizer
    models: list[dict[str, Any]] = field(default_factory=list)  # finished model stages: name, type, path, report
    evaluation: Path | None = None  # evaluation.json of the latest finished `evaluate` stage
    _tokenizers: dict[str, Any] = field(default_factory=dict, repr=False)
    _datasets: dict[str, tuple] = field(default_factory=dict, repr=False)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], out: Path, is_main_process: bool = True) -> StageContext:
        teacher = resolve_model_path(spec["model"]["teacher"])
        tokenizer = resolve_model_path(spec["model"].get("tokenizer") or spec["model"]["teacher"])
        return cls(
            spec=spec,
            out=Path(out),
            is_main_process=is_main_process,
            teacher=teacher,
            reference=teacher,
            model=teacher,
            tokenizer_source=tokenizer,
        )

    @property
    def task(self) -> str:
        return self.spec["model"].get("task") or "sequence-classification"

    @property
    def seed(self) -> int:
        return int(self.spec.get("seed", 42))

    def tokenizer_for(self, source: str):
        """The tokenizer saved in folder ``source`` (loaded once; pad falls back to eos)."""
        if source not in self._tokenizers:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            self._tokenizers[source] = tokenizer
        return self._tokenizers[source]

    def datasets_for(self, source: str, tokenizer=None) -> tuple:
        """The ``(train, eval)`` datasets tokenised by the tokenizer of folder ``source`` (tokenised once).

        ``tokenizer`` registers a tokenizer for a folder that is still being written (a vocabulary stage's output).
        """
        if tokenizer is not None:
            self._tokenizers[source] = tokenizer
        if source not in self._datasets:
            self._datasets[source] = load_text_dataset(
                self.spec.get("data") or {}, self.tokenizer_for(source), self.task, seed=self.seed
            )
        return self._datasets[source]

    @property
    def tokenizer(self):
        return self.tokenizer_for(self.tokenizer_source)

    @property
    def datasets(self):
        return self.datasets_for(self.tokenizer_source)

    @property
    def train_dataset(self):
        return self.datasets[0]

    @property
    def eval_dataset(self):
        return self.datasets[1]

    @property
    def collator(self):
        return data_collator(self.tokenizer, self.task)

    @property
    def num_labels(self) -> int:
        if self.spec["model"].get("num_labels"):
            check_label_values(self.train_dataset["labels"], int(self.spec["model"]["num_labels"]), "model.num_labels")
            return int(self.spec["model"]["num_labels"])
        names = getattr(self.train_dataset.features["labels"], "names", None)
        return len(names) if names else len(set(self.train_dataset["labels"]))

    def add_finished(self, name: str, kind: str, path: Path, report: dict[str, Any]) -> None:
        """Record a finished stage: a model stage becomes the next input (and the teacher, for finetune).

        A ``prune_vocabulary`` stage brings its tokenizer; when it pruned the teacher itself, the pruned teacher
        also teaches the later stages (same token ids as the students), while ``evaluate`` still compares against
        the unpruned one.
        """
        if kind == "evaluate":
            self.evaluation = Path(path) / "evaluation.json"
        if kind not in MODEL_STAGES:
            return
        if kind == "prune_vocabulary":
            self.teacher = str(path) if self.model == self.teacher else self.teacher
            self.tokenizer_source = str(path)
        self.models.append(
            {"name": name, "type": kind, "path": str(path), "report": report, "tokenizer": self.tokenizer_source}
        )
        self.model = str(path)
        if kind == "finetune_teacher":
            self.teacher = self.reference = str(path)


# ----------------------------------------------------------------------------------------------------- helpers


def load_model(path: str | Path):
    """Load any stage's model: plain, structurally pruned or int8-quantised (``hf_compress.loading``)."""
    from hf_compress.loading import from_pretrained

    return from_pretrained(path)


def training_args(training: dict[str, Any] | None, out_dir: Path, seed: int, distill: bool = False):
    """``TrainingArguments`` (``DistillationConfig`` if ``distill``) from a stage's ``training``, into ``out_dir``."""
    training = dict(training or {})
    for key in RESERVED_TRAINING_KEYS:
        if key in training:
            raise ValueError(
                f"`training.{key}` is set by the pipeline (the stage folder), got {training[key]!r}; "
                "remove it from the recipe."
            )
    if distill:
        from hf_compress.distillation.config import DistillationConfig as Args
    else:
        from transformers import TrainingArguments as Args
    return Args(output_dir=str(out_dir), **{"seed": seed, **TRAINING_DEFAULTS, **training})


def save_model(model, tokenizer, out_dir: Path, is_main_process: bool = True) -> None:
    """Save a (possibly pruned or quantised) model with its tokenizer; only the main process writes."""
    if not is_main_process:
        return
    from hf_compress.loading import save_pretrained
    from hf_compress.quantization.quantize import is_quantized

    if is_quantized(model.config):
        model.save_pretrained(out_dir)  # the config carries both the quantisation and the pruned-structure records
    else:
        save_pretrained(model, out_dir)
    tokenizer.save_pretrained(out_dir)


def _forward_keys(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


@torch.no_grad()
def evaluate_model(model, dataset, collator, task: str, batch_size: int = 64) -> dict[str, float]:
    """Accuracy (classification) or token-weighted loss and perplexity (causal LM) of ``model`` on ``dataset``."""
    model.eval()
    keys = _forward_keys(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = total = 0
    loss_sum = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        batch = {k: v.to(device) for k, v in batch.items() if k in keys}
        out = model(**batch)
        labels = batch["labels"]
        if task == "causal-lm":
            tokens = int((labels[:, 1:] != -100).sum())
            loss_sum += float(out.loss) * tokens
            total += tokens
        else:
            correct += int((out.logits.argmax(-1) == labels).sum())
            total += labels.numel()
    if total == 0:
        raise ValueError("`data.eval` has no usable rows to evaluate; check the eval file and `max_eval_samples`.")
    if task == "causal-lm":
        loss = loss_sum / total
        return {"eval_loss": loss, "perplexity": float(torch.tensor(loss).exp())}
    return {"accuracy": correct / total}


def _finish(
    model, ctx: StageContext, out_dir: Path, extra: dict[str, Any] | None = None, tokenizer=None, eval_dataset=None
) -> dict[str, Any]:
    """Save the stage's model and return its report: size statistics and eval metrics.

    ``tokenizer`` / ``eval_dataset`` default to the context's (a vocabulary stage passes its pruned ones).
    """
    from hf_compress.reporting.measure import model_report

    tokenizer = tokenizer if tokenizer is not None else ctx.tokenizer
    eval_dataset = eval_dataset if tokenizer is not ctx.tokenizer else ctx.eval_dataset
    save_model(model, tokenizer, out_dir, ctx.is_main_process)
    details = dict(extra or {})
    if ctx.is_main_process:
        details["model"] = model_report(model, out_dir, batch_sizes=())  # latency: measured by `evaluate`
        if eval_dataset is not None:
            details["metrics"] = evaluate_model(model, eval_dataset, data_collator(tokenizer, ctx.task), ctx.task)
    return details


def _train(trainer) -> dict[str, Any]:
    result = trainer.train()
    return {"train": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


# ------------------------------------------------------------------------------------------------------ stages


def finetune_teacher(stage: dict[str, Any], ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Fine-tune the teacher (a fresh classification head for classification) with a plain ``Trainer``."""
    from transformers import Trainer

    kwargs = {}
    if ctx.task == "sequence-classification":
        names = ctx.spec["data"].get("label_names") or getattr(ctx.train_dataset.features["labels"], "names", None)
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
    model = _auto_class(ctx.task).from_pretrained(ctx.teacher, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = ctx.tokenizer.pad_token_id
    args = training_args(stage.get("training"), out_dir, ctx.seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ctx.train_dataset,
        data_collator=ctx.collator,
        processing_class=ctx.tokenizer,
    )
    return _finish(trainer.model, ctx, out_dir, _train(trainer) | {"source": ctx.spec["model"]["teacher"]})


def _student(stage: dict[str, Any], teacher):
    spec = dict(stage.get("student") or {})
    if "model" in spec:
        path = resolve_model_path(spec.pop("model"))
        if spec:
            raise ValueError(f"`student` takes either `model` or make_student arguments, got both ({sorted(spec)}).")
        return load_model(path), {"student": path}
    from hf_compress.distillation.student import make_student

    return make_student(teacher, **spec), {"student": spec}


def distill(stage: dict[str, Any], ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Distil the teacher into a student made by ``make_student`` (or given as ``student.model``)."""
    from hf_compress.distillation.trainer import DistillationTrainer

    teacher = load_model(ctx.teacher)
    student, info = _student(stage, teacher)
    args = training_args(stage.get("training"), out_dir, ctx.seed, distill=True)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=ctx.train_dataset,
        data_collator=ctx.collator,
        processing_class=ctx.tokenizer,
    )
    return _finish(trainer.model, ctx, out_dir, _train(trainer) | info | {"teacher": ctx.teacher})


def prune(stage: dict[str, Any], ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Prune the latest model with ``PruningCallback`` while recovering by distillation, fine-tuning or nothing."""
    from transformers import Trainer

    from hf_compress.pruning.callback import PruningCallback
    from hf_compress.pruning.config import PruningConfig

    recovery = stage.get("recovery") or "distill"
    if recovery not in RECOVERIES:
        raise ValueError(f"`stages.{stage['name']}.recovery` must be one of {list(RECOVERIES)}, got {recovery!r}.")
    config = PruningConfig(**(stage.get("pruning") or {}))
    model = load_model(ctx.model)
    training = dict(stage.get("training") or {})
    if recovery == "none":
        # one-shot: masks at step 0, a single step that cannot move the weights, surgery at the end
        training |= {"max_steps": 1, "learning_rate": 0.0, "weight_decay": 0.0}
    callbacks = [PruningCallback(config)]
    common = dict(
        train_dataset=ctx.train_dataset,
        data_collator=ctx.collator,
        processing_class=ctx.tokenizer,
        callbacks=callbacks,
    )
    if recovery == "distill":
        from hf_compress.distillation.trainer import DistillationTrainer

        args = training_args(training, out_dir, ctx.seed, distill=True)
        trainer = DistillationTrainer(model=model, teacher_model=load_model(ctx.teacher), args=args, **common)
    else:
        trainer = Trainer(model=model, args=training_args(training, out_dir, ctx.seed), **common)
    details = _train(trainer) | {"recovery": recovery, "pruning": dataclasses.asdict(config)}
    return _finish(trainer.model, ctx, out_dir, details)


def quantize(stage: dict[str, Any], ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Quantise the latest model's linear layers (and embeddings: int8, or int4 with ``embedding_bits: 4``)."""
    from hf_compress.quantization.quantize import quantize_int8

    kwargs = dict(stage.get("quantization") or {})
    model = quantize_int8(load_model(ctx.model), **kwargs)
    return _finish(model, ctx, out_dir, {"quantization": kwargs})


STAGES = {
    "finetune_teacher": finetune_teacher,
    "distill": distill,
    "prune": prune,
    "prune_vocabulary": prune_vocabulary,
    "quantize": quantize,
    "evaluate": evaluate,
    "card": card,
}

"""What the stages of a recipe share: the :class:`StageContext` and the helpers every stage calls.

A stage is a function ``(stage, ctx, out_dir) -> dict``: ``stage`` is the validated
:class:`~hf_compress.recipes.schema.Stage`, ``ctx`` the :class:`StageContext` (the recipe, its tokenizer and
datasets, the teacher and latest model folders), ``out_dir`` the temporary folder to write into. The returned dict
goes into the stage's ``report.json``. Each stage kind has its own module in this package.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, TrainingArguments

from hf_compress.checks import check_label_values
from hf_compress.distillation.config import DistillationConfig
from hf_compress.integrations.sentence_transformers import is_sentence_transformer_folder, transformer_folder
from hf_compress.loading import from_pretrained, save_pretrained
from hf_compress.models.builtin import resolve_model_path
from hf_compress.quantization.quantize import is_quantized
from hf_compress.recipes.data import data_collator, load_text_dataset
from hf_compress.recipes.schema import MODEL_STAGES, Recipe
from hf_compress.recipes.stages import sentence
from hf_compress.reporting.measure import model_report

# the pipeline owns where and how stages write; recipes tune everything else
TRAINING_DEFAULTS = {"report_to": "none", "save_strategy": "no", "eval_strategy": "no", "logging_steps": 50}


@dataclass
class StageContext:
    """What the stages share: the validated recipe, lazily loaded tokenizers / datasets, and the model folders.

    ``tokenizer`` and ``datasets`` are those of the latest model: the recipe's tokenizer until a
    ``prune_vocabulary`` stage writes a pruned one (later stages then train, save and evaluate with it).
    """

    recipe: Recipe
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
    def from_recipe(cls, recipe: Recipe, out: Path, is_main_process: bool = True) -> StageContext:
        teacher = resolve_model_path(recipe.model.teacher)
        return cls(
            recipe=recipe,
            out=Path(out),
            is_main_process=is_main_process,
            teacher=teacher,
            reference=teacher,
            model=teacher,
            tokenizer_source=recipe_tokenizer(recipe),
        )

    @property
    def task(self) -> str:
        return self.recipe.model.task

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def sentence_embedding(self) -> bool:
        """Whether every model of the recipe is a ``SentenceTransformer`` (task ``sentence-embedding``)."""
        return self.task == sentence.TASK

    def load(self, path: str | Path):
        """The model of a stage folder or of the teacher: a ``SentenceTransformer`` for sentence embeddings."""
        return sentence.load(path) if self.sentence_embedding else load_model(path)

    def tokenizer_for(self, source: str):
        """The tokenizer saved in folder ``source`` (loaded once; pad falls back to eos)."""
        if source not in self._tokenizers:
            folder = transformer_folder(source) if is_sentence_transformer_folder(source) else source
            tokenizer = AutoTokenizer.from_pretrained(folder)
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
                self.recipe.data, self.tokenizer_for(source), self.task, seed=self.seed
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
        if self.recipe.model.num_labels:
            check_label_values(self.train_dataset["labels"], self.recipe.model.num_labels, "model.num_labels")
            return self.recipe.model.num_labels
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


def recipe_tokenizer(recipe: Recipe) -> str:
    """The folder (or Hub id) of the recipe's tokenizer: ``model.tokenizer``, else the teacher's."""
    return resolve_model_path(recipe.model.tokenizer or recipe.model.teacher)


def load_model(path: str | Path):
    """Load any stage's model: plain, structurally pruned or int8-quantised (``hf_compress.loading``)."""
    return from_pretrained(path)


def training_args(training: dict[str, Any], out_dir: Path, seed: int, distill: bool = False) -> TrainingArguments:
    """``TrainingArguments`` (``DistillationConfig`` if ``distill``) from a validated ``training`` section.

    ``output_dir`` is the stage folder (validation refuses it in a recipe); ``TRAINING_DEFAULTS`` apply first.
    """
    cls = DistillationConfig if distill else TrainingArguments
    return cls(output_dir=str(out_dir), **{"seed": seed, **TRAINING_DEFAULTS, **training})


def save_model(model, tokenizer, out_dir: Path, is_main_process: bool = True) -> None:
    """Save a (possibly pruned or quantised) model with its tokenizer; only the main process writes."""
    if not is_main_process:
        return
    if is_quantized(model.config):
        model.save_pretrained(out_dir)  # the config carries both the quantisation and the pruned-structure records
    else:
        save_pretrained(model, out_dir)
    tokenizer.save_pretrained(out_dir)


def forward_keys(model) -> set[str]:
    """The argument names of ``model.forward`` (batch columns a model accepts)."""
    return set(inspect.signature(model.forward).parameters)


@torch.no_grad()
def evaluate_model(model, dataset, collator, task: str, batch_size: int = 64) -> dict[str, float]:
    """Accuracy (classification) or token-weighted loss and perplexity (causal LM) of ``model`` on ``dataset``."""
    model.eval()
    keys = forward_keys(model)
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


def finish(
    model, ctx: StageContext, out_dir: Path, extra: dict[str, Any] | None = None, tokenizer=None, eval_dataset=None
) -> dict[str, Any]:
    """Save the stage's model and return its report: size statistics and eval metrics.

    ``tokenizer`` / ``eval_dataset`` default to the context's (a vocabulary stage passes its pruned ones).
    """
    details = dict(extra or {})
    if ctx.sentence_embedding:  # the model carries its tokenizer; the pairs are text
        if ctx.is_main_process:
            sentence.save(model, out_dir)
            measured = sentence.report(model, out_dir, ctx.eval_dataset)
            details["metrics"] = measured.pop("metrics", None)
            details["model"] = measured
        return details
    tokenizer = tokenizer if tokenizer is not None else ctx.tokenizer
    eval_dataset = eval_dataset if tokenizer is not ctx.tokenizer else ctx.eval_dataset
    save_model(model, tokenizer, out_dir, ctx.is_main_process)
    if ctx.is_main_process:
        details["model"] = model_report(model, out_dir, batch_sizes=())  # latency: measured by `evaluate`
        if eval_dataset is not None:
            details["metrics"] = evaluate_model(model, eval_dataset, data_collator(tokenizer, ctx.task), ctx.task)
    return details


def train(trainer) -> dict[str, Any]:
    """Train and return the numeric metrics of the run for the stage report."""
    result = trainer.train()
    return {"train": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}

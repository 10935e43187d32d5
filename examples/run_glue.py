#!/usr/bin/env python
"""Fine-tune a sequence classifier on GLUE-style csv / tsv / json files, with distillation and pruning.

This is the shape of transformers' ``examples/pytorch/text-classification/run_glue.py`` (HfArgumentParser over
dataclasses, ``datasets``, tokenisation, ``Trainer``), reduced to local files. The lines marked ``# hf_compress``
are the only differences from the plain script:

1. the training arguments are ``DistillationConfig`` (``TrainingArguments`` plus ``--temperature``, ``--alpha``...)
   and the Trainer class is ``DistillationTrainer(..., teacher_model=model_args.teacher_name_or_path)``;
2. one callback, ``PruningCallback``, built from ``--prune_heads 0.3``-style arguments (or ``--pruning_config``).

Without ``--teacher_name_or_path`` and pruning arguments it is plain fine-tuning. It runs as
``python examples/run_glue.py ...`` and, unchanged, as ``accelerate launch examples/run_glue.py ...``;
see ``examples/README.md``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    set_seed,
)

from hf_compress.distillation.config import DistillationConfig  # hf_compress: TrainingArguments + distillation knobs
from hf_compress.distillation.trainer import DistillationTrainer  # hf_compress: the Trainer class
from hf_compress.distributed import shutdown_distributed  # hf_compress: clean exit under accelerate launch
from hf_compress.pruning.callback import PruningCallback  # hf_compress: the callback
from hf_compress.pruning.config import PruningConfig  # hf_compress

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model / tokenizer to fine-tune (and, for distillation, which teacher)."""

    model_name_or_path: str = field(metadata={"help": "Path or Hub id of the model to train (the student)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    # hf_compress: the teacher; without it DistillationTrainer trains on the labels like Trainer.
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "Path or Hub id of a fine-tuned teacher to distil from."}
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on."""

    train_file: str | None = field(default=None, metadata={"help": "csv / tsv / json(l) training file."})
    validation_file: str | None = field(default=None, metadata={"help": "csv / tsv / json(l) evaluation file."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation rows."})

    def __post_init__(self):
        if self.train_file is None and self.validation_file is None:
            raise ValueError("`train_file` and `validation_file` are both missing; pass at least one data file.")


@dataclass
class PruningArguments:  # hf_compress: how the PruningCallback is configured from the command line
    """Structured pruning during training (all off by default)."""

    prune_heads: float | None = field(default=None, metadata={"help": "Fraction of attention heads to remove."})
    prune_ffn_neurons: float | None = field(default=None, metadata={"help": "Fraction of FFN neurons to remove."})
    prune_layers: float | None = field(default=None, metadata={"help": "Fraction of whole layers to remove."})
    pruning_schedule: str = field(default="cubic", metadata={"help": "one_shot, linear or cubic."})
    pruning_config: str | None = field(
        default=None, metadata={"help": "A PruningConfig as a JSON file or string (instead of the --prune_* flags)."}
    )

    def to_config(self) -> PruningConfig | None:
        if self.pruning_config is not None:
            text = self.pruning_config
            if os.path.isfile(text):
                with open(text) as f:
                    text = f.read()
            return PruningConfig(**json.loads(text))
        targets = {"heads": self.prune_heads, "ffn_neurons": self.prune_ffn_neurons, "layers": self.prune_layers}
        targets = {name: value for name, value in targets.items() if value}
        return PruningConfig(targets=targets, schedule=self.pruning_schedule) if targets else None


def load_raw_datasets(data_args: DataTrainingArguments) -> datasets.DatasetDict:
    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    files = {split: path for split, path in files.items() if path}
    extension = next(iter(files.values())).rsplit(".", 1)[-1]
    if extension == "tsv":  # GLUE tsv files: tab separated, quotes are ordinary characters
        return datasets.load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE, na_filter=False)
    return datasets.load_dataset("json" if extension in ("json", "jsonl") else extension, data_files=files)


def main():
    # hf_compress: DistillationConfig (and PruningArguments) where run_glue.py has TrainingArguments
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, DistillationConfig, PruningArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args, pruning_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args, pruning_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler()]
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed: {training_args.parallel_mode.value == 'distributed'}"
    )
    set_seed(training_args.seed)

    raw_datasets = load_raw_datasets(data_args)
    reference = raw_datasets["train" if "train" in raw_datasets else "validation"]
    label_list = sorted(reference.unique(data_args.label_column))
    num_labels = len(label_list)
    text_columns = [name for name in reference.column_names if name != data_args.label_column][:2]

    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=True
    )
    label_to_id = {label: i for i, label in enumerate(label_list)}
    model.config.label2id = {str(label): i for label, i in label_to_id.items()}
    model.config.id2label = {i: str(label) for label, i in label_to_id.items()}

    def preprocess_function(examples):
        texts = [examples[name] for name in text_columns]
        result = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        result["label"] = [label_to_id[label] for label in examples[data_args.label_column]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(
            preprocess_function,
            batched=True,
            desc="Running tokenizer on dataset",
            remove_columns=reference.column_names,
        )

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = raw_datasets["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if training_args.do_eval:
        eval_dataset = raw_datasets["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    def compute_metrics(p):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return {"accuracy": float((np.argmax(preds, axis=1) == p.label_ids).mean())}

    # hf_compress: the Trainer class and its teacher, plus the pruning callback; everything else is stock Trainer
    pruning_config = pruning_args.to_config()
    trainer_class = DistillationTrainer if model_args.teacher_name_or_path else Trainer
    teacher_kwargs = {"teacher_model": model_args.teacher_name_or_path} if model_args.teacher_name_or_path else {}
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=[PruningCallback(pruning_config)] if pruning_config else None,
        **teacher_kwargs,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()  # pruned models are saved physically smaller; reload with hf_compress.from_pretrained
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    shutdown_distributed(trainer)


if __name__ == "__main__":
    main()

"""Trainer glue for model cards: write hf_compress's ``README.md`` into every checkpoint and final save of a run.

:class:`ModelCardCallback` writes the card into each ``checkpoint-<step>`` folder (``on_save``) and, when the Trainer
pushes checkpoints to the Hub, into the folders it uploads (``on_push_begin``). :func:`write_trainer_card` renders the
card of the trainer's current model into any folder. The callback implements
:class:`hf_compress.distillation.callbacks.CardWriter`, so ``DistillationTrainer`` (which gets it by default) calls it
from ``save_model`` and ``create_model_card`` (called by ``trainer.push_to_hub()``). The card states what is known
when the folder is written: the teacher, the student's and the teacher's parameter counts, the distillation settings,
each :class:`PruningCallback`'s settings and the sparsity reached so far, and the last evaluation (or "not
evaluated"). Tokens are never read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from huggingface_hub import ModelCard
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, unwrap_peft_model

from hf_compress.models.hub_ids import hub_id
from hf_compress.models.sentence import is_sentence_transformer, transformer_module
from hf_compress.pruning.callback import PruningCallback
from hf_compress.reporting.cards import card_base_model, write_card
from hf_compress.reporting.measure import model_report
from hf_compress.reporting.training_section import last_evaluation, training_section

CARD_NAME = "README.md"
CARD_KEYS = ("model_name", "base_model", "teacher", "datasets", "recipe", "methods", "language", "license")
HYPERPARAMETERS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "seed")


def _inner(model: nn.Module) -> nn.Module:
    """The model a card measures: ``model``, or the transformers model inside a ``SentenceTransformer``."""
    model = unwrap_peft_model(model)
    return transformer_module(model).auto_model if is_sentence_transformer(model) else model


def _name_of(model: nn.Module) -> str:
    """Hub id of ``model`` when it was loaded from one, else the last part of its local path, else its class."""
    model = _inner(model)
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return hub_id(path) or Path(path).name or type(model).__name__


def _distillation_settings(trainer: Trainer) -> dict | None:
    """The distillation settings that shape the loss (never `teacher_model_init_kwargs`: it may hold a token)."""
    kd = getattr(trainer, "distillation_args", None)
    if kd is None:
        return None
    keys = ["temperature", "alpha", "distillation_loss"] + ["jsd_beta"] * (kd["distillation_loss"] == "jsd")
    if kd["hidden_loss_weight"] > 0:
        keys += ["hidden_loss_weight", "hidden_loss"]
    if kd["attention_loss_weight"] > 0:
        keys += ["attention_loss_weight"]
    settings = {key: kd[key] for key in keys}
    if getattr(trainer, "layer_map", None):
        settings["layer_map"] = trainer.layer_map
    return settings


def _check_card_kwargs(card_kwargs: dict) -> dict:
    unknown = sorted(set(card_kwargs) - set(CARD_KEYS))
    if unknown:
        raise TypeError(f"Unknown card argument(s) {unknown}; use only {list(CARD_KEYS)}.")
    return {key: value for key, value in card_kwargs.items() if value is not None}


def _pruning_info(callback: PruningCallback, log_history: list[dict]) -> dict:
    config = callback.config
    info = dict(
        targets=dict(config.targets),
        schedule=config.schedule,
        importance=config.importance,
        scope=config.scope,
        start_step=config.start_step,
        end_step=config.end_step,
    )
    if callback.masks is not None:  # training: the masks are the truth
        return {**info, "sparsity": callback.masks.sparsity(), "state": "masked"}
    logged = next(
        (
            {k.removeprefix("sparsity/"): v for k, v in entry.items() if k.startswith("sparsity/")}
            for entry in reversed(log_history)
            if any(k.startswith("sparsity/") for k in entry)
        ),
        {},
    )
    removed = callback.removed or {}
    counts = {
        "heads": sum(map(len, removed.get("heads", {}).values())),
        "ffn neurons": sum(map(len, removed.get("ffn_neurons", {}).values())),
        "layers": len(removed.get("layers", [])),
    }
    return {**info, "sparsity": logged, "state": "removed" if logged or removed else "none", "removed": counts}


def find_card_callback(trainer: Trainer) -> ModelCardCallback | None:
    """The trainer's :class:`ModelCardCallback`, or ``None``."""
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ModelCardCallback)), None)


def write_trainer_card(trainer: Trainer, folder: str | Path, final: bool = True, **card_kwargs) -> ModelCard:
    """Render the card of ``trainer``'s current model and write ``folder/README.md`` (reading ``folder/config.json``).

    Settings given to the trainer's :class:`ModelCardCallback` apply, overridden by ``card_kwargs``. A
    ``SentenceTransformer`` (a ``SentenceTransformerTrainer`` run) gets a sentence-transformers card: its transformer
    measured, sentence-transformers metadata and loading code, the pair metrics of its last evaluation.

    Args:
        trainer (`Trainer`): a `Trainer` or `DistillationTrainer`, during or after training.
        folder (`str` or `Path`): where the model was (or will be) saved; created when missing.
        final (`bool`, *optional*, defaults to `True`): `False` marks a checkpoint saved while training ran.
        card_kwargs: ``model_name``, ``base_model``, ``teacher``, ``datasets``, ``recipe``, ``methods`` (extra tags),
            ``language``, ``license``.

    Example:

    >>> from hf_compress.reporting.card_callback import write_trainer_card
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.save_model("out/final")  # doctest: +SKIP
    >>> write_trainer_card(trainer, "out/final", datasets=["glue"])  # doctest: +SKIP
    """
    callback = find_card_callback(trainer)
    settings = {**(callback.card_kwargs if callback else {}), **_check_card_kwargs(card_kwargs)}
    args, state = trainer.args, trainer.state
    model = trainer.accelerator.unwrap_model(trainer.model)
    teacher = getattr(trainer, "teacher_model", None)
    teacher_name = settings.pop("teacher", None) or (_name_of(teacher) if teacher is not None else None)
    base_model = settings.pop("base_model", None) or card_base_model(teacher_name, _name_of(model))
    run_name = (args.hub_model_id or "").split("/")[-1] or Path(args.output_dir).resolve().name
    model_name = settings.pop("model_name", None) or run_name
    step = state.global_step
    if final and args.load_best_model_at_end and state.best_global_step:
        step = state.best_global_step  # the Trainer reloaded the best checkpoint's weights
    evaluation = last_evaluation(state.log_history, up_to_step=step)
    report = model_report(_inner(model), batch_sizes=())
    if evaluation is not None and evaluation[0] == step:
        report["metrics"] = evaluation[1]
    if teacher is not None:
        reference, reference_name = model_report(_inner(teacher), batch_sizes=()), f"{teacher_name} (teacher)"
    else:
        reference = callback.initial_report if callback else None
        reference_name = f"{_name_of(model)} (before this run)"
    pruning = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PruningCallback)]
    tags = ["distillation"] * bool(teacher_name) + ["pruning"] * bool(pruning)
    training = training_section(
        step,
        state.max_steps or None,
        final=final,
        teacher=teacher_name,
        distillation=_distillation_settings(trainer),
        pruning=[_pruning_info(cb, state.log_history) for cb in pruning],
        evaluation=evaluation,
        hyperparameters={**{k: getattr(args, k) for k in HYPERPARAMETERS}, "max_steps": state.max_steps},
    )
    os.makedirs(folder, exist_ok=True)
    return write_card(
        folder,
        model_name=model_name,
        base_model=base_model,
        report=report,
        reference_report=reference,
        reference_name=reference_name,
        training=training,
        tags=tags,
        repo_id=args.hub_model_id or model_name,
        sentence_transformers=is_sentence_transformer(unwrap_peft_model(model)),
        **settings,
    )


class ModelCardCallback(TrainerCallback):
    r"""
    Write hf_compress's model card (`README.md`) into every checkpoint folder of a [`~transformers.Trainer`] run.

    The card lists the teacher and the compression table (student vs teacher parameters, or vs the model before the
    run when there is no teacher), the distillation settings, each [`PruningCallback`]'s settings with the sparsity
    reached so far, and the last evaluation (or "not evaluated"). When the Trainer pushes checkpoints to the Hub
    (`push_to_hub=True`, `hub_strategy` other than `"end"`), the pushed folders carry the card too.
    `DistillationTrainer` gets this callback by default and, through its
    [`~hf_compress.distillation.callbacks.CardWriter`] methods (`set_trainer`, `write`), writes the final card in
    `save_model` and `push_to_hub`; with a plain `Trainer`, add it with [`model_card_callback`] and write the final
    card with [`write_trainer_card`].

    Args:
        trainer (`Trainer`, *optional*): the trainer whose run is described; bind it later with `set_trainer`.
        model_name, base_model, teacher, datasets, recipe, methods, language, license (*optional*):
            card settings (see [`write_trainer_card`]); unknown facts are left out rather than guessed.

    Attributes:
        initial_report (`dict`): the parameter counts of the model before training (the reference without teacher).

    Example:

    >>> from transformers import Trainer
    >>> from hf_compress import PruningCallback
    >>> from hf_compress.reporting.card_callback import model_card_callback, write_trainer_card
    >>> trainer = Trainer(  # doctest: +SKIP
    ...     model=model, args=args, train_dataset=data, callbacks=[PruningCallback(config)]
    ... )
    >>> model_card_callback(trainer, datasets=["glue"])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.save_model("out/final")  # doctest: +SKIP
    >>> write_trainer_card(trainer, "out/final")  # doctest: +SKIP
    """

    def __init__(self, trainer: Trainer | None = None, **card_kwargs):
        self.card_kwargs = _check_card_kwargs(card_kwargs)
        self.trainer: Trainer | None = None
        self.initial_report: dict | None = None
        self._training = False
        if trainer is not None:
            self.set_trainer(trainer)

    def set_trainer(self, trainer: Trainer) -> None:
        """Bind the trainer (and measure its model before training, the reference of runs without a teacher)."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"`trainer` must be a transformers `Trainer`, got {type(trainer).__name__}.")
        self.trainer = trainer
        if self.initial_report is None and getattr(trainer, "teacher_model", None) is None:
            self.initial_report = model_report(_inner(trainer.accelerator.unwrap_model(trainer.model)), batch_sizes=())

    def update(self, **card_kwargs) -> None:
        """Change card settings (``datasets``, ``base_model`` ...); `None` values are ignored."""
        self.card_kwargs.update(_check_card_kwargs(card_kwargs))

    def write(self, folder: str | Path, final: bool = True, **card_kwargs) -> ModelCard:
        """Write the card of the bound trainer's current model into ``folder`` (``card_kwargs`` override the
        callback's settings for this card only, see [`write_trainer_card`])."""
        self._require_trainer()
        return write_trainer_card(self.trainer, folder, final=final, **card_kwargs)

    def _require_trainer(self) -> None:
        if self.trainer is None:
            raise ValueError(
                "`ModelCardCallback` has no trainer; add it with `model_card_callback(trainer)` or "
                "call `callback.set_trainer(trainer)`."
            )

    def on_train_begin(self, args, state, control, **kwargs):
        self._require_trainer()
        self._training = True

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            self.write(folder, final=False)

    def on_push_begin(self, args, state, control, **kwargs):
        # During training this is `_push_from_checkpoint`, before `on_save`: card the checkpoint now, and the output
        # folder, which receives that checkpoint's weights and is uploaded. After training, `push_to_hub` follows.
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self._training and args.should_save and os.path.isdir(folder):
            self.write(folder, final=False)
            shutil.copyfile(os.path.join(folder, CARD_NAME), os.path.join(args.output_dir, CARD_NAME))


def model_card_callback(trainer: Trainer, **card_kwargs) -> ModelCardCallback:
    """The trainer's :class:`ModelCardCallback` (added when missing), bound to it, with ``card_kwargs`` applied.

    Example:

    >>> from hf_compress.reporting.card_callback import model_card_callback
    >>> model_card_callback(trainer, datasets=["glue"], license="apache-2.0")  # doctest: +SKIP
    """
    callback = find_card_callback(trainer)
    if callback is None:
        callback = ModelCardCallback()
        trainer.add_callback(callback)
    if callback.trainer is not trainer:
        callback.set_trainer(trainer)
    callback.update(**card_kwargs)
    return callback

"""`DistillationTrainer`: a `Trainer` whose loss mixes a frozen teacher's soft targets with the labels.

Overridden: `__init__` and `compute_loss`, plus `create_optimizer` (to train the hidden-state projection), `log` (to
flush the loss components), `save_model` and `create_model_card` (to write the model card, see
[`~hf_compress.distillation.callbacks.CardWriter`]), `get_batch_samples` (on-policy / sequence-level KD: completions
are generated before the Trainer counts the step's label tokens, see [`~hf_compress.distillation.on_policy`]) and one
private method, `_set_signature_columns_if_needed` (to keep cached teacher and prompt/completion columns: no public
hook exists). The hidden-state projection is checkpointed and resumed by a
callback ([`~hf_compress.distillation.callbacks.HiddenProjectionCheckpoint`]); the training loop, saving,
evaluation and distribution are the Trainer's.
The loss terms are plain functions: the head's logit terms in [`~hf_compress.distillation.logit_terms`], the
hidden-state / attention terms and their layer map in [`~hf_compress.distillation.intermediate`], the teacher
forward in [`~hf_compress.distillation.teacher`].
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import logging

from hf_compress.checks import check_finite_weights
from hf_compress.distillation.cache import CACHE_COLUMNS, TeacherCacheCollator, has_teacher_cache, pop_teacher_outputs
from hf_compress.distillation.callbacks import (
    CardWriter,
    FiniteWeightsCheck,
    HiddenProjection,
    HiddenProjectionCheckpoint,
)
from hf_compress.distillation.checks import (
    LabelChecker,
    check_finite_components,
    check_input_vocabulary,
    label_classes,
)
from hf_compress.distillation.components import LossComponents
from hf_compress.distillation.config import distillation_options
from hf_compress.distillation.intermediate import (
    mapped_attention_loss,
    mapped_hidden_loss,
    output_flags,
    projection_widths,
    resolve_layer_map,
)
from hf_compress.distillation.logit_terms import logit_terms, pop_targets
from hf_compress.distillation.on_policy import (
    GENERATED_KEY,
    TRL_COLUMNS,
    check_generation_options,
    is_on_policy_step,
    rollout,
    special_token_ids,
)
from hf_compress.distillation.placement import placement_for, prepare_teacher
from hf_compress.distillation.teacher import (
    DISTILLED_HEADS,
    build_teacher,
    check_compatible,
    check_student_trains,
    distilled_head,
    teacher_forward,
)
from hf_compress.distributed import register_auto_shutdown

__all__ = ["DistillationTrainer"]

logger = logging.get_logger(__name__)


class DistillationTrainer(Trainer):
    """
    [`~transformers.Trainer`] that distils a frozen `teacher_model` into the trained `model` (the student).

    The loss is `alpha * soft + (1 - alpha) * CE` (see [`distillation_loss`]) plus optional hidden-state and attention
    terms, configured by [`DistillationConfig`] (a plain `TrainingArguments` uses its defaults). Supported heads:
    sequence / token classification, question answering (start and end logits), masked LM, causal LM (shifted) and
    encoder-decoder LM. The teacher is never synchronised or saved: checkpoints hold the student only.
    `trainer.teacher_placement` says where it lives (see [`~hf_compress.distillation.placement`]): a full copy per
    process, or, under accelerate FSDP2 / DeepSpeed ZeRO-3, sharded like the student (`teacher_sharding="auto"`,
    opt-in until verified on a GPU) or replicated (`teacher_sharding="replicate"`).

    Two teacher modes, reported by `trainer.teacher_mode` and logged at start:

    - `"live"`: the teacher runs a forward pass (under `torch.inference_mode()`, or `torch.no_grad()` when hidden or
      attention losses need its intermediate states) on every batch;
    - `"cached"`: the training set holds the columns of [`~hf_compress.distillation.cache.cache_teacher_outputs`];
      batches that carry them use the stored logits and no teacher forward runs (`teacher_model` may be `None`).

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`): The student.
        teacher_model (`PreTrainedModel` or `str`, *optional*):
            The teacher, or a path loaded with the student's Auto class and `args.teacher_model_init_kwargs`. May be
            `None` when the training set holds cached teacher outputs.
        args (`TrainingArguments`, *optional*): Usually a [`DistillationConfig`].
        **kwargs: Every other [`~transformers.Trainer`] argument (`train_dataset`, `data_collator`, ...).

    Attributes:
        default_callbacks (`tuple[type[TrainerCallback], ...]`): Callback classes every instance gets (once each, on
            top of `callbacks`); `hf_compress` sets it to its model-card callback.

    >>> trainer = DistillationTrainer(  # doctest: +SKIP
    ...     model=student, teacher_model="path/to/teacher", args=DistillationConfig("out", alpha=0.9),
    ...     train_dataset=dataset,
    ... )
    >>> trainer.train()  # doctest: +SKIP
    """

    default_callbacks: tuple[type[TrainerCallback], ...] = ()

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: TrainingArguments | None = None,
        **kwargs,
    ):
        self.distillation_args = distillation_options(args)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("`compute_loss_func` is not supported by DistillationTrainer, got a callable; remove it.")
        if model is None:
            raise ValueError("`model` (the student) is required, got None; `model_init` is not supported.")
        super().__init__(model=model, args=args, **kwargs)
        student = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
        self._head = distilled_head(student)
        if self._head is None:
            raise ValueError(
                f"`model` of class {type(student).__name__} is not a supported head; use one of "
                f"{list(DISTILLED_HEADS)}."
            )
        datasets = [self.train_dataset]
        datasets += list(self.eval_dataset.values()) if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        cached = [has_teacher_cache(d) for d in datasets if d is not None]
        self.teacher_mode = "cached" if cached and cached[0] else "live"
        if teacher_model is None and not (cached and all(cached)):
            raise ValueError(
                "`teacher_model` is required unless every dataset holds cached teacher outputs, got None; pass the "
                "teacher or use `hf_compress.distillation.cache.cache_teacher_outputs`."
            )
        if any(cached):
            side = getattr(self.processing_class, "padding_side", None)
            side = side or getattr(getattr(self.data_collator, "tokenizer", None), "padding_side", "right")
            self.data_collator = TeacherCacheCollator(self.data_collator, side)
        # Decided (and an unverified sharding plan refused) before the teacher is loaded.
        sharding = self.distillation_args["teacher_sharding"]
        self.teacher_placement = None if teacher_model is None else placement_for(self.accelerator, sharding)
        self.teacher_model = None if teacher_model is None else self._build_teacher(teacher_model)
        if self.teacher_model is not None:
            self._check_compatible(student, self.teacher_model)
        check_student_trains(student, self.teacher_model)
        self._configure_intermediate_losses(student, self.teacher_model)
        if self.teacher_model is not None:
            self.teacher_model = prepare_teacher(self.teacher_model, self.teacher_placement, self.accelerator)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        live = self.teacher_model is not None
        self._generates = check_generation_options(self.distillation_args, self._head, sharded, live)
        self._special_ids = special_token_ids(student, self.processing_class) if self._generates else None
        logger.info(
            f"DistillationTrainer teacher mode: {self.teacher_mode} ("
            + ("stored teacher logits, no teacher forward" if self.teacher_mode == "cached" else "teacher forward")
            + f" on each training batch), teacher placement: {self.teacher_placement}."
        )
        # Our compute_loss normalises every head by `num_items_in_batch`, so let the Trainer count it for us.
        self.model_accepts_loss_kwargs = True
        self.loss_components = LossComponents()
        for callback_class in self.default_callbacks:
            if not any(isinstance(callback, callback_class) for callback in self.callback_handler.callbacks):
                self.add_callback(callback_class())
        for writer in self.card_writers:
            writer.set_trainer(self)
        self.add_callback(FiniteWeightsCheck())  # never write a checkpoint of NaN / inf weights
        self._check_labels = LabelChecker(label_classes(student, self._head))
        register_auto_shutdown()  # under a process group: clean exit without an explicit shutdown_distributed()

    @property
    def card_writers(self) -> list[CardWriter]:
        """The callbacks that write this trainer's model cards (see [`CardWriter`])."""
        return [callback for callback in self.callback_handler.callbacks if isinstance(callback, CardWriter)]

    # ---- teacher -----------------------------------------------------------------------------------------------

    def _build_teacher(self, teacher: PreTrainedModel | nn.Module | str | None) -> nn.Module:
        kd = self.distillation_args
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        # A sharded teacher stays where it was loaded: sharding moves each rank's part to its device.
        device = self.accelerator.device if self.teacher_placement in ("device", "replicated") else None
        return build_teacher(
            teacher, self._head, kd["teacher_model_init_kwargs"], kd["attention_loss_weight"] > 0, device, dtype
        )

    def _check_compatible(self, student: nn.Module, teacher: nn.Module) -> None:
        check_compatible(student, teacher, self._head, self.processing_class)
        check_input_vocabulary(student, teacher, self.processing_class)

    def _configure_intermediate_losses(self, student: nn.Module, teacher: nn.Module) -> None:
        kd = self.distillation_args
        self.layer_map: dict[int, int] = resolve_layer_map(kd, student, teacher, self._head)
        self.hidden_projection = None
        widths = projection_widths(kd, student, teacher) if self.layer_map else None  # {}: no intermediate loss
        if widths is not None:
            if self.optimizer is not None:
                logger.warning("A custom optimizer was passed: add `trainer.hidden_projection` parameters to it.")
            projection = HiddenProjection(len(self.layer_map), *widths).to(self.accelerator.device)
            # DDP-synchronised; saved in checkpoints (PROJECTION_FILE) for resuming, never with the final model
            self.hidden_projection = self.accelerator.prepare_model(projection)
            self.add_callback(HiddenProjectionCheckpoint(projection))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Public hook: completions are generated before the Trainer counts the step's label tokens.
        kd = self.distillation_args
        if not self._generates:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = list(itertools.islice(epoch_iterator, num_batches))
        step = self.state.global_step
        on_policy = is_on_policy_step(step, kd["on_policy_ratio"], self.args.seed)
        if on_policy or kd["seq_kd"]:
            model = self.accelerator.unwrap_model(self.model) if on_policy else self.teacher_model
            options = dict(
                max_new_tokens=kd["max_new_tokens"],
                temperature=kd["generation_temperature"],
                top_p=kd["generation_top_p"],
                seed=self.args.seed,
                step=step,
                generated_by="student" if on_policy else "teacher",
            )
            eos, pad = self._special_ids
            options.update(eos_token_id=eos, pad_token_id=pad)
            batches = [rollout(model, batch, **options) for batch in batches]
        return super().get_batch_samples(iter(batches), len(batches), device)

    def create_optimizer(self, model=None):
        # Public hook: the projection is trained with the student but is not one of its parameters.
        optimizer = super().create_optimizer(model)
        if self.hidden_projection is not None:
            params = list(self.hidden_projection.parameters())
            known = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not any(id(p) in known for p in params):
                optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        # Private, no public hook: the Trainer drops dataset columns the student's `forward` does not accept.
        """The Trainer keeps the columns of the model's `forward`; cached teacher columns must survive too."""
        super()._set_signature_columns_if_needed()
        extra = CACHE_COLUMNS + TRL_COLUMNS  # TRL_COLUMNS: text for `PromptCompletionCollator`
        self._signature_columns += [c for c in extra if c not in self._signature_columns]

    # ---- loss --------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Student and teacher forward on the same inputs (or cached teacher logits), then soft + hard (+ hidden,
        attention) terms."""
        kd = self.distillation_args
        if self._head == "qa":  # targets are not `labels`: the Trainer does not count them
            num_items_in_batch = None
        inputs = dict(inputs)
        # Student-generated completions: soft term only (no cross-entropy on the student's own samples).
        alpha = 1.0 if inputs.pop(GENERATED_KEY, None) == "student" else kd["alpha"]
        teacher_outputs = pop_teacher_outputs(inputs)
        targets = pop_targets(self._head, inputs)
        self._check_labels(targets.get("labels"), self.state.global_step, 1 - kd["alpha"])
        if self._head == "seq2seq_lm" and "labels" in targets and "decoder_input_ids" not in inputs:
            student = unwrap_peft_model(self.accelerator.unwrap_model(model))
            inputs["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(labels=targets["labels"])
        flags = output_flags(kd)
        if teacher_outputs is None:  # teacher first: its activations are freed before the student's graph is built
            teacher_outputs = self._teacher_forward(inputs, flags)
        elif flags:
            raise ValueError(
                "`hidden_loss_weight` and `attention_loss_weight` must be 0 for batches with cached teacher outputs, "
                f"got {kd['hidden_loss_weight']} and {kd['attention_loss_weight']}."
            )
        outputs = model(**inputs, **flags)

        smoothing = self.args.label_smoothing_factor
        token_loss, components = logit_terms(
            self._head, outputs, teacher_outputs, inputs, targets, kd, alpha, num_items_in_batch, smoothing
        )
        aux, mask = 0.0, inputs.get("attention_mask")
        if kd["hidden_loss_weight"] > 0:
            components["loss_hidden"] = mapped_hidden_loss(
                outputs, teacher_outputs, self.layer_map, kd["hidden_loss"], mask, self.hidden_projection
            )
            aux = aux + kd["hidden_loss_weight"] * components["loss_hidden"]
        if kd["attention_loss_weight"] > 0:
            components["loss_attention"] = mapped_attention_loss(outputs, teacher_outputs, self.layer_map, mask)
            aux = aux + kd["attention_loss_weight"] * components["loss_attention"]
        check_finite_components(components, self.state.global_step)  # before backward and the optimizer step

        # Token terms are sums over the whole accumulated (and, averaged across devices, global) batch divided by
        # `num_items_in_batch`; the Trainer then neither divides by accumulation steps nor lets DDP average them away.
        grad_accum = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        scaled = num_items_in_batch is not None
        token_scale = 1
        if scaled and self.args.average_tokens_across_devices:
            token_scale = self.accelerator.num_processes // self.get_tp_size()
        aux_scale = 1 / grad_accum if scaled else 1
        loss = token_loss * token_scale + aux * aux_scale
        mode = "train" if model.training else "eval"
        log_scale = 1 if scaled else 1 / grad_accum
        self.loss_components.record(mode, self.state.global_step, components, token_scale, aux_scale, log_scale)
        if return_outputs:
            drop = {"hidden_states", "attentions", "encoder_hidden_states", "decoder_hidden_states"}
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in drop})
        return (loss, outputs) if return_outputs else loss

    def _teacher_forward(self, inputs: dict[str, Any], flags: dict[str, bool]):
        if self.teacher_model is None:
            raise ValueError(
                f"`teacher_model` is None but a batch has no cached teacher columns ({', '.join(CACHE_COLUMNS)}); "
                "pass the teacher or cache its outputs for this dataset too."
            )
        return teacher_forward(self.teacher_model, inputs, flags, self._head)

    # ---- logging -----------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Public hook: the loss components are gathered across processes exactly when the Trainer logs its loss.
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if mode is not None:
            logs.update(
                self.loss_components.flush(
                    mode, self.state.global_step, self.accelerator.gather, self.accelerator.device
                )
            )
        super().log(logs, start_time)

    # ---- model card --------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student as `Trainer` does, plus the model card of each [`CardWriter`] callback."""
        # Public hook: no callback event fires on `save_model`.
        check_finite_weights(self.model, output_dir or self.args.output_dir)
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            for writer in self.card_writers:
                writer.write(output_dir or self.args.output_dir)

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
    ) -> None:
        """Write the [`CardWriter`] callbacks' card to `args.output_dir/README.md` (`push_to_hub` uploads it), or
        transformers' card when there is none. `tasks` and `dataset_args` are unused (`config.json` has the task)."""
        # Public hook: `push_to_hub` calls it to write the card it uploads.
        writers = self.card_writers
        if not writers:
            return super().create_model_card(
                language, license, tags, model_name, finetuned_from, tasks, dataset_tags, dataset, dataset_args
            )
        if self.is_world_process_zero():
            datasets = dataset if dataset is not None else dataset_tags
            for writer in writers:
                writer.write(
                    self.args.output_dir,
                    model_name=model_name,
                    base_model=finetuned_from,
                    datasets=[datasets] if isinstance(datasets, str) else datasets,
                    methods=[tags] if isinstance(tags, str) else tags,
                    language=language,
                    license=license,
                )

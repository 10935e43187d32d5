"""`DistillationConfig`: `TrainingArguments` plus the knobs of knowledge distillation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from transformers import TrainingArguments

from hf_compress.checks import check_finite, check_training_arguments


@dataclass
class DistillationConfig(TrainingArguments):
    r"""
    Configuration of [`DistillationTrainer`]: every [`~transformers.TrainingArguments`] field plus the ones below.
    A plain `TrainingArguments` also works with the trainer; the distillation fields then take these defaults.

    Parameters:
        > Soft (teacher) term

        temperature (`float`, *optional*, defaults to `4.0`):
            Softmax temperature `T` of the soft term, > 0. The soft term is scaled by `T**2`.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the soft term in [0, 1]; the label cross-entropy gets `1 - alpha`.
        distillation_loss (`str`, *optional*, defaults to `"kl"`):
            Divergence of the soft term: `"kl"` (forward KL(teacher || student)), `"reverse_kl"`, `"jsd"`
            (generalised Jensen-Shannon) or `"mse"` (on logits).
        jsd_beta (`float`, *optional*, defaults to `0.5`):
            Teacher weight of the `"jsd"` mixture, in (0, 1).
        loss_chunk_size (`int`, *optional*, defaults to `1024`):
            Token positions per chunk when computing token-level losses over a large vocabulary. On CPU chunks are
            further capped at about 2**18 logits (5 positions at a 50k vocabulary), which keeps them in cache.

        > Intermediate-layer terms

        hidden_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the hidden-state loss (0 disables it). Widths that differ get a learned linear projection.
        hidden_loss (`str`, *optional*, defaults to `"mse"`):
            Hidden-state distance: `"mse"` or `"cosine"`.
        layer_map (`dict[int, int]` or `str`, *optional*):
            Student layer -> teacher layer (0-based transformer layers) for the hidden-state and attention losses, as
            a dict or a JSON string such as `'{"0": 1, "1": 3}'`. Defaults to [`default_layer_map`]: spread
            uniformly, last layer to last layer.
        attention_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the TinyBERT attention-map MSE (0 disables it). Needs `"eager"` attention and equal head counts.

        > Teacher

        teacher_model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments (or a JSON string) for `from_pretrained` when the teacher is given as a path, e.g.
            `{"dtype": "bfloat16"}`. `trust_remote_code` defaults to `False`.
        teacher_sharding (`str`, *optional*, defaults to `"auto"`):
            Under a sharded student (accelerate FSDP2, DeepSpeed ZeRO-3): `"auto"` shards the teacher the same way,
            `"replicate"` keeps a full teacher copy on every rank. Without sharding the teacher is a full copy
            either way. See [`~hf_compress.distillation.placement`] (the sharded paths are still opt-in).

        > On-policy and sequence-level distillation (causal LMs, prompt/completion data; see
        > [`~hf_compress.distillation.on_policy`])

        on_policy_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of optimizer steps whose completions the student generates (GKD's lambda), in [0, 1]: 0 trains
            on the dataset's completions, 1 is fully on-policy. Loss on completion tokens only; generated batches
            use the soft term only (no cross-entropy on the student's own tokens).
        seq_kd (`bool`, *optional*, defaults to `False`):
            Sequence-level KD: the steps not drawn on-policy train on teacher-generated completions (soft and hard
            terms) instead of the dataset's.
        max_new_tokens (`int`, *optional*, defaults to `128`):
            Longest generated completion.
        generation_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of generated completions, >= 0 (0 is greedy).
        generation_top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus (top-p) mass of generated completions, in (0, 1].

    >>> from transformers import HfArgumentParser
    >>> (config,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
    ...     ["--output_dir", "out", "--temperature", "2.0", "--alpha", "0.9"]
    ... )
    >>> config.temperature, config.alpha
    (2.0, 0.9)
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["layer_map", "teacher_model_init_kwargs"]

    temperature: float = field(default=4.0, metadata={"help": "Softmax temperature of the soft term (> 0)."})
    alpha: float = field(
        default=0.5, metadata={"help": "Weight of the soft term in [0, 1]; the label loss gets 1 - alpha."}
    )
    distillation_loss: Literal["kl", "reverse_kl", "jsd", "mse"] = field(
        default="kl", metadata={"help": "Divergence of the soft term: kl, reverse_kl, jsd or mse (on logits)."}
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "Teacher weight of the jsd mixture, in (0, 1)."})
    loss_chunk_size: int = field(
        default=1024,
        metadata={"help": "Token positions per chunk for token-level losses (on CPU capped at ~2**18 logits)."},
    )
    hidden_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-state loss (0 disables it)."}
    )
    hidden_loss: Literal["mse", "cosine"] = field(
        default="mse", metadata={"help": "Hidden-state distance: mse or cosine."}
    )
    layer_map: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Student layer -> teacher layer map as JSON, e.g. \'{"0": 1, "1": 3}\'. Defaults to a uniform '
            "spread with last layer mapped to last layer."
        },
    )
    attention_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the attention-map MSE loss (0 disables it)."}
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": 'JSON kwargs for from_pretrained when the teacher is a path, e.g. \'{"dtype": "bfloat16"}\'.'
        },
    )
    teacher_sharding: Literal["auto", "replicate"] = field(
        default="auto",
        metadata={"help": "Under FSDP2 / ZeRO-3: auto shards the teacher like the student, replicate copies it."},
    )

    on_policy_ratio: float = field(
        default=0.0,
        metadata={"help": "Fraction of steps whose completions the student generates (GKD lambda), in [0, 1]."},
    )
    seq_kd: bool = field(
        default=False, metadata={"help": "Train the other steps on teacher-generated completions (sequence KD)."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generated completion (tokens)."})
    generation_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of generated completions (>= 0; 0 is greedy)."}
    )
    generation_top_p: float = field(
        default=1.0, metadata={"help": "Nucleus (top-p) mass of generated completions, in (0, 1]."}
    )

    def __post_init__(self):
        # parsed before TrainingArguments, whose bare json.loads of "{..." strings names no field when it fails
        for name in ("layer_map", "teacher_model_init_kwargs"):  # JSON strings not starting with "{" included
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, _parse_json_dict(name, value))
        super().__post_init__()
        check_training_arguments(self)
        if self.layer_map is not None:
            self.layer_map = _int_layer_map(self.layer_map)
        validate_distillation_options({name: getattr(self, name) for name in DISTILLATION_DEFAULTS})


DISTILLATION_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(DistillationConfig) if f.name not in {g.name for g in fields(TrainingArguments)}
}
"""The distillation fields of [`DistillationConfig`] and their defaults (the one source of defaults)."""


def distillation_options(args: TrainingArguments) -> dict[str, Any]:
    """Read the distillation fields from `args` (a `DistillationConfig` or a plain `TrainingArguments`) and validate.

    Missing fields take [`DISTILLATION_DEFAULTS`]; `args` is never modified.
    """
    if args is not None:
        check_training_arguments(args)
    options = {name: getattr(args, name, default) for name, default in DISTILLATION_DEFAULTS.items()}
    for name in ("layer_map", "teacher_model_init_kwargs"):
        if isinstance(options[name], str):
            options[name] = _parse_json_dict(name, options[name])
    if options["layer_map"] is not None:
        options["layer_map"] = _int_layer_map(options["layer_map"])
    options["teacher_model_init_kwargs"] = dict(options["teacher_model_init_kwargs"] or {})
    validate_distillation_options(options)
    return options


def validate_distillation_options(options: dict[str, Any]) -> None:
    """Raise a one-sentence `ValueError` for the first invalid distillation option."""
    for name in ("temperature", "alpha", "jsd_beta", "hidden_loss_weight", "attention_loss_weight"):
        check_finite(name, options[name])
    if not options["temperature"] > 0:
        raise ValueError(f"`temperature` must be > 0, got {options['temperature']}.")
    if not 0 <= options["alpha"] <= 1:
        raise ValueError(f"`alpha` must be in [0, 1], got {options['alpha']}.")
    choices = {
        "distillation_loss": ["kl", "reverse_kl", "jsd", "mse"],
        "hidden_loss": ["mse", "cosine"],
        "teacher_sharding": ["auto", "replicate"],
    }
    for name, valid in choices.items():
        if options[name] not in valid:
            raise ValueError(f"`{name}` must be one of {valid}, got {options[name]!r}.")
    if not 0 < options["jsd_beta"] < 1:
        raise ValueError(f"`jsd_beta` must be in (0, 1), got {options['jsd_beta']}.")
    if int(options["loss_chunk_size"]) < 1:
        raise ValueError(f"`loss_chunk_size` must be >= 1, got {options['loss_chunk_size']}.")
    for name in ("hidden_loss_weight", "attention_loss_weight"):
        if options[name] < 0:
            raise ValueError(f"`{name}` must be >= 0, got {options[name]}.")
    if not 0 <= options["on_policy_ratio"] <= 1:
        raise ValueError(f"`on_policy_ratio` must be in [0, 1], got {options['on_policy_ratio']}.")
    if int(options["max_new_tokens"]) < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {options['max_new_tokens']}.")
    if not options["generation_temperature"] >= 0:
        value = options["generation_temperature"]
        raise ValueError(f"`generation_temperature` must be >= 0 (0 is greedy), got {value}.")
    if not 0 < options["generation_top_p"] <= 1:
        raise ValueError(f"`generation_top_p` must be in (0, 1], got {options['generation_top_p']}.")
    for name in ("layer_map", "teacher_model_init_kwargs"):
        if options[name] is not None and not isinstance(options[name], dict):
            raise ValueError(f"`{name}` must be a dict or a JSON string, got {type(options[name]).__name__}.")


def default_layer_map(num_student_layers: int, num_teacher_layers: int) -> dict[int, int]:
    """
    Spread student layers uniformly over the teacher's, last layer to last layer (0-based).

    >>> default_layer_map(2, 4)
    {0: 1, 1: 3}
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"`num_student_layers` and `num_teacher_layers` must be >= 1, got {num_student_layers} and "
            f"{num_teacher_layers}."
        )
    return {i: -(-(i + 1) * num_teacher_layers // num_student_layers) - 1 for i in range(num_student_layers)}


def _parse_json_dict(name: str, value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"`{name}` must be a JSON object such as '{{\"0\": 1}}', got {value!r}.") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"`{name}` must be a JSON object such as '{{\"0\": 1}}', got {value!r}.")
    return parsed


def _int_layer_map(layer_map: dict) -> dict[int, int]:
    try:
        return {int(k): int(v) for k, v in layer_map.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"`layer_map` must map integer layer indices to integers, got {layer_map!r}.") from err

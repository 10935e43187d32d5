"""DistillationConfig parsing, defaults and validation."""

import dataclasses
import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_compress.distillation.config import (
    DISTILLATION_DEFAULTS,
    DistillationConfig,
    default_layer_map,
    distillation_options,
)


def test_parses_from_cli_strings(tmp_path):
    (config,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--temperature", "2.5", "--alpha", "0.9",
            "--distillation_loss", "jsd", "--jsd_beta", "0.25", "--loss_chunk_size", "256",
            "--hidden_loss_weight", "1.5", "--hidden_loss", "cosine", "--layer_map", '{"0": 1, "1": 3}',
            "--attention_loss_weight", "0.1", "--teacher_model_init_kwargs", '{"dtype": "bfloat16"}',
            "--learning_rate", "1e-3", "--use_cpu", "true",
        ]
    )  # fmt: skip
    assert type(config) is DistillationConfig and config.use_cpu is True
    assert (config.temperature, config.alpha, config.distillation_loss, config.jsd_beta) == (2.5, 0.9, "jsd", 0.25)
    assert (config.loss_chunk_size, config.hidden_loss_weight, config.hidden_loss) == (256, 1.5, "cosine")
    assert config.layer_map == {0: 1, 1: 3}
    assert config.attention_loss_weight == 0.1
    assert config.teacher_model_init_kwargs == {"dtype": "bfloat16"}
    assert config.learning_rate == 1e-3
    assert json.loads(config.to_json_string())["layer_map"] == {"0": 1, "1": 3}


def test_cli_rejects_unknown_choice(tmp_path):
    with pytest.raises(SystemExit):
        HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--distillation_loss", "wasserstein"]
        )


def test_every_distillation_field_has_help():
    names = set(DISTILLATION_DEFAULTS)
    assert names == {
        "temperature", "alpha", "distillation_loss", "jsd_beta", "loss_chunk_size", "hidden_loss_weight",
        "hidden_loss", "layer_map", "attention_loss_weight", "teacher_model_init_kwargs", "on_policy_ratio", "seq_kd",
        "max_new_tokens", "generation_temperature", "generation_top_p", "teacher_sharding",
    }  # fmt: skip
    for f in dataclasses.fields(DistillationConfig):
        if f.name in names:
            assert f.metadata.get("help"), f.name
            assert f.name in DistillationConfig.__doc__, f.name


def test_defaults(tmp_path):
    config = DistillationConfig(output_dir=str(tmp_path))
    assert (config.temperature, config.alpha, config.distillation_loss) == (4.0, 0.5, "kl")
    assert (config.hidden_loss_weight, config.attention_loss_weight, config.layer_map) == (0.0, 0.0, None)
    assert DISTILLATION_DEFAULTS["temperature"] == 4.0 and DISTILLATION_DEFAULTS["loss_chunk_size"] == 1024


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "`temperature` must be > 0, got 0.0."),
        ({"temperature": -1.0}, "`temperature` must be > 0, got -1.0."),
        ({"alpha": 1.2}, r"`alpha` must be in \[0, 1\], got 1.2."),
        ({"alpha": -0.1}, r"`alpha` must be in \[0, 1\], got -0.1."),
        ({"jsd_beta": 0.0}, r"`jsd_beta` must be in \(0, 1\), got 0.0."),
        ({"loss_chunk_size": 0}, "`loss_chunk_size` must be >= 1, got 0."),
        ({"hidden_loss_weight": -1.0}, "`hidden_loss_weight` must be >= 0, got -1.0."),
        ({"attention_loss_weight": -1.0}, "`attention_loss_weight` must be >= 0, got -1.0."),
        ({"distillation_loss": "tvd"}, "`distillation_loss` must be one of"),
        ({"hidden_loss": "l1"}, "`hidden_loss` must be one of"),
        ({"layer_map": "[1, 2]"}, "`layer_map` must be a JSON object"),
        ({"layer_map": {"a": 1}}, "`layer_map` must map integer layer indices"),
    ],
)
def test_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(output_dir=str(tmp_path), **kwargs)


def test_plain_training_arguments_get_defaults_without_mutation(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path))
    before = dict(vars(args))
    options = distillation_options(args)
    assert options["temperature"] == 4.0 and options["alpha"] == 0.5
    assert options["teacher_model_init_kwargs"] == {}
    assert dict(vars(args)) == before
    assert not hasattr(args, "temperature")


def test_options_read_config_values(tmp_path):
    config = DistillationConfig(output_dir=str(tmp_path), alpha=0.8, layer_map={"1": "0"})
    options = distillation_options(config)
    assert options["alpha"] == 0.8 and options["layer_map"] == {1: 0}
    config.temperature = 0  # changed after validation: caught again when read
    with pytest.raises(ValueError, match="`temperature` must be > 0, got 0."):
        distillation_options(config)


@pytest.mark.parametrize(
    "student,teacher,expected",
    [
        (2, 4, {0: 1, 1: 3}),
        (3, 12, {0: 3, 1: 7, 2: 11}),
        (4, 4, {0: 0, 1: 1, 2: 2, 3: 3}),
        (4, 2, {0: 0, 1: 0, 2: 1, 3: 1}),
        (1, 6, {0: 5}),
    ],
)
def test_default_layer_map(student, teacher, expected):
    assert default_layer_map(student, teacher) == expected


def test_default_layer_map_rejects_empty():
    with pytest.raises(ValueError, match="must be >= 1"):
        default_layer_map(0, 4)

"""PruningConfig: target resolution, validation messages and HfArgumentParser parsing."""

import pytest
from transformers import HfArgumentParser

from hf_compress.pruning.config import PruningConfig


def test_defaults_prune_half_of_the_weights():
    config = PruningConfig()
    assert config.targets == {"unstructured": 0.5}
    assert config.schedule == "cubic" and config.scope == "global" and config.min_heads_per_layer == 1


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(target="heads", sparsity=0.3), {"heads": 0.3}),
        (dict(target=["heads", "ffn_neurons"], sparsity=0.4), {"heads": 0.4, "ffn_neurons": 0.4}),
        (dict(target="heads, layers", sparsity=0.25), {"heads": 0.25, "layers": 0.25}),
        (dict(targets={"heads": 0.3, "ffn_neurons": 0.4}), {"heads": 0.3, "ffn_neurons": 0.4}),
        (dict(targets='{"layers": 0.5}'), {"layers": 0.5}),
        (dict(targets={"heads": 0.3}, target="heads", sparsity=0.3), {"heads": 0.3}),
    ],
)
def test_targets_resolve_to_one_dict(kwargs, expected):
    assert PruningConfig(**kwargs).targets == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.2), "`sparsity` must be in [0, 1), got 1.2"),
        (dict(targets={"heads": -0.1}), "`sparsity` must be in [0, 1), got -0.1"),
        (dict(target="neurons"), "`target` must be one of"),
        (dict(targets={"heads": 0.3}, sparsity=0.5), "disagrees with `target` / `sparsity`"),
        (dict(targets={}), "`targets` must be a non-empty dict"),
        (dict(schedule="exponential"), "`schedule` must be one of"),
        (dict(importance="fisher"), "`importance` must be one of"),
        (dict(scope="layer"), "`scope` must be 'global' or 'local'"),
        (dict(frequency=0), "`frequency` must be >= 1, got 0"),
        (dict(start_step=5, end_step=2), "`end_step` must be >= `start_step`"),
        (dict(min_heads_per_layer=0), "`min_heads_per_layer` must be >= 1, got 0"),
        (dict(calibration_batches=0), "`calibration_batches` must be >= 1"),
        (dict(target="heads", importance="block_influence"), "scores whole layers only"),
        (dict(importance="taylor", start_step=1), "not supported for the 'unstructured' target"),
        (dict(target="heads", importance="taylor"), "`start_step` must be >= 1"),
    ],
)
def test_invalid_values_raise_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        PruningConfig(**kwargs)


def test_block_influence_for_layers_is_valid():
    assert PruningConfig(target="layers", sparsity=0.25, importance="block_influence").targets == {"layers": 0.25}


def test_parses_with_hf_argument_parser():
    parser = HfArgumentParser(PruningConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--targets",
            '{"heads": 0.3, "ffn_neurons": 0.4}',
            "--schedule",
            "linear",
            "--end_step",
            "10",
            "--importance",
            "taylor",
            "--start_step",
            "2",
        ]
    )
    assert config.targets == {"heads": 0.3, "ffn_neurons": 0.4}
    assert (config.schedule, config.end_step, config.importance, config.start_step) == ("linear", 10, "taylor", 2)
    (config,) = parser.parse_args_into_dataclasses(["--target", "heads,ffn_neurons", "--sparsity", "0.2"])
    assert config.targets == {"heads": 0.2, "ffn_neurons": 0.2}


def test_structured_targets_are_ordered():
    config = PruningConfig(targets={"layers": 0.25, "unstructured": 0.1, "heads": 0.5})
    assert config.structured_targets == ["heads", "layers"]

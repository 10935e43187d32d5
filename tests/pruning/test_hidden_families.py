"""Hidden-size pruning beyond the families of tests/pruning/test_hidden.py: refused ones, mixtures of experts."""

import pytest
import torch
import transformers

from hf_compress.models.table import FAMILIES
from hf_compress.pruning import prune_hidden
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.hidden import check_zero_channel_oracle, first_output, zero_hidden_channels
from tests.conftest import train_args
from tests.pruning.test_experts import MOE, moe_model
from tests.tiny_models import lm_head, tiny_model

REFUSED = ["olmo2", "bart", "whisper", "vit", "deit"]
CHANNELS = [1, 6, 7, 13]


def _tokens(n: int = 16, seq: int = 8) -> list[dict]:
    ids = torch.randint(3, 64, (n, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)


def _sentence(parameter, family):
    model_type = tiny_model(family).config.model_type
    return (
        f"`{parameter}` asks to prune the hidden size of a {model_type!r} model, which hf_compress cannot do: "
        f"{FAMILIES[model_type].hidden_refused}."
    )


@pytest.mark.parametrize("family", REFUSED)
def test_prune_hidden_refuses_in_one_sentence_and_leaves_the_model_unchanged(family):
    model = tiny_model(family, lm_head(family))
    before = _state(model)
    with pytest.raises(ValueError) as error:
        prune_hidden(model, CHANNELS)
    assert str(error.value) == _sentence("model", family)
    assert "instead" in str(error.value) and str(error.value).count(". ") == 0
    with pytest.raises(ValueError, match="cannot do"):
        zero_hidden_channels(model, CHANNELS)
    _assert_unchanged(model, before)
    assert model.config.hidden_size == 16


@pytest.mark.parametrize("family", REFUSED)
@pytest.mark.parametrize("config", [{"targets": {"hidden": 0.25}}, {"budget": 1000}], ids=["hidden", "budget"])
def test_pruning_callback_refuses_when_the_trainer_is_built_and_at_train_begin(family, config, tmp_path):
    model = tiny_model(family, lm_head(family))
    before = _state(model)
    parameter = "targets" if "targets" in config else "budget"
    callback = PruningCallback(PruningConfig(**config))
    args = train_args(tmp_path)
    with pytest.raises(ValueError) as error:
        transformers.Trainer(model=model, args=args, callbacks=[callback])
    assert str(error.value) == _sentence(parameter, family)
    state = transformers.TrainerState(max_steps=6)
    with pytest.raises(ValueError) as error:  # `trainer.add_callback` after construction: refused before any step
        callback.on_train_begin(args, state, transformers.TrainerControl(), model=model)
    assert str(error.value) == _sentence(parameter, family)
    assert callback.masks is None
    _assert_unchanged(model, before)


@pytest.mark.parametrize("family", MOE)
def test_moe_dead_channels_leave_outputs_unchanged(family):
    assert check_zero_channel_oracle(moe_model(family), CHANNELS) < 1e-5


@pytest.mark.parametrize("family", MOE)
def test_moe_hidden_pruning_slices_experts_and_router_and_reloads(family, tmp_path):
    model = moe_model(family)
    experts, router = model.model.layers[0].mlp.experts, model.model.layers[0].mlp.gate
    keep = [c for c in range(16) if c not in CHANNELS]
    gate_up, down, routing = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone(), router.weight
    routing = routing.detach().clone()
    prune_hidden(model, CHANNELS)
    torch.testing.assert_close(experts.gate_up_proj.detach(), gate_up[:, :, keep])
    torch.testing.assert_close(experts.down_proj.detach(), down[:, keep, :])
    torch.testing.assert_close(router.weight.detach(), routing[:, keep])
    assert experts.hidden_dim == router.hidden_dim == model.config.hidden_size == 12
    inputs = {"input_ids": torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))}
    expected = first_output(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_size == 12
    torch.testing.assert_close(first_output(reloaded, inputs), expected, rtol=0, atol=1e-6)


def test_moe_dense_blocks_are_sliced_through_their_mlp():
    model = moe_model("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])
    assert check_zero_channel_oracle(model, CHANNELS) < 1e-5
    prune_hidden(model, CHANNELS)
    assert model.model.layers[1].mlp.up_proj.in_features == model.model.layers[1].mlp.down_proj.out_features == 12


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_hidden_target_trains_smaller_and_reloads(family, importance, tmp_path):
    model = moe_model(family)
    config = PruningConfig(targets={"hidden": 0.25}, schedule="one_shot", importance=importance, calibration_batches=2)
    args = train_args(tmp_path, max_steps=3, per_device_train_batch_size=4)
    transformers.Trainer(model=model, args=args, train_dataset=_tokens(), callbacks=[PruningCallback(config)]).train()
    assert model.config.hidden_size == 12
    inputs = {"input_ids": torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))}
    model.save_pretrained(tmp_path / "pruned")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(first_output(reloaded, inputs), first_output(model.eval(), inputs), rtol=0, atol=1e-6)


def test_moe_budget_is_refused_before_training(tmp_path):
    model = moe_model("mixtral")
    with pytest.raises(ValueError, match=r"^`budget` is 1000, .* mixture-of-experts model \(mixtral\).*"):
        transformers.Trainer(model=model, args=train_args(tmp_path), callbacks=[PruningCallback(budget=1000)])

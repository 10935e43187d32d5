import copy

import pytest
import torch
import transformers
import yaml
from transformers import Trainer, TrainingArguments

from hf_compress.cli import main
from hf_compress.pruning.activations import activation_scores, block_skip_scores
from hf_compress.pruning.budget import (
    Shape,
    apply_shape,
    candidate_shapes,
    count_parameters,
    plan_budget,
    search_budget,
)
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.hidden import first_output
from hf_compress.recipes.schema import REPO_ROOT
from tests.conftest import write_recipe
from tests.tiny_models import ENCODERS, tiny_inputs, tiny_model, tiny_tokenizer

BATCHES = [tiny_inputs(seed=1), tiny_inputs(seed=2)]


def _lm(family):
    return tiny_model(family, "masked_lm" if family in ENCODERS else "causal_lm")


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_counts_match_the_pruned_model_exactly(family):
    model = _lm(family)
    scores, layers = activation_scores(model, BATCHES), block_skip_scores(model, BATCHES)
    for shape, counted in candidate_shapes(model, int(0.8 * _params(model)))[:3]:
        pruned = apply_shape(copy.deepcopy(model), shape, scores, layers)
        assert counted == _params(pruned) == count_parameters(model, shape)
        assert pruned.config.hidden_size == shape.hidden and pruned.config.num_hidden_layers == shape.layers


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_head_width_families_keep_hidden_over_head_dim_heads(family):
    for shape, _ in candidate_shapes(_lm(family), 7000, slack=0.5):
        assert shape.heads * 4 == shape.hidden


def test_search_returns_a_shape_within_budget_and_its_table(family, capsys):
    model = _lm(family)
    budget = int(0.7 * _params(model))
    before = first_output(model, BATCHES[0])
    result = search_budget(model, budget, BATCHES, max_candidates=3)
    assert _params(result.model) <= budget
    assert len(result.table) == 3 and sum(row["chosen"] for row in result.table) == 1
    chosen = next(row for row in result.table if row["chosen"])
    assert chosen["kl"] == min(row["kl"] for row in result.table)
    assert Shape(chosen["layers"], chosen["hidden"], chosen["heads"], chosen["ffn"]) == result.shape
    assert chosen["params"] == _params(result.model)
    assert "params" in capsys.readouterr().out
    torch.testing.assert_close(first_output(model, BATCHES[0]), before)  # the input model is untouched


def test_budget_result_reloads_with_plain_from_pretrained(tmp_path):
    model = tiny_model("qwen3", "causal_lm")
    result = search_budget(model, int(0.6 * _params(model)), BATCHES, max_candidates=2, verbose=False)
    result.model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(first_output(reloaded, BATCHES[0]), first_output(result.model, BATCHES[0]))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_every_candidate_shape_saves_where_the_config_checks_heads(family, tmp_path):
    # widths 0.875 / 0.8 / 0.7 of 16 are 14 / 13 / 11 channels, which LlamaConfig / Gemma2Config refuse with 4 heads
    model = _lm(family)
    grid = dict(depth=(1.0,), width=(1.0, 0.875, 0.8, 0.7), heads=(1.0, 0.5), ffn=(1.0,), slack=1.0)
    candidates = [shape for shape, _ in candidate_shapes(model, _params(model), **grid)]
    assert {(s.hidden, s.heads) for s in candidates} == {(16, 4), (12, 4), (16, 2), (14, 2), (12, 2)}
    scores, layers = activation_scores(model, BATCHES), block_skip_scores(model, BATCHES)
    for index, shape in enumerate(candidates):
        pruned = apply_shape(copy.deepcopy(model), shape, scores, layers)
        pruned.save_pretrained(tmp_path / str(index))
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / str(index)).eval()
        assert (reloaded.config.hidden_size, reloaded.config.num_attention_heads) == (shape.hidden, shape.heads)
    result = search_budget(model, int(0.8 * _params(model)), BATCHES, max_candidates=3, verbose=False, **grid)
    result.model.save_pretrained(tmp_path / "chosen")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "chosen").eval()
    torch.testing.assert_close(first_output(reloaded, BATCHES[0]), first_output(result.model, BATCHES[0]))


def test_impossible_budgets_are_one_sentence_errors():
    model = tiny_model("llama", "causal_lm")
    with pytest.raises(ValueError, match="below the smallest candidate"):
        candidate_shapes(model, 100)
    with pytest.raises(ValueError, match="`budget` must be a positive number of parameters, got -5"):
        candidate_shapes(model, -5)
    with pytest.raises(ValueError, match="`layer_importance` must be"):
        search_budget(model, 5000, BATCHES, layer_importance="random")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seq: int = 8):
        self.ids = torch.randint(3, 64, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_budget_option_of_the_callback_trains_the_chosen_shape(tmp_path, capsys):
    model = tiny_model("llama", "causal_lm").train()
    budget = int(0.7 * _params(model))
    config = PruningConfig(budget=budget, calibration_batches=2, budget_candidates=3)
    assert config.schedule == "one_shot" and set(config.targets) == {"heads", "ffn_neurons", "hidden", "layers"}
    callback = PruningCallback(config)
    args = TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True
    )
    Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback]).train()
    chosen = next(row for row in callback.budget_table if row["chosen"])
    assert _params(model) == chosen["params"] <= budget
    assert model.config.hidden_size == chosen["hidden"] and model.config.num_hidden_layers == chosen["layers"]
    assert "params" in capsys.readouterr().out


def test_budget_excludes_per_target_fractions():
    with pytest.raises(ValueError, match="`budget` \\(100\\) replaces per-target fractions"):
        PruningConfig(budget=100, targets={"heads": 0.5})
    with pytest.raises(ValueError, match="`budget` must be a positive number of parameters, got 0"):
        PruningConfig(budget=0)


def test_plan_lists_the_candidates_and_prunes_a_meta_model_to_the_largest():
    model = tiny_model("qwen3", "causal_lm")
    budget = int(0.7 * _params(model))
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    lines = plan_budget(meta, budget)
    largest = candidate_shapes(model, budget)[0]
    assert lines[0].startswith(f"budget {budget:,} parameters")
    assert f"params {largest[1]:>13,}" in lines[1]
    assert _params(meta) == largest[1] <= budget


def test_shipped_minitron_recipe_plans_the_budget_with_a_tiny_stand_in(tmp_path, capsys, monkeypatch):
    source = REPO_ROOT / "recipes" / "smollm2_minitron.yaml"
    raw = yaml.safe_load(source.read_text())
    assert raw["model"]["teacher"] == "builtin:SmolLM2-135M" and raw["stages"][1]["pruning"]["budget"] == 70_000_000
    assert raw["stages"][0]["type"] == "finetune_teacher"  # teacher correction before the search prunes it
    folder = tmp_path / "recipes"
    lm = tiny_model("llama", "causal_lm")
    lm.save_pretrained(folder / "tiny-llama")
    tiny_tokenizer().save_pretrained(folder / "tiny-llama")
    for key in ("train", "eval"):
        (folder / raw["data"][key]).parent.mkdir(parents=True, exist_ok=True)
        (folder / raw["data"][key]).write_text("w1 w2 w3\nw4 w5\n")
    budget = int(0.7 * _params(lm))
    text = source.read_text().replace("builtin:SmolLM2-135M", "tiny-llama").replace("70000000", str(budget))
    path = write_recipe(folder, text, name=source.name)
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    largest = candidate_shapes(lm, budget)[0][1]
    assert f"minitron: budget {budget:,} parameters -> 6 candidate shapes" in out
    assert f"{largest:,}" in out.split("Expected shapes")[1]  # the plan's size row is the largest candidate

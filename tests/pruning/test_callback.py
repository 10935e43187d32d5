"""PruningCallback end to end with the Trainer: masks hold, schedules, checkpoints/resume, surgery, logs, PEFT."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from hf_compress.loading import from_pretrained
from hf_compress.models.families import ffn_size, get_layers, head_counts, head_slices, neuron_slices
from hf_compress.pruning.callback import STATE_NAME, PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.masks import MASKS_NAME, load_masks
from hf_compress.pruning.unstructured import prunable_weights
from tests.conftest import RandomTokenDataset, train_args
from tests.tiny_models import tiny_model


def _train(model, tmp_path, config, classes=False, callbacks=(), resume=None, **kwargs):
    callback = PruningCallback(config)
    trainer = Trainer(
        model=model,
        args=train_args(tmp_path, **kwargs),
        train_dataset=RandomTokenDataset(classes=classes),
        callbacks=[callback, *callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def _logits(model, ids=None):
    ids = torch.arange(3, 11)[None] if ids is None else ids
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_heads_and_ffn_at_once_give_a_smaller_model_that_reloads(tmp_path):
    model = tiny_model("llama", "causal_lm").train()
    before = sum(p.numel() for p in model.parameters())
    config = PruningConfig(
        targets={"heads": 0.5, "ffn_neurons": 0.5},
        schedule="linear",
        start_step=1,
        end_step=4,
        importance="taylor",
        scope="local",
    )
    trainer, callback = _train(model, tmp_path, config)
    assert [head_counts(model, i) for i in range(4)] == [(2, 1)] * 4
    assert [ffn_size(model, i) for i in range(4)] == [16] * 4
    assert all(len(v) == 2 for v in callback.removed["heads"].values())
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert sum(p.numel() for p in reloaded.parameters()) < before
    assert torch.allclose(_logits(reloaded), _logits(model), atol=1e-6)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[0]["sparsity/heads"] == 0.0 and logged[-1]["sparsity/heads"] == 0.5
    assert logged[-1]["sparsity/ffn_neurons"] == 0.5


def test_global_head_pruning_reloads_with_hf_compress(tmp_path):
    model = tiny_model("bert", "seq_cls").train()
    config = PruningConfig(targets={"heads": 0.5, "ffn_neurons": 0.5}, schedule="one_shot", start_step=2)
    trainer, callback = _train(model, tmp_path, config, classes=True, max_steps=4)
    assert sum(head_counts(model, i)[0] for i in range(4)) == 8
    assert sum(ffn_size(model, i) for i in range(4)) == 64
    assert min(head_counts(model, i)[0] for i in range(4)) >= 1
    trainer.save_model(str(tmp_path / "final"))
    reloaded = from_pretrained(str(tmp_path / "final"))
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6)


class MaskProbe(TrainerCallback):
    """After every step, the largest |value| of the slices the pruning callback has removed."""

    def __init__(self, pruning: PruningCallback):
        self.pruning, self.leaks = pruning, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        masks = self.pruning.masks
        slices = [s for layer, heads in masks.removed("heads").items() for s in head_slices(model, layer, heads)]
        slices += [s for layer, n in masks.removed("ffn_neurons").items() for s in neuron_slices(model, layer, n)]
        values = [getattr(m, name).detach().index_select(d, i).abs().max() for m, name, d, i in slices]
        self.leaks.append((len(slices), float(max(values)) if values else 0.0))


def _probe_run(tmp_path, disable_reapply=False):
    model = tiny_model("bert", "seq_cls").train()
    config = PruningConfig(targets={"heads": 0.5, "ffn_neurons": 0.5}, schedule="one_shot", start_step=3)
    callback = PruningCallback(config)
    if disable_reapply:
        callback.on_optimizer_step = lambda *args, **kwargs: None
    probe = MaskProbe(callback)
    trainer = Trainer(
        model=model,
        args=train_args(tmp_path, max_steps=8, weight_decay=0.1),
        train_dataset=RandomTokenDataset(classes=True),
        callbacks=[callback, probe],
    )
    trainer.train()
    return probe.leaks


def test_masks_hold_through_adam_steps(tmp_path):
    leaks = _probe_run(tmp_path)
    assert [n for n, _ in leaks[:2]] == [0, 0] and all(n > 0 for n, _ in leaks[2:])
    assert all(value == 0.0 for _, value in leaks)


def test_adam_momentum_would_revive_weights_without_the_safeguards(tmp_path, monkeypatch):
    # Without re-zeroing after each optimizer step and clearing Adam's moments, the test above would fail.
    monkeypatch.setattr("hf_compress.pruning.callback.mask_optimizer_state", lambda *args, **kwargs: None)
    leaks = _probe_run(tmp_path, disable_reapply=True)
    assert max(value for _, value in leaks[3:]) > 0


@pytest.mark.parametrize("schedule", ["one_shot", "cubic"])
def test_unstructured_target_reaches_requested_sparsity(tmp_path, schedule):
    model = tiny_model("gpt2", "causal_lm").train()
    config = PruningConfig(
        target="unstructured", sparsity=0.7, schedule=schedule, start_step=1, end_step=5, frequency=2
    )
    trainer, callback = _train(model, tmp_path, config, max_steps=8)
    weights = prunable_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros / sum(w.numel() for w in weights.values()) == pytest.approx(0.7, abs=1e-4)
    assert (model.get_output_embeddings().weight != 0).all()
    assert trainer.state.log_history[-2]["sparsity/unstructured"] == pytest.approx(0.7, abs=1e-4)
    cubic = [h["sparsity/unstructured"] for h in trainer.state.log_history if "loss" in h]
    assert cubic == sorted(cubic)


def test_layers_with_block_influence_are_dropped(tmp_path):
    model = tiny_model("llama", "causal_lm").train()
    config = PruningConfig(
        target="layers", sparsity=0.5, schedule="one_shot", importance="block_influence", calibration_batches=2
    )
    trainer, callback = _train(model, tmp_path, config, max_steps=3)
    assert len(get_layers(model)) == 2 and model.config.num_hidden_layers == 2
    assert len(callback.removed["layers"]) == 2
    assert all(not block._forward_hooks for block in get_layers(model))
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert torch.allclose(_logits(reloaded), _logits(model), atol=1e-6)


def _resume_config(importance):
    return PruningConfig(
        targets={"heads": 0.5, "ffn_neurons": 0.5},
        schedule="cubic",
        start_step=2,
        end_step=8,
        frequency=2,
        importance=importance,
    )


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_resume_from_checkpoint_gives_the_same_model(tmp_path, importance):
    full = tiny_model("llama", "causal_lm").train()
    _, full_cb = _train(
        full, tmp_path / "a", _resume_config(importance), max_steps=10, save_strategy="steps", save_steps=5
    )
    checkpoint = tmp_path / "a" / "checkpoint-5"
    assert (checkpoint / MASKS_NAME).is_file() and (checkpoint / STATE_NAME).is_file()
    masks, extra = load_masks(str(checkpoint / MASKS_NAME))
    assert 0 < masks.sparsity()["heads"] < 0.5
    shutil.copytree(checkpoint, tmp_path / "b" / "checkpoint-5")
    resumed = tiny_model("llama", "causal_lm").train()
    _, resumed_cb = _train(
        resumed,
        tmp_path / "b",
        _resume_config(importance),
        max_steps=10,
        save_strategy="steps",
        save_steps=5,
        resume=str(tmp_path / "b" / "checkpoint-5"),
    )
    assert resumed_cb.removed == full_cb.removed
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_without_masks_file_rebuilds_masks_from_zeroed_weights(tmp_path):
    full = tiny_model("bert", "seq_cls").train()
    config = PruningConfig(targets={"heads": 0.5, "ffn_neurons": 0.25}, schedule="one_shot", start_step=2)
    _, full_cb = _train(full, tmp_path / "a", config, classes=True, max_steps=6, save_strategy="steps", save_steps=3)
    (tmp_path / "a" / "checkpoint-3" / MASKS_NAME).unlink()
    resumed = tiny_model("bert", "seq_cls").train()
    _, resumed_cb = _train(
        resumed, tmp_path / "b", config, classes=True, max_steps=6, resume=str(tmp_path / "a" / "checkpoint-3")
    )
    assert resumed_cb.removed == full_cb.removed


def test_peft_model_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", "causal_lm"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        Trainer(
            model=model,
            args=train_args(tmp_path),
            train_dataset=RandomTokenDataset(),
            callbacks=[PruningCallback(target="heads", sparsity=0.5)],
        )
    merged = model.merge_and_unload().requires_grad_(True)
    _train(merged, tmp_path, PruningConfig(target="heads", sparsity=0.5, schedule="one_shot"), max_steps=1)
    assert head_counts(merged, 0) == (2, 1)


def test_keyword_constructor():
    assert PruningCallback(target="ffn_neurons", sparsity=0.25).config.targets == {"ffn_neurons": 0.25}
    with pytest.raises(ValueError, match="Pass either `config` or keyword arguments"):
        PruningCallback(PruningConfig(), sparsity=0.3)


def test_progressive_pruning_inside_distillation_trainer(tmp_path):
    from hf_compress.distillation.config import DistillationConfig
    from hf_compress.distillation.trainer import DistillationTrainer

    teacher = tiny_model("llama", "causal_lm", seed=1)
    student = tiny_model("llama", "causal_lm", seed=2).train()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = DistillationConfig(
        str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        alpha=0.5,
        temperature=2.0,
    )
    callback = PruningCallback(
        PruningConfig(
            targets={"heads": 0.5, "ffn_neurons": 0.5},
            schedule="linear",
            start_step=1,
            end_step=4,
            importance="taylor",
        )
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=RandomTokenDataset(), callbacks=[callback]
    )
    trainer.train()
    assert sum(head_counts(student, i)[0] for i in range(4)) == 8
    assert sum(ffn_size(student, i) for i in range(4)) == 64
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert [head_counts(teacher, i) for i in range(4)] == [(4, 2)] * 4
    trainer.save_model(str(tmp_path / "final"))
    assert torch.allclose(_logits(from_pretrained(str(tmp_path / "final"))), _logits(student), atol=1e-6)


class PreferStep4(TrainerCallback):
    """Adds an `eval_closeness` metric that makes the step-4 checkpoint the best one."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_closeness"] = -abs(state.global_step - 4)


def test_load_best_model_at_end_restores_the_best_checkpoint_masks(tmp_path):
    model = tiny_model("llama", "causal_lm").train()
    config = PruningConfig(
        target="ffn_neurons", sparsity=0.5, schedule="linear", start_step=2, end_step=6, frequency=2, scope="local"
    )
    callback = PruningCallback(config)
    args = train_args(
        tmp_path,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="closeness",
        greater_is_better=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokenDataset(),
        eval_dataset=RandomTokenDataset(n=4),
        callbacks=[callback, PreferStep4()],
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    masks, _ = load_masks(f"{trainer.state.best_model_checkpoint}/{MASKS_NAME}")
    assert callback.removed["ffn_neurons"] == masks.removed("ffn_neurons")
    assert [ffn_size(model, i) for i in range(4)] == [24] * 4  # 25% at step 4, not the final 50%


def test_sharded_training_is_refused(tmp_path):
    callback = PruningCallback(target="heads", sparsity=0.5)
    args = train_args(tmp_path)
    args.fsdp = "full_shard"  # only read by the callback here; the Trainer itself is not built
    from transformers import TrainerControl, TrainerState

    with pytest.raises(ValueError, match="cannot mask; train with plain DDP"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=tiny_model("bert"))


class Fingerprints(TrainerCallback):
    """The pruning callback's mask fingerprint after `on_train_begin` and after every step."""

    def __init__(self, pruning: PruningCallback):
        self.pruning, self.values = pruning, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.values.append(self.pruning.masks.fingerprint())

    def on_step_end(self, args, state, control, **kwargs):
        self.values.append(self.pruning.masks.fingerprint())


def _counted_run(tmp_path, importance, monkeypatch, always_rescore=False):
    from hf_compress.pruning import callback as module

    counts = {"scores": 0, "parameter_masks": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(PruningCallback, "_scores", counting("scores", PruningCallback._scores))
    monkeypatch.setattr(module, "parameter_masks", counting("parameter_masks", module.parameter_masks))
    if always_rescore:
        monkeypatch.setattr(PruningCallback, "_removes_more", lambda *args: True)
    model = tiny_model("llama", "causal_lm").train()
    config = PruningConfig(
        targets={"heads": 0.5, "ffn_neurons": 0.5},
        schedule="cubic",
        start_step=1,
        end_step=7,
        importance=importance,
        scope="local",
    )
    callback = PruningCallback(config)
    probe = Fingerprints(callback)
    trainer = Trainer(
        model=model,
        args=train_args(tmp_path, max_steps=8),
        train_dataset=RandomTokenDataset(),
        callbacks=[callback, probe],
    )
    trainer.train()
    monkeypatch.undo()
    return model, callback, probe.values, counts


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_decisions_that_cannot_change_the_masks_are_skipped_invisibly(tmp_path, importance, monkeypatch):
    # Every-step pruning of 2 head groups per layer: most steps cannot remove another group, so the heads are not
    # re-scored there, and masks are rebuilt / re-applied only when they change. The run must not notice.
    model, callback, fingerprints, counts = _counted_run(tmp_path / "a", importance, monkeypatch)
    reference, ref_callback, ref_fingerprints, ref_counts = _counted_run(
        tmp_path / "b", importance, monkeypatch, always_rescore=True
    )
    assert fingerprints == ref_fingerprints and callback.removed == ref_callback.removed
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert counts["scores"] < ref_counts["scores"] == 2 * 7  # two targets on each of the 7 pruning steps
    changes = sum(a != b for a, b in zip(fingerprints, fingerprints[1:]))
    assert 1 < changes < 7 and counts["parameter_masks"] == 1 + changes

"""sparsity/*, pruning/updates and distillation loss components reach the `report_to` integrations (TensorBoard)."""

import pytest
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from tests.conftest import RandomTokenDataset, train_args
from tests.tiny_models import tiny_model

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


class Seen(TrainerCallback):
    """Records the keys of `logs` at its turn, like any integration registered before user callbacks."""

    def __init__(self):
        self.keys = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys.append(set(logs))


def test_distillation_and_pruning_values_reach_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    teacher = tiny_model("bert", "seq_cls", seed=1)
    student = tiny_model("bert", "seq_cls", seed=2)
    config = PruningConfig(targets={"heads": 0.5, "ffn_neurons": 0.25}, schedule="one_shot", start_step=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(str(tmp_path / "run"), max_steps=4, **{**_kwargs(), "report_to": ["tensorboard"]}),
        train_dataset=RandomTokenDataset(classes=True),
        callbacks=[PruningCallback(config)],
    )
    trainer.train()
    scalars = _scalars(tmp_path / "tb")
    assert [value for _, value in scalars["train/sparsity/heads"]][:4] == [0.0, 0.5, 0.5, 0.5]
    assert scalars["train/sparsity/ffn_neurons"][-1][1] == pytest.approx(0.25)
    assert [value for _, value in scalars["train/pruning/updates"]][:4] == [0, 1, 1, 1]
    assert [step for step, _ in scalars["train/loss_soft"]] == [1, 2, 3, 4]
    assert "train/loss_hard" in scalars


def _kwargs():
    return dict(
        per_device_train_batch_size=4, learning_rate=5e-2, use_cpu=True, logging_steps=1, save_strategy="no", seed=0
    )


def test_values_are_added_before_integrations_and_after_default_flow(tmp_path):
    seen = Seen()
    callback = PruningCallback(PruningConfig(targets={"heads": 0.5}, schedule="one_shot", start_step=1))
    trainer = Trainer(
        model=tiny_model("bert", "seq_cls"),
        args=train_args(tmp_path, max_steps=2),
        train_dataset=RandomTokenDataset(classes=True),
        callbacks=[seen],  # stands for an integration: registered before the pruning callback
    )
    trainer.add_callback(callback)  # added after construction: registered at on_train_begin
    trainer.train()
    assert all({"sparsity/heads", "pruning/updates"} <= keys for keys in seen.keys)
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], DefaultFlowCallback)
    assert type(callbacks[1]).__name__ == "LogFirst" and callbacks[1].callback is callback
    trainer.train()  # a second run registers nothing new
    assert sum(type(cb).__name__ == "LogFirst" for cb in trainer.callback_handler.callbacks) == 1

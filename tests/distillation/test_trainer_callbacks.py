"""DistillationTrainer's few overrides and its callback interfaces: card writers and the projection checkpoint."""

import ast
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

import hf_compress
from hf_compress.distillation.callbacks import PROJECTION_FILE, CardWriter
from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.reporting.card_callback import ModelCardCallback
from tests.tiny_models import tiny_inputs, tiny_model

OVERRIDES = {"__init__", "compute_loss", "create_optimizer", "log", "save_model", "create_model_card",
             "get_batch_samples"}  # fmt: skip
PRIVATE_OVERRIDES = {"_set_signature_columns_if_needed"}  # no public hook keeps the cached teacher columns


class RecordingWriter(TrainerCallback):
    """A card writer that is not hf_compress's: records what the trainer asks of it."""

    def __init__(self):
        self.trainer, self.calls = None, []

    def set_trainer(self, trainer):
        self.trainer = trainer

    def write(self, folder, final=True, **card_kwargs):
        self.calls.append((str(folder), final, card_kwargs))
        Path(folder, "README.md").write_text("recorded card")


def _args(tmp_path, **kwargs) -> DistillationConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    return DistillationConfig(**{**defaults, **kwargs})


def _data(n: int = 4) -> list[dict[str, torch.Tensor]]:
    ids = tiny_inputs(n, 8)["input_ids"]
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids[i]} for i in range(n)
    ]


def _trainer(tmp_path, callbacks=None, **kwargs) -> DistillationTrainer:
    student, teacher = tiny_model("llama", "causal_lm", seed=0), tiny_model("llama", "causal_lm", seed=1)
    args = _args(tmp_path, **kwargs)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=_data(), callbacks=callbacks
    )


def test_only_the_documented_trainer_methods_are_overridden():
    overridden = {name for name in vars(DistillationTrainer) if callable(getattr(Trainer, name, None))}
    assert overridden == OVERRIDES | PRIVATE_OVERRIDES


def test_distillation_does_not_import_reporting_recipes_or_cli():
    package = Path(hf_compress.__file__).parent / "distillation"
    imported = set()
    for file in package.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    assert "hf_compress.distillation.trainer" in {f"hf_compress.distillation.{f.stem}" for f in package.glob("*.py")}
    upward = sorted(
        m for m in imported if m.startswith(("hf_compress.reporting", "hf_compress.recipes", "hf_compress.cli"))
    )
    assert upward == []


def test_card_writers_are_bound_and_write_every_final_save(tmp_path):
    writer = RecordingWriter()
    trainer = _trainer(tmp_path, callbacks=[writer])
    assert DistillationTrainer.default_callbacks == (ModelCardCallback,)  # registered by hf_compress/__init__
    cards = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ModelCardCallback)]
    assert len(cards) == 1 and cards[0].trainer is trainer and writer.trainer is trainer
    assert trainer.card_writers == [writer, cards[0]] and isinstance(writer, CardWriter)

    trainer.remove_callback(ModelCardCallback)
    trainer.save_model(str(tmp_path / "final"))
    assert writer.calls == [(str(tmp_path / "final"), True, {})]
    trainer.create_model_card(model_name="tiny", dataset="glue", tags="pruning", license="mit")
    folder, final, card_kwargs = writer.calls[-1]
    assert folder == trainer.args.output_dir and final
    assert card_kwargs == dict(
        model_name="tiny", base_model=None, datasets=["glue"], methods=["pruning"], language=None, license="mit"
    )


def test_without_a_card_writer_transformers_writes_its_card(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.remove_callback(ModelCardCallback)
    assert trainer.card_writers == []
    trainer.save_model()
    assert not (Path(trainer.args.output_dir) / "README.md").exists()  # hf_compress's card was the only writer
    trainer.create_model_card(model_name="tiny")
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    assert "hf-compress" not in card and "tiny" in card


def test_projection_checkpoint_callback_warns_when_the_checkpoint_has_no_projection(tmp_path, caplog):
    student, teacher = (
        tiny_model("llama", "causal_lm", seed=0),
        tiny_model("llama", "causal_lm", seed=1, hidden_size=32),
    )
    args = _args(tmp_path, hidden_loss_weight=1.0, save_strategy="steps", save_steps=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_data())
    trainer.train()
    checkpoint = Path(args.output_dir) / "checkpoint-2"
    assert (checkpoint / PROJECTION_FILE).is_file()
    (checkpoint / PROJECTION_FILE).unlink()
    fresh = DistillationTrainer(
        model=tiny_model("llama", "causal_lm", seed=0), teacher_model=teacher, args=args, train_dataset=_data()
    )
    before = {k: v.clone() for k, v in fresh.hidden_projection.state_dict().items()}
    with caplog.at_level("WARNING"):
        fresh.train(resume_from_checkpoint=str(checkpoint))
    assert f"has no {PROJECTION_FILE}" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in fresh.hidden_projection.state_dict().items())


def test_projection_is_saved_into_every_checkpoint_and_not_the_final_model(tmp_path):
    student, teacher = (
        tiny_model("llama", "causal_lm", seed=0),
        tiny_model("llama", "causal_lm", seed=1, hidden_size=32),
    )
    args = _args(tmp_path, hidden_loss_weight=1.0, save_strategy="steps", save_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_data())
    trainer.train()
    trainer.save_model()
    saved = sorted(p.relative_to(args.output_dir).as_posix() for p in Path(args.output_dir).rglob(PROJECTION_FILE))
    assert saved == [f"checkpoint-1/{PROJECTION_FILE}", f"checkpoint-2/{PROJECTION_FILE}"]


def test_projection_resumes_from_args_resume_from_checkpoint_outside_output_dir(tmp_path):
    student, teacher = (
        tiny_model("llama", "causal_lm", seed=0),
        tiny_model("llama", "causal_lm", seed=1, hidden_size=32),
    )
    args = _args(tmp_path, hidden_loss_weight=1.0, save_strategy="steps", save_steps=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_data())
    trainer.train()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(Path(args.output_dir) / "checkpoint-2", elsewhere)
    shutil.rmtree(args.output_dir)
    resumed_args = _args(tmp_path, hidden_loss_weight=1.0, resume_from_checkpoint=str(elsewhere))
    fresh = DistillationTrainer(
        model=tiny_model("llama", "causal_lm", seed=0), teacher_model=teacher, args=resumed_args, train_dataset=_data()
    )
    fresh.train(resume_from_checkpoint=resumed_args.resume_from_checkpoint)
    trained = trainer.hidden_projection.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.hidden_projection.state_dict().items())

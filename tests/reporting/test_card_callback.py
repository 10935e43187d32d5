"""Cards written by Trainer runs: every checkpoint, the final save and `push_to_hub` (Hub calls intercepted)."""

import json
import logging
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard, RepoUrl
from transformers import Trainer, TrainingArguments

from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.reporting.card_callback import (
    ModelCardCallback,
    find_card_callback,
    model_card_callback,
    write_trainer_card,
)
from hf_compress.reporting.cards import needs_hf_compress
from hf_compress.reporting.measure import count_parameters
from tests.tiny_models import tiny_inputs, tiny_model

transformers.logging.set_verbosity_error()
SECRET = "hf_doNotLeakThisToken123"


def data(n: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = tiny_inputs(n, 8, seed=3)["input_ids"]
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": torch.tensor(i % 3)}
        for i in range(n)
    ]


def arguments(tmp_path, cls=DistillationConfig, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return cls(**{**defaults, **kwargs})


def distillation_trainer(tmp_path, **kwargs) -> DistillationTrainer:
    teacher = tiny_model("bert", "seq_cls", seed=1)
    teacher.config._name_or_path = "org/tiny-teacher"  # as if loaded from the Hub
    pruning = PruningCallback(PruningConfig(targets={"heads": 0.5}, schedule="linear", end_step=4))
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=3, temperature=2.0, alpha=0.7, **kwargs)
    return DistillationTrainer(
        model=tiny_model("bert", "seq_cls", seed=0, num_hidden_layers=2),
        teacher_model=teacher,
        args=args,
        train_dataset=data(),
        eval_dataset=data(4),
        callbacks=[pruning],
    )


def card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_distillation_run_cards_every_checkpoint_and_the_final_save(tmp_path):
    trainer = distillation_trainer(tmp_path)
    callback = find_card_callback(trainer)
    assert isinstance(callback, ModelCardCallback) and callback.trainer is trainer  # added by DistillationTrainer
    trainer.train()
    out = tmp_path / "out"
    first, second, third = (card(out / f"checkpoint-{step}") for step in (2, 4, 6))
    for step, checkpoint in zip((2, 4, 6), (first, second, third)):
        assert checkpoint.data.tags == ["distillation", "pruning", "hf-compress"]
        assert checkpoint.data.base_model == "org/tiny-teacher"
        assert f"Checkpoint saved at step {step} of 6, while training was still running." in checkpoint.text
        assert "from teacher `org/tiny-teacher`: temperature 2.0, alpha 0.7, distillation_loss kl." in checkpoint.text
        assert "Pruned heads are masked (zeroed in place)" in checkpoint.text
    # linear schedule to 50% of the heads by step 4: 1/4 at step 2 (2 layers x 4 heads)
    assert "| heads | 50.0% | 25.0% |" in first.text and "| heads | 50.0% | 50.0% |" in second.text
    assert "**Evaluation:** not evaluated before this save." in first.text and first.data.eval_results is None
    assert "the last evaluation, at step 3, gave loss" in second.text and second.data.eval_results is None
    assert "**Evaluation** at step 6: loss " in third.text  # the last step is always evaluated
    assert third.data.eval_results is None  # no `datasets` given: no model-index
    assert "Latency was not measured." in third.text and "one machine's medians" not in third.text
    teacher_params = count_parameters(trainer.teacher_model)["nonzero"]
    assert f"| org/tiny-teacher (teacher) | {teacher_params:,} |" in first.text

    final = tmp_path / "final"
    trainer.save_model(str(final))
    final_card = card(final)
    student_params = count_parameters(trainer.model)["nonzero"]  # after surgery: heads physically removed
    assert "Saved after step 6 of 6." in final_card.text
    assert "Training ended: 4 heads were removed physically." in final_card.text
    assert f"| out | {student_params:,} |" in final_card.text  # named after the run, not the folder
    assert student_params < count_parameters(tiny_model("bert", "seq_cls", num_hidden_layers=2))["nonzero"]
    assert ('hf_compress.from_pretrained("out")' in final_card.text) == needs_hf_compress(config_of(final))


class FakeHub:
    """Records what `Trainer` sends to `HfApi` (create_repo / upload_folder), reading README.md at call time."""

    def __init__(self, monkeypatch):
        self.repos, self.uploads = [], []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append(repo_id)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, path_in_repo=None, run_as_future=False, **kwargs):
            readme = Path(folder_path) / "README.md"
            hub.uploads.append(
                {
                    "repo_id": repo_id,
                    "path_in_repo": path_in_repo,
                    "token": kwargs.get("token"),
                    "card": readme.read_text() if readme.is_file() else None,
                }
            )
            if not run_as_future:
                return "commit"
            future = Future()
            future.set_result("commit")
            return future

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_to_hub_uploads_our_card_and_never_the_token(tmp_path, monkeypatch, caplog):
    hub = FakeHub(monkeypatch)
    caplog.set_level(logging.DEBUG)
    trainer = distillation_trainer(
        tmp_path, push_to_hub=True, hub_model_id="me/tiny-student", hub_token=SECRET, hub_strategy="checkpoint"
    )
    model_card_callback(trainer, datasets=["glue"], license="apache-2.0")
    trainer.train()
    checkpoint_pushes = [u for u in hub.uploads if u["path_in_repo"] == "last-checkpoint"]
    assert len(checkpoint_pushes) == 3 and all(u["card"] for u in checkpoint_pushes)  # carded before upload
    assert "Checkpoint saved at step 2 of 6" in checkpoint_pushes[0]["card"]
    hub.uploads.clear()

    trainer.push_to_hub()
    (upload,) = hub.uploads
    assert hub.repos == ["me/tiny-student"] and upload["repo_id"] == "me/tiny-student"
    sent = ModelCard(upload["card"])
    assert sent.data.tags == ["distillation", "pruning", "hf-compress"]
    assert sent.data.base_model == "org/tiny-teacher" and sent.data.datasets == ["glue"]
    assert sent.data.license == "apache-2.0"
    teacher = count_parameters(trainer.teacher_model)["nonzero"]
    student = count_parameters(trainer.model)["nonzero"]
    assert f"| org/tiny-teacher (teacher) | {teacher:,} |" in sent.text
    assert f"| tiny-student | {student:,} |" in sent.text and student < teacher
    assert sent.data.eval_results[0].metric_type == "loss" and sent.data.eval_results[0].dataset_name == "glue"
    assert upload["token"] == SECRET  # handed to huggingface_hub only
    written = [f.read_text() for f in (tmp_path / "out").rglob("README.md")]
    assert written and not any(SECRET in text for text in written)
    assert SECRET not in caplog.text


def test_plain_trainer_with_pruning_callback(tmp_path):
    pruning = PruningCallback(
        PruningConfig(targets={"ffn_neurons": 0.5, "unstructured": 0.3}, schedule="one_shot", start_step=1)
    )
    model = tiny_model("llama", "seq_cls", seed=0)
    before = count_parameters(model)["nonzero"]
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, TrainingArguments, max_steps=4),
        train_dataset=data(),
        callbacks=[pruning, ModelCardCallback(datasets=["glue"])],
    )
    callback = model_card_callback(trainer, base_model="org/llama-base")  # binds the one passed in `callbacks`
    assert [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ModelCardCallback)] == [callback]
    trainer.train()
    checkpoint = card(tmp_path / "out" / "checkpoint-2")
    assert checkpoint.data.base_model == "org/llama-base" and checkpoint.data.datasets == ["glue"]
    assert f"| LlamaForSequenceClassification (before this run) | {before:,} |" in checkpoint.text
    assert "| ffn_neurons | 50.0% | 50.0% |\n| unstructured | 30.0% | 30.0% |" in checkpoint.text
    assert "**Distillation**" not in checkpoint.text and checkpoint.data.tags == ["pruning", "hf-compress"]
    assert "learning_rate 0.01, per_device_train_batch_size 4" in checkpoint.text

    final = tmp_path / "final"
    trainer.save_model(str(final))
    written = write_trainer_card(trainer, final)
    assert (final / "README.md").read_text() == str(written)
    assert "Training ended: 64 ffn neurons were removed physically." in written.text  # 4 layers x 32 / 2
    assert "Unstructured zeros stay in the dense weights." in written.text


def test_callback_guards(tmp_path):
    with pytest.raises(TypeError, match=r"Unknown card argument\(s\) \['dataset'\]"):
        ModelCardCallback(dataset="glue")
    with pytest.raises(TypeError, match="`trainer` must be a transformers `Trainer`, got str"):
        ModelCardCallback("trainer")
    trainer = Trainer(
        model=tiny_model("bert", "seq_cls"),
        args=arguments(tmp_path, TrainingArguments, max_steps=1),
        train_dataset=data(),
        callbacks=[ModelCardCallback()],
    )
    with pytest.raises(ValueError, match="`ModelCardCallback` has no trainer; add it with `model_card_callback"):
        trainer.train()

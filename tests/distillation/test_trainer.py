"""End-to-end DistillationTrainer runs on tiny offline models: every head, accumulation, LoRA, saving."""

import json
import math

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import TrainingArguments

from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.trainer import DistillationTrainer
from tests.tiny_models import VOCAB, tiny_inputs, tiny_model

SEQ = 8


def seq2seq_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
    else:
        config = transformers.BartConfig(
            vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2,
        )  # fmt: skip
    return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()


def make_data(head: str, n: int = 8, seed: int = 3, with_labels: bool = True) -> list[dict[str, torch.Tensor]]:
    """`n` examples for `head`, with uneven numbers of labelled positions."""
    g = torch.Generator().manual_seed(seed)
    ids = tiny_inputs(n, SEQ, seed=seed)["input_ids"]
    rows = []
    for i in range(n):
        row = {"input_ids": ids[i].clone(), "attention_mask": torch.ones(SEQ, dtype=torch.long)}
        if head == "seq_cls":
            row["labels"] = torch.tensor(i % 3)
        elif head == "token_cls":
            row["labels"] = torch.randint(0, 3, (SEQ,), generator=g)
            row["labels"][: i % 3] = -100
        elif head == "qa":
            start = torch.randint(0, SEQ - 2, (), generator=g)
            row["start_positions"], row["end_positions"] = start, start + 2
        elif head == "masked_lm":
            row["labels"] = torch.full((SEQ,), -100)
            positions = torch.randperm(SEQ, generator=g)[: 1 + i % 3]
            row["labels"][positions] = ids[i, positions]
            row["input_ids"][positions] = 4
        elif head == "causal_lm":
            row["labels"] = ids[i].clone()
            row["labels"][: i % 4] = -100
        else:  # seq2seq
            row["labels"] = torch.randint(3, VOCAB, (5,), generator=g)
            row["labels"][5 - i % 3 :] = -100
        if not with_labels:
            row.pop("labels", None)
        rows.append(row)
    return rows


def config(tmp_path, **kwargs) -> DistillationConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        temperature=2.0,
    )  # fmt: skip
    return DistillationConfig(**{**defaults, **kwargs})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def losses(trainer, key="loss") -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


CASES = [
    ("bert", "seq_cls"), ("distilbert", "seq_cls"), ("roberta", "token_cls"), ("bert", "qa"), ("bert", "masked_lm"),
    ("llama", "causal_lm"), ("gpt2", "causal_lm"), ("qwen3", "causal_lm"), ("t5", "seq2seq"), ("bart", "seq2seq"),
]  # fmt: skip


@pytest.mark.parametrize("family,head", CASES)
def test_every_head_trains(tmp_path, family, head):
    if head == "seq2seq":
        student, teacher = seq2seq_model(family, seed=0), seq2seq_model(family, seed=1)
    else:
        extra = {"num_labels": 2} if head == "qa" else {}  # start / end
        student, teacher = tiny_model(family, head, seed=0, **extra), tiny_model(family, head, seed=1, **extra)
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path), train_dataset=make_data(head)
    )
    trainer.train()

    curve = losses(trainer)
    assert len(curve) == 12 and curve[-1] < curve[0], curve
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    soft, hard = losses(trainer, "loss_soft"), losses(trainer, "loss_hard")
    assert len(soft) == len(hard) == 12 and soft[0] > 0 and hard[0] > 0
    assert curve[0] == pytest.approx(0.5 * soft[0] + 0.5 * hard[0], rel=1e-4)


def grad_accum_run(tmp_path, head, batch, accumulation, **kwargs):
    family = "bert" if head == "seq_cls" else "llama"
    student, teacher = tiny_model(family, head, seed=0), tiny_model(family, head, seed=1)
    args = config(
        tmp_path / f"{batch}x{accumulation}", max_steps=1, per_device_train_batch_size=batch, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", gradient_accumulation_steps=accumulation, **kwargs,
    )  # fmt: skip
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=make_data(head, 8))
    trainer.train()
    return snapshot(student), trainer.state.log_history[0]


@pytest.mark.parametrize("head,kwargs", [("seq_cls", {"hidden_loss_weight": 1.0}), ("causal_lm", {})])
def test_gradient_accumulation_matches_large_batch(tmp_path, head, kwargs):
    initial = snapshot(tiny_model("bert" if head == "seq_cls" else "llama", head, seed=0))
    big, big_log = grad_accum_run(tmp_path, head, 8, 1, **kwargs)
    accumulated, acc_log = grad_accum_run(tmp_path, head, 4, 2, **kwargs)
    assert any(not torch.allclose(big[k], initial[k]) for k in big)
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], atol=1e-6, rtol=1e-5, msg=key)
    for key in ("loss", "loss_soft", "loss_hard", *(["loss_hidden"] if kwargs else [])):
        assert acc_log[key] == pytest.approx(big_log[key], rel=1e-5), key


def test_hidden_projection_is_checkpointed_and_resumed_but_not_saved_with_the_model(tmp_path):
    student = tiny_model("llama", "causal_lm", seed=0)
    teacher = tiny_model("llama", "causal_lm", seed=1, hidden_size=32, num_hidden_layers=2)
    args = config(
        tmp_path,
        max_steps=4,
        hidden_loss_weight=1.0,
        hidden_loss="cosine",
        save_strategy="steps",
        save_steps=4,
        layer_map={"1": 0, "3": 1},
    )
    data = make_data("causal_lm")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    assert trainer.layer_map == {1: 0, 3: 1}
    projection_before = snapshot(trainer.hidden_projection)
    trainer.train()
    assert any(not torch.equal(v, projection_before[k]) for k, v in trainer.hidden_projection.state_dict().items())
    assert len(losses(trainer, "loss_hidden")) == 4

    trainer.save_model(str(tmp_path / "final"))
    student_shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    for folder in (tmp_path / "final", tmp_path / "out" / "checkpoint-4"):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert saved and set(saved) <= set(student_shapes)
        assert all(student_shapes[k] == shape for k, shape in saved.items())
        assert json.loads((folder / "config.json").read_text())["hidden_size"] == 16
        assert not [p.name for p in folder.iterdir() if "teacher" in p.name]
    assert not [p.name for p in (tmp_path / "final").iterdir() if "projection" in p.name]
    trained = snapshot(trainer.hidden_projection)
    checkpoint = tmp_path / "out" / "checkpoint-4"
    with safe_open(str(checkpoint / "hidden_projection.safetensors"), "pt") as f:
        assert {k: f.get_tensor(k) for k in f.keys()}.keys() == trained.keys()

    # Resuming restores the trained projection (a fresh trainer starts from a new random one).
    fresh = DistillationTrainer(
        model=tiny_model("llama", "causal_lm", seed=0), teacher_model=teacher, args=args, train_dataset=data
    )
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.hidden_projection.state_dict().items())
    fresh.train(resume_from_checkpoint=str(checkpoint))  # at max_steps already: loads, trains nothing
    for key, value in fresh.hidden_projection.state_dict().items():
        torch.testing.assert_close(value, trained[key], msg=key)


def test_attention_loss_switches_to_eager(tmp_path):
    student, teacher = tiny_model("bert", "seq_cls", seed=0), tiny_model("bert", "seq_cls", seed=1)
    args = config(tmp_path, max_steps=3, attention_loss_weight=10.0, hidden_loss_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=make_data("seq_cls"))
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
    assert trainer.layer_map == {0: 0, 1: 1, 2: 2, 3: 3}
    trainer.train()
    attention, hidden = losses(trainer, "loss_attention"), losses(trainer, "loss_hidden")
    assert len(attention) == len(hidden) == 3 and attention[0] > 0 and hidden[0] > 0


def test_teacher_loaded_from_path(tmp_path):
    tiny_model("bert", "token_cls", seed=1).save_pretrained(tmp_path / "teacher")
    args = config(tmp_path, max_steps=2, teacher_model_init_kwargs={"dtype": "float64"})
    trainer = DistillationTrainer(
        model=tiny_model("bert", "token_cls"), teacher_model=str(tmp_path / "teacher"), args=args,
        train_dataset=make_data("token_cls"),
    )  # fmt: skip
    teacher = trainer.teacher_model
    assert type(teacher).__name__ == "BertForTokenClassification" and teacher.dtype == torch.float64
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trainer.train()
    assert len(losses(trainer)) == 2


def test_teacher_checkpoint_of_other_task_is_rejected(tmp_path):
    tiny_model("bert", "masked_lm", seed=1).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"`teacher_model` checkpoint is a BertForMaskedLM \(masked_lm\)"):
        DistillationTrainer(
            model=tiny_model("bert", "seq_cls"), teacher_model=str(tmp_path / "teacher"), args=config(tmp_path)
        )


def test_teacher_placed_in_compute_dtype(tmp_path):
    trainer = DistillationTrainer(
        model=tiny_model("llama", "causal_lm"),
        teacher_model=tiny_model("llama", "causal_lm"),
        args=config(tmp_path, bf16=True),
    )
    assert trainer.teacher_model.dtype == torch.bfloat16
    assert trainer.teacher_model.device == trainer.accelerator.device
    assert trainer.model.dtype == torch.float32


def test_plain_training_arguments_and_evaluation(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=tiny_model("llama", "causal_lm"),
        teacher_model=tiny_model("llama", "causal_lm", 1),
        args=args,
        train_dataset=make_data("causal_lm"),
        eval_dataset=make_data("causal_lm", 4),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert not hasattr(args, "temperature") and trainer.distillation_args["temperature"] == 4.0
    expected = 0.5 * metrics["eval_loss_soft"] + 0.5 * metrics["eval_loss_hard"]
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert len(losses(trainer, "loss_soft")) == 3


def test_soft_only_without_labels(tmp_path):
    trainer = DistillationTrainer(
        model=tiny_model("qwen2", "causal_lm"), teacher_model=tiny_model("qwen2", "causal_lm", seed=1),
        args=config(tmp_path, max_steps=6, distillation_loss="reverse_kl"),
        train_dataset=make_data("causal_lm", with_labels=False),
    )  # fmt: skip
    trainer.train()
    curve = losses(trainer, "loss_soft")
    assert curve[-1] < curve[0] and set(losses(trainer, "loss_hard")) == {0.0}


def test_lora_student_saves_adapter_only(tmp_path):

    base = tiny_model("llama", "causal_lm", seed=0)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    student = peft.get_peft_model(base, lora)
    frozen_before = {k: v.clone() for k, v in student.named_parameters() if not v.requires_grad}
    lora_before = {k: v.clone() for k, v in student.named_parameters() if v.requires_grad}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_model("llama", "causal_lm", seed=1),
        args=config(tmp_path, max_steps=4, distillation_loss="jsd"),
        train_dataset=make_data("causal_lm"),
    )
    trainer.train()
    params = dict(student.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in frozen_before.items())
    assert any(not torch.equal(params[k], v) for k, v in lora_before.items())
    trainer.save_model(str(tmp_path / "adapter"))
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())


@pytest.mark.parametrize(
    "kwargs,inference,flags", [({}, True, set()), ({"hidden_loss_weight": 1.0}, False, {"output_hidden_states"})]
)
def test_teacher_forward_mode_and_requested_outputs(tmp_path, kwargs, inference, flags):
    student, teacher = tiny_model("bert", "seq_cls", seed=0), tiny_model("bert", "seq_cls", seed=1)
    calls = []

    def record(module, args, call_kwargs):
        calls.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), set(call_kwargs)))

    teacher.register_forward_pre_hook(record, with_kwargs=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, max_steps=2, **kwargs),
                                  train_dataset=make_data("seq_cls"))  # fmt: skip
    assert trainer.teacher_mode == "live"
    trainer.train()
    assert len(calls) == 2 and all(not grad for _, grad, _ in calls)
    assert all(mode is inference for mode, _, _ in calls)
    output_flags = {k for k in calls[0][2] if k.startswith("output_")}
    assert output_flags == flags  # hidden states / attentions only when their loss is on


def test_reverse_kl_and_jsd_train_with_an_inference_mode_teacher(tmp_path):
    for divergence in ("reverse_kl", "jsd"):
        student, teacher = tiny_model("llama", "causal_lm", seed=0), tiny_model("llama", "causal_lm", seed=1)
        before = snapshot(student)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=make_data("causal_lm"),
                                      args=config(tmp_path, max_steps=2, distillation_loss=divergence))  # fmt: skip
        trainer.train()
        assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
        assert all(math.isfinite(x) for x in losses(trainer, "loss_soft"))

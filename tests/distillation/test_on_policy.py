"""On-policy / sequence-level distillation: data helpers (pure) and short DistillationTrainer runs on tiny Llamas."""

from __future__ import annotations

import json

import pytest
import torch

from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.on_policy import (
    GENERATED_KEY,
    PromptCompletionCollator,
    generate_completions,
    is_on_policy_step,
    join_completions,
    rollout,
    row_seeds,
    split_prompts,
)
from hf_compress.distillation.trainer import DistillationTrainer
from tests.conftest import ROOT, accelerate_launch
from tests.scripts.on_policy_script import train
from tests.tiny_models import tiny_model, tiny_tokenizer

SCRIPT = ROOT / "tests" / "scripts" / "on_policy_script.py"

CHAT_TEMPLATE = (  # "w0" opens the assistant turn
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ ' w0 ' }}{% endif %}"
    "{{ '[CLS] ' + m['content'] + ' [SEP]' }}{% endfor %}{% if add_generation_prompt %}{{ ' w0 ' }}{% endif %}"
)


def tokenizer():
    tok = tiny_tokenizer()
    tok.eos_token = "[SEP]"
    return tok


def prompts(n: int = 8) -> list[dict[str, str]]:
    return [
        {
            "prompt": " ".join(f"w{(3 * i + j) % 50 + 1}" for j in range(2 + i % 3)),
            "completion": " ".join(f"w{(i + j) % 50 + 1}" for j in range(3)),
        }
        for i in range(n)
    ]


def test_collator_masks_the_prompt_and_padding():
    tok = tokenizer()
    batch = PromptCompletionCollator(tok)(prompts(2))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt0 = tok(prompts(2)[0]["prompt"])["input_ids"]
    n = len(prompt0)
    attended = mask[0, n:].bool()
    assert (labels[0, :n] == -100).all() and (labels[0, n:][attended] == ids[0, n:][attended]).all()
    assert labels[0, mask[0].sum() - 1] == tok.eos_token_id  # the completion ends with EOS, which is trained
    assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == tok.pad_token_id).all()
    prompt_ids, prompt_mask = split_prompts(batch, tok.pad_token_id)
    assert prompt_ids[0, -n:].tolist() == prompt0 and prompt_mask[0, :-n].sum() == 0  # left-padded prompt


def test_collator_renders_chat_messages_with_the_template():
    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    example = {"messages": [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8"}]}
    batch = PromptCompletionCollator(tok)([example])
    completion = batch["input_ids"][batch["labels"] != -100].tolist()
    assert tok.decode(completion) == "[CLS] w7 w8 [SEP]"  # the assistant turn only
    assert tok.decode(batch["input_ids"][0]).startswith("[CLS] w5 w6 [SEP] w0")
    with pytest.raises(ValueError, match="chat_template"):
        PromptCompletionCollator(tiny_tokenizer())([example])
    with pytest.raises(ValueError, match="`prompt`"):
        PromptCompletionCollator(tok)([{"text": "w1"}])


def test_generation_is_seeded_per_row_and_stops_at_eos():
    model = tiny_model("llama", "causal_lm")
    batch = PromptCompletionCollator(tokenizer())(prompts(4))
    ids, mask = split_prompts(batch, 0)
    seeds = row_seeds(ids, mask, seed=0, step=0)
    full, keep = generate_completions(model, ids, mask, 6, eos_token_id=3, pad_token_id=0, seeds=seeds)
    ids2, mask2 = split_prompts({k: v[2:] for k, v in batch.items()}, 0)
    part, _ = generate_completions(model, ids2, mask2, 6, 3, 0, seeds=row_seeds(ids2, mask2, 0, 0))
    assert torch.equal(full[2:, : part.shape[1]], part)  # a row's sample does not depend on the other rows
    other, _ = generate_completions(model, ids, mask, 6, 3, 0, seeds=row_seeds(ids, mask, 0, 1))
    assert not torch.equal(other, full)  # another step, another sample
    forced = torch.tensor([[5, 3, 7, 7], [5, 6, 7, 8]])
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    joined = join_completions(ids[:2], mask[:2], forced, keep, 0)
    n = int(mask[0].sum())
    assert joined["labels"][0].tolist()[n : n + 3] == [5, 3, -100] and joined["attention_mask"][0].sum() == n + 2


def test_rollout_keeps_the_prompt_and_labels_only_the_completion():
    model = tiny_model("llama", "causal_lm")
    batch = PromptCompletionCollator(tokenizer())(prompts(3))
    out = rollout(model, batch, max_new_tokens=4, eos_token_id=3, pad_token_id=0, seed=1)
    assert out[GENERATED_KEY] == "student"
    for i in range(3):
        n = int((batch["labels"][i] == -100).int().argmin())
        assert torch.equal(out["input_ids"][i, :n], batch["input_ids"][i, :n])
        assert (out["labels"][i, :n] == -100).all() and 1 <= (out["labels"][i] != -100).sum() <= 4


def test_on_policy_draw():
    draws = [is_on_policy_step(step, 0.5, seed=0) for step in range(200)]
    assert 60 < sum(draws) < 140 and draws == [is_on_policy_step(s, 0.5, 0) for s in range(200)]


def run(tmp_path, ratio=1.0, steps=6, batch=8, accumulation=1, seq_kd=False, student=None, **kwargs):
    tok = tokenizer()
    student = student if student is not None else tiny_model("llama", "causal_lm", seed=0).train()
    teacher = tiny_model("llama", "causal_lm", seed=1, hidden_size=32)
    args = DistillationConfig(
        output_dir=str(tmp_path / f"r{ratio}-{batch}x{accumulation}"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=kwargs.pop("learning_rate", 0.05),
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        temperature=1.0,
        distillation_loss="reverse_kl",
        on_policy_ratio=ratio,
        seq_kd=seq_kd,
        max_new_tokens=5,
        **kwargs,
    )
    generated = []
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=prompts(16),
        data_collator=PromptCompletionCollator(tok),
        processing_class=tok,
    )
    original = trainer.compute_loss

    def compute_loss(model, inputs, **kw):
        generated.append(inputs.get(GENERATED_KEY))
        return original(model, inputs, **kw)

    trainer.compute_loss = compute_loss
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return trainer, losses, generated


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_on_policy_trains_with_decreasing_loss(tmp_path, ratio):
    _, losses, generated = run(tmp_path, ratio=ratio, steps=8, optim="adamw_torch", learning_rate=0.02)
    expected = [is_on_policy_step(step, ratio, 0) for step in range(8)]
    assert [g == "student" for g in generated] == expected and (ratio == 1 or not all(expected))
    on = [loss for loss, e in zip(losses, expected) if e]
    assert on[-1] < on[0], losses


def test_gradient_accumulation_with_generation_matches_large_batch(tmp_path):
    kw = dict(steps=1, optim="sgd", learning_rate=1.0)
    big, big_losses, _ = run(tmp_path, batch=8, accumulation=1, **kw)
    acc, acc_losses, generated = run(tmp_path, batch=4, accumulation=2, **kw)
    assert generated == ["student", "student"]
    torch.testing.assert_close(acc_losses, big_losses, atol=1e-6, rtol=1e-5)
    for (name, a), (_, b) in zip(acc.model.named_parameters(), big.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_sequence_level_kd_generates_with_the_teacher(tmp_path):
    _, losses, generated = run(tmp_path, ratio=0.0, steps=2, seq_kd=True)
    assert generated == ["teacher", "teacher"] and all(loss > 0 for loss in losses)


def test_lora_student_generates(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", "causal_lm", seed=0)
    student = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer, losses, generated = run(tmp_path, ratio=1.0, steps=2, student=student)
    assert generated == ["student", "student"] and len(losses) == 2
    assert any("lora" in name for name, p in trainer.model.named_parameters() if p.requires_grad)


def test_guards(tmp_path):
    with pytest.raises(ValueError, match="`on_policy_ratio` must be in"):
        DistillationConfig(output_dir=str(tmp_path), on_policy_ratio=1.5)
    with pytest.raises(ValueError, match="`generation_top_p`"):
        DistillationConfig(output_dir=str(tmp_path), generation_top_p=0.0)
    args = DistillationConfig(output_dir=str(tmp_path), on_policy_ratio=1.0, use_cpu=True, report_to="none")
    student, teacher = tiny_model("bert", "seq_cls"), tiny_model("bert", "seq_cls", seed=1)
    with pytest.raises(ValueError, match="causal LM student"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args)


@pytest.mark.slow
def test_two_processes_generate_and_match_one(tmp_path):
    _, single = train(str(tmp_path / "one"), batch_size=8)
    (tmp_path / "two").mkdir()
    accelerate_launch([str(SCRIPT), "--output_dir", str(tmp_path / "two"), "--batch_size", "4"], num_processes=2)
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["generated"] for r in ranks] == [3, 3]
    assert ranks[0]["weight_sum"] == pytest.approx(ranks[1]["weight_sum"], abs=1e-9)  # DDP kept the ranks in sync
    assert ranks[0]["weight_sum"] == pytest.approx(single["weight_sum"], rel=1e-6)
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-4) and len(set(single["losses"])) == 3

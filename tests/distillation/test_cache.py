"""Cached teacher outputs: exact equality with the live teacher, top-k approximation, invalidation, training."""

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithPadding

from hf_compress.distillation.cache import (
    CACHE_COLUMNS,
    TeacherCacheCollator,
    cache_teacher_outputs,
    teacher_fingerprint,
)
from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.trainer import DistillationTrainer
from tests.tiny_models import VOCAB, tiny_inputs, tiny_model, tiny_tokenizer

SEQ = 8


def dataset(head: str, n: int = 8, seed: int = 3, ragged: bool = False) -> datasets.Dataset:
    ids = tiny_inputs(n, SEQ, seed=seed)["input_ids"]
    rows = []
    for i in range(n):
        length = SEQ - (i % 3 if ragged else 0)
        row = {"input_ids": ids[i, :length].tolist(), "attention_mask": [1] * length, "text": f"example {i}"}
        if head == "seq_cls":
            row["labels"] = i % 3
        elif head == "qa":
            row["start_positions"], row["end_positions"] = i % 4, i % 4 + 2
        elif head == "token_cls":
            row["labels"] = [-100] * (i % 3) + [(i + j) % 3 for j in range(i % 3, length)]
        else:
            row["labels"] = [-100] * (i % 3) + ids[i, i % 3 : length].tolist()
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def args(tmp_path, **kwargs) -> DistillationConfig:
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                    temperature=2.0, alpha=0.5)  # fmt: skip
    return DistillationConfig(**{**defaults, **kwargs})


def lm_collator():
    tok = tiny_tokenizer()

    def collate(features):
        labels = [f.pop("labels", None) for f in features]
        batch = tok.pad(features, return_tensors="pt")
        if labels[0] is not None:
            width = batch["input_ids"].shape[1]
            batch["labels"] = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        return batch

    collate.tokenizer = tok
    return collate


def batch_losses(tmp_path, head, family, top_k, ragged=False, divergence="kl"):
    """(live loss, cached loss, cached batch) on the same first batch of the same data."""
    extra = {"num_labels": 2} if head == "qa" else {}  # start / end
    student, teacher = tiny_model(family, head, seed=0, **extra), tiny_model(family, head, seed=1, **extra)
    data = dataset(head, ragged=ragged).remove_columns("text")
    collator = lm_collator() if ragged else None
    cached = cache_teacher_outputs(teacher, data, collator, batch_size=4, top_k=top_k)
    config = args(tmp_path, distillation_loss=divergence)
    kwargs = {"data_collator": collator} if collator else {}
    live = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data, **kwargs)
    offline = DistillationTrainer(model=student, teacher_model=None, args=config, train_dataset=cached, **kwargs)
    assert (live.teacher_mode, offline.teacher_mode) == ("live", "cached")
    rows = [cached[i] for i in range(4)]
    batch = offline.data_collator(rows)
    plain = (collator or offline.data_collator.collator)([{k: v for k, v in r.items() if k not in CACHE_COLUMNS}
                                                        for r in rows])  # fmt: skip
    student.eval()
    with torch.no_grad():
        return live.compute_loss(student, plain), offline.compute_loss(student, dict(batch)), batch


@pytest.mark.parametrize("family,head", [("bert", "seq_cls"), ("roberta", "token_cls"), ("bert", "qa")])
def test_classification_cache_is_exact(tmp_path, family, head):
    live, cached, batch = batch_losses(tmp_path, head, family, None)
    torch.testing.assert_close(cached, live, atol=1e-6, rtol=1e-6)
    keys = {"seq_cls": ["teacher_logits"], "token_cls": ["teacher_logits"]}.get(head)
    assert set(keys or ["teacher_start_logits", "teacher_end_logits"]) <= set(batch)


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("top_k,ragged", [(None, False), (VOCAB, False), (VOCAB, True)])
def test_lm_cache_full_vocabulary_is_exact(tmp_path, top_k, ragged, divergence):
    live, cached, batch = batch_losses(tmp_path, "causal_lm", "llama", top_k, ragged, divergence)
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)
    if ragged:  # right-padded to the batch length, like the input ids
        assert batch["teacher_topk_values"].shape[:2] == batch["input_ids"].shape


def test_lm_top_k_is_the_renormalised_approximation(tmp_path):
    student, teacher = tiny_model("llama", "causal_lm", seed=0), tiny_model("llama", "causal_lm", seed=1)
    with torch.no_grad():  # a more peaked teacher, closer to a trained LM
        teacher.lm_head.weight.mul_(40)
    data = dataset("causal_lm").remove_columns("text")
    errors = []
    for k in (4, 16, VOCAB):
        cached = cache_teacher_outputs(teacher, data, batch_size=4, top_k=k)
        assert torch.tensor(cached[0]["teacher_topk_values"]).shape == (SEQ, k)
        trainer = DistillationTrainer(model=student, teacher_model=None, args=args(tmp_path, alpha=1.0),
                                      train_dataset=cached)  # fmt: skip
        batch = trainer.data_collator([cached[i] for i in range(4)])
        student.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(student, dict(batch))
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = F.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100
        log_ps = F.log_softmax(s / 2, -1)[keep]
        values, indices = t[keep].topk(k, -1)
        p_k = F.softmax(values / 2, -1)  # the teacher renormalised over its top k
        expected = (p_k * (p_k.log() - log_ps.gather(1, indices))).sum(-1).mean() * 4
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        exact = F.kl_div(log_ps, F.log_softmax(t[keep] / 2, -1), log_target=True, reduction="batchmean") * 4
        errors.append((abs(loss - exact) / exact).item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors  # shrinks with k, exact at k = vocab


def test_fingerprint_changes_with_teacher_data_and_settings():
    teacher = tiny_model("bert", "seq_cls", seed=1)
    data = dataset("seq_cls")
    base = teacher_fingerprint(teacher, data, None, 4, None)
    assert teacher_fingerprint(teacher, data, None, 4, None) == base
    with torch.no_grad():
        teacher.bert.encoder.layer[1].output.dense.weight[3, 5] += 1e-3  # one element of one weight
    assert teacher_fingerprint(teacher, data, None, 4, None) != base
    changed = data.map(lambda row: {"input_ids": row["input_ids"][:-1] + [7]})
    variants = [(data.select(range(4)), None, 4, None), (changed, None, 4, None), (data, None, 8, None),
                (data, DataCollatorWithPadding(tiny_tokenizer()), 4, None)]  # fmt: skip
    prints = {teacher_fingerprint(teacher, *variant) for variant in variants}
    assert len(prints) == len(variants) and base not in prints


def test_cache_dir_reuses_and_invalidates(tmp_path):
    teacher = tiny_model("bert", "seq_cls", seed=1)
    data = dataset("seq_cls")
    first = cache_teacher_outputs(teacher, data, batch_size=4, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    forward = teacher.forward
    teacher.forward = lambda *a, **k: pytest.fail("a matching cache must not run the teacher")
    again = cache_teacher_outputs(teacher, data, batch_size=4, cache_dir=tmp_path)
    assert again["teacher_logits"] == first["teacher_logits"]
    teacher.forward = forward
    with torch.no_grad():
        teacher.classifier.weight.mul_(2)
    changed = cache_teacher_outputs(teacher, data, batch_size=4, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert not torch.allclose(torch.tensor(changed["teacher_logits"]), torch.tensor(first["teacher_logits"]))
    assert set(CACHE_COLUMNS[:1]) <= set(changed.column_names) and "text" in changed.column_names


def test_columns_survive_remove_unused_columns_and_no_teacher_runs(tmp_path):
    student, teacher = tiny_model("bert", "seq_cls", seed=0), tiny_model("bert", "seq_cls", seed=1)
    cached = cache_teacher_outputs(teacher, dataset("seq_cls"), batch_size=4)  # keeps the "text" column
    trainer = DistillationTrainer(model=student, teacher_model=None, args=args(tmp_path, remove_unused_columns=True),
                                  train_dataset=cached)  # fmt: skip
    assert isinstance(trainer.data_collator, TeacherCacheCollator)
    seen = []
    original = trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, **kw: seen.append(set(inputs)) or original(model, inputs, **kw)
    trainer.train()
    assert seen and all("teacher_logits" in keys and "text" not in keys for keys in seen)
    assert all("loss_soft" in e for e in trainer.state.log_history if "loss" in e)


def test_training_with_cache_matches_live_teacher(tmp_path):
    data = dataset("causal_lm", ragged=True).remove_columns("text")
    teacher = tiny_model("llama", "causal_lm", seed=1)
    cached = cache_teacher_outputs(teacher, data, lm_collator(), batch_size=4, top_k=VOCAB)
    weights = []
    for mode, train, teacher_model in (("live", data, teacher), ("cached", cached, None)):
        student = tiny_model("llama", "causal_lm", seed=0)
        config = args(tmp_path / mode, data_seed=0, remove_unused_columns=True)
        trainer = DistillationTrainer(model=student, teacher_model=teacher_model, args=config, train_dataset=train,
                                      data_collator=lm_collator())  # fmt: skip
        trainer.train()
        assert trainer.teacher_mode == mode
        weights.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    before = tiny_model("llama", "causal_lm", seed=0).state_dict()
    assert any(not torch.equal(before[k], weights[0][k]) for k in before)
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-5, rtol=1e-4)


def test_guards(tmp_path):
    student = tiny_model("bert", "seq_cls", seed=0)
    with pytest.raises(ValueError, match="`teacher_model` is required unless"):
        DistillationTrainer(model=student, teacher_model=None, args=args(tmp_path), train_dataset=dataset("seq_cls"))
    teacher = tiny_model("bert", "seq_cls", seed=1)
    with pytest.raises(ValueError, match="`top_k` must be None or a positive int for LM teachers"):
        cache_teacher_outputs(teacher, dataset("seq_cls"), top_k=2)
    with pytest.raises(ValueError, match="`dataset` must be a `datasets.Dataset`"):
        cache_teacher_outputs(teacher, [{"input_ids": [1, 2]}])
    cached = cache_teacher_outputs(teacher, dataset("seq_cls"), batch_size=4)
    with pytest.raises(ValueError, match="must be 0 with cached teacher outputs"):
        DistillationTrainer(model=student, teacher_model=None, args=args(tmp_path, hidden_loss_weight=1.0),
                            train_dataset=cached)  # fmt: skip
    lm = cache_teacher_outputs(tiny_model("llama", "causal_lm"), dataset("causal_lm"), batch_size=4, top_k=4)
    trainer = DistillationTrainer(model=tiny_model("llama", "causal_lm"), teacher_model=None,
                                  args=args(tmp_path, distillation_loss="reverse_kl"), train_dataset=lm)  # fmt: skip
    with pytest.raises(ValueError, match="`divergence` must be 'kl' for a top-k teacher"):
        trainer.compute_loss(trainer.model, dict(trainer.data_collator([lm[i] for i in range(2)])))


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_cached_columns_like_the_inputs(side):
    tok = tiny_tokenizer()
    tok.padding_side = side
    features = [{"input_ids": [5, 6, 7], "teacher_topk_values": [[1.0, 0.5]] * 3, "teacher_topk_indices": [[3, 4]] * 3,
                 "teacher_start_logits": [0.1, 0.2, 0.3]},
                {"input_ids": [5], "teacher_topk_values": [[2.0, 1.0]], "teacher_topk_indices": [[8, 9]],
                 "teacher_start_logits": [0.4]}]  # fmt: skip
    batch = TeacherCacheCollator(DataCollatorWithPadding(tok), side)(features)
    real = batch["attention_mask"].bool()
    assert batch["teacher_topk_values"].shape == (2, 3, 2) and batch["teacher_topk_indices"].dtype == torch.long
    assert batch["teacher_topk_indices"][1][real[1]].tolist() == [[8, 9]]  # aligned with the real token
    assert batch["teacher_start_logits"][1][~real[1]].tolist() == [-1e4, -1e4]  # padding gets no teacher mass
    assert "teacher_topk_values" in features[0]  # the caller's features are not modified

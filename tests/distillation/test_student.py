import pytest
import torch
import transformers

from hf_compress.distillation.student import evenly_spaced_layers, make_student
from hf_compress.models.families import block_module, get_layers
from tests.tiny_models import DECODERS, HEADS, tiny_inputs, tiny_model


def _head(family):
    return "causal_lm" if family in DECODERS else "seq_cls"


def test_make_student_round_trip(family, tmp_path):
    teacher = tiny_model(family, _head(family))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_student(teacher, num_layers=2)
    assert type(student) is type(teacher)
    assert len(get_layers(student)) == 2 and student.config.num_hidden_layers == 2
    assert student.config.hf_compress["teacher_layers"] == [0, 3]
    for new, old in ((0, 0), (1, 3)):
        torch.testing.assert_close(block_module(student, new, "o").weight, block_module(teacher, old, "o").weight)
    # the teacher is untouched and shares no storage with the student
    assert len(get_layers(teacher)) == 4 and teacher.config.num_hidden_layers == 4
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert block_module(student, 0, "o").weight.data_ptr() != block_module(teacher, 0, "o").weight.data_ptr()
    student.save_pretrained(tmp_path)
    reloaded = HEADS[_head(family)].from_pretrained(tmp_path)
    x = tiny_inputs()
    torch.testing.assert_close(reloaded(**x).logits, student(**x).logits, atol=0, rtol=0)


def test_default_keeps_half_evenly_spaced():
    student = make_student(tiny_model("bert"))
    assert student.config.hf_compress["teacher_layers"] == [0, 3]


def test_explicit_layers_and_generation():
    teacher = tiny_model("qwen3", "causal_lm")
    student = make_student(teacher, layers=[2, 1])
    assert student.config.hf_compress["teacher_layers"] == [1, 2]
    prompt = tiny_inputs(batch=1, seq=4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached, uncached = (student.generate(**prompt, use_cache=use, **kw) for use in (True, False))
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize(
    ("total", "k", "expected"),
    [(4, 2, [0, 3]), (4, 4, [0, 1, 2, 3]), (12, 6, [0, 2, 4, 7, 9, 11]), (12, 3, [0, 6, 11]), (5, 1, [0])],
)
def test_evenly_spaced_layers(total, k, expected):
    assert evenly_spaced_layers(total, k) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_layers=0), r"`num_layers` must be an int in \[1, 4\], got 0"),
        (dict(num_layers=5), r"`num_layers` must be an int in \[1, 4\], got 5"),
        (dict(num_layers=2, layers=[0]), "mutually exclusive"),
        (dict(layers=[0, 4]), r"`layers` must be a non-empty list of indices in \[0, 4\)"),
        (dict(layers=[]), "non-empty"),
        (dict(layers=[1, 1]), "must not repeat"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_student(tiny_model("bert"), **kwargs)


def test_unsupported_family_lists_supported_ones():
    config = transformers.T5Config(d_model=8, num_layers=2, num_heads=2, d_ff=8, d_kv=4, vocab_size=32)
    with pytest.raises(ValueError, match=r"cannot prune or slice: it is not among the supported families \(bart,"):
        make_student(transformers.AutoModel.from_config(config), num_layers=1)

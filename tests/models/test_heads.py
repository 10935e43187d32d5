import pytest
import transformers

from hf_compress.distillation.teacher import DISTILLED_HEADS, distilled_head
from hf_compress.models.heads import BACKBONE, HEADS, LM_HEADS, auto_class_for_task, detect_head, head_of
from tests.tiny_models import tiny_model


def test_detect_head():
    assert detect_head("BartForConditionalGeneration") == "seq2seq_lm"  # seq2seq is checked before masked LM
    assert detect_head("LlamaForCausalLM") == "causal_lm"
    assert detect_head("GPT2LMHeadModel") == "causal_lm"
    assert detect_head("BertForQuestionAnswering") == "qa"
    assert detect_head("ViTForImageClassification") == "image_cls"
    assert detect_head("BertModel") is None
    assert detect_head(None) is None


def test_every_head_names_a_real_auto_class_and_lm_heads_are_heads():
    for name, head in HEADS.items():
        assert head.auto() is getattr(transformers, head.auto_class), name
    assert set(LM_HEADS) < set(HEADS) and set(DISTILLED_HEADS) == set(HEADS)  # image_cls: DeiT-style KD


def test_head_of_architectures_and_backbone():
    assert head_of(["RobertaForTokenClassification"]).pipeline_task == "token-classification"
    assert head_of(["BertForMaskedLM"]).auto_class == "AutoModelForMaskedLM"
    assert head_of(["BertModel"]) is BACKBONE and head_of(None) is BACKBONE and head_of([]) is BACKBONE


def test_auto_class_for_recipe_tasks():
    assert auto_class_for_task("sequence-classification") is transformers.AutoModelForSequenceClassification
    assert auto_class_for_task("causal-lm") is transformers.AutoModelForCausalLM
    assert auto_class_for_task("sentence-embedding") is transformers.AutoModel  # the encoder inside the ST model
    with pytest.raises(ValueError, match="`task` must be one of"):
        auto_class_for_task("fill-mask")


@pytest.mark.parametrize(("family", "head"), [("bert", "seq_cls"), ("llama", "causal_lm"), ("bert", "masked_lm")])
def test_distilled_head_of_models(family, head):
    assert distilled_head(tiny_model(family, head)) == head
    assert distilled_head(tiny_model(family)) is None  # no task head

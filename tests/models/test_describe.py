from hf_compress.models import describe
from hf_compress.pruning.surgery import prune_heads
from tests.tiny_models import tiny_model


def test_describe_lists_blocks_heads_groups_and_config_fields(capsys):
    model = prune_heads(tiny_model("llama", "causal_lm"), {1: [0, 1]})
    text = describe(model)
    assert text == capsys.readouterr().out.rstrip("\n")
    assert "blocks 0-3: model.layers.{0-3}" in text
    assert "1      2      1         2      4         32" in text  # block 1 lost a whole KV group
    assert "`num_attention_heads` / `num_key_value_heads` / `head_dim` (uniform heads)" in text


def test_describe_prints_the_encoder_decoder_numbering():
    text = describe(tiny_model("bart", "seq2seq_lm"))
    assert "encoder blocks 0-1: model.encoder.layers.{0-1}" in text
    assert "decoder blocks 2-3: model.decoder.layers.{0-1}" in text
    assert "flat numbering: decoder block j is 2 + j" in text
    assert "cross_heads=" in text


def test_describe_says_what_is_refused():
    assert "heads: refused, its `q_norm` / `k_norm`" in describe(tiny_model("olmo2"))
    assert "single KV head" in describe(tiny_model("gemma3_text", num_key_value_heads=1))

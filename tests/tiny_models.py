"""Tiny models of every supported family, built from configs (never from Hub ids), with their inputs and tokenizer."""

from __future__ import annotations

import torch
import transformers
from transformers import PreTrainedTokenizerFast

VOCAB = 64
FAMILIES = ["bert", "roberta", "distilbert", "llama", "mistral", "qwen2", "qwen3", "gpt2"]
ENCODERS = ["bert", "roberta", "distilbert"]
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
# Every family hf_compress supports, for the one parametrised per-family suite (tests/models/test_every_family.py).
EVERY_ENCODER = [*ENCODERS, "xlm-roberta", "camembert", "electra", "modernbert", "deberta-v2", "mpnet"]
EVERY_DECODER = [*DECODERS, "gemma", "gemma2", "gemma3_text", "granite", "smollm3", "phi3", "olmo2"]
# Encoder-decoder families: 2 encoder + 2 decoder blocks, numbered 0-1 (encoder) and 2-3 (decoder).
ENCODER_DECODERS = ["bart", "whisper"]
VISION = ["vit", "deit"]  # image classification on 8x8 pixels, 4x4 patches
EVERY_FAMILY = [*EVERY_ENCODER, *EVERY_DECODER, *ENCODER_DECODERS, *VISION]
_BERT_LIKE = {
    "bert": transformers.BertConfig,
    "roberta": transformers.RobertaConfig,
    "xlm-roberta": transformers.XLMRobertaConfig,
    "camembert": transformers.CamembertConfig,
    "electra": transformers.ElectraConfig,
    "mpnet": transformers.MPNetConfig,
}
_LLAMA_LIKE = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma": transformers.GemmaConfig,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
    "granite": transformers.GraniteConfig,
    "smollm3": transformers.SmolLM3Config,
    "phi3": transformers.Phi3Config,
    "olmo2": transformers.Olmo2Config,
}
# What makes each decoder family itself in a tiny config: decoupled head_dim, sliding / full layers, soft-capping,
# Granite's multipliers, SmolLM3's NoPE layers.
_DECODER_EXTRAS = {
    "qwen3": dict(head_dim=4),
    "gemma": dict(head_dim=8),
    "gemma2": dict(
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        attn_logit_softcapping=20.0,
        final_logit_softcapping=10.0,
        query_pre_attn_scalar=8,
    ),
    "gemma3_text": dict(head_dim=8, sliding_window=4, sliding_window_pattern=2, tie_word_embeddings=True),
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0),
    "smollm3": dict(no_rope_layer_interval=2),
}


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """A 2–4 layer, 16–32 wide config of ``family`` with 4 heads (GQA 4/2 for the Llama family)."""
    common = dict(vocab_size=VOCAB, num_labels=3, pad_token_id=0)
    if family in _BERT_LIKE:
        kw = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        if family in ("roberta", "xlm-roberta", "camembert"):
            kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
        if family == "electra":
            kw.update(embedding_size=8)  # ELECTRA projects smaller embeddings up to the hidden size
        cfg = _BERT_LIKE[family](**{**common, **kw})
    elif family == "deberta-v2":  # DeBERTa-v3 style: relative attention, shared q/k projections of positions
        cfg = transformers.DebertaV2Config(
            **common,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            share_att_key=True,
            position_buckets=8,
            max_relative_positions=16,
            norm_rel_ebd="layer_norm",
            position_biased_input=False,
        )
    elif family == "modernbert":  # global attention every 2nd layer, sliding (window 4) in between
        cfg = transformers.ModernBertConfig(
            **{**common, "pad_token_id": 0},
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            global_attn_every_n_layers=2,
            local_attention=4,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        )
    elif family in VISION:
        cls = transformers.ViTConfig if family == "vit" else transformers.DeiTConfig
        cfg = cls(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=8,
            patch_size=4,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        if family == "deit":  # the Auto mapping holds two DeiT classifiers: name the plain one
            cfg.architectures = ["DeiTForImageClassification"]
    elif family in ENCODER_DECODERS:
        kw = dict(
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
        if family == "bart":
            cfg = transformers.BartConfig(**common, **kw, max_position_embeddings=64, forced_eos_token_id=None)
        else:  # Whisper: 8 mel bins over 16 frames (2 x max_source_positions)
            kw.update(num_mel_bins=8, max_source_positions=8, max_target_positions=32, suppress_tokens=None)
            cfg = transformers.WhisperConfig(**common, **kw, begin_suppress_tokens=None)
    elif family == "distilbert":
        cfg = transformers.DistilBertConfig(
            **common,
            dim=16,
            hidden_dim=32,
            n_layers=4,
            n_heads=4,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
        )
    elif family == "gpt2":
        cfg = transformers.GPT2Config(
            **common,
            n_embd=16,
            n_inner=32,
            n_layer=4,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        kw = {"tie_word_embeddings": False, **_DECODER_EXTRAS.get(family, {})}
        if family not in DECODERS:  # token ids inside the tiny vocabulary (the defaults are the real models')
            kw.update(bos_token_id=1, eos_token_id=2)
        cfg = _LLAMA_LIKE[family](
            **common,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **kw,
        )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


HEADS = {
    "base": transformers.AutoModel,
    "seq2seq_lm": transformers.AutoModelForSeq2SeqLM,
    "speech_seq2seq": transformers.AutoModelForSpeechSeq2Seq,
    "image_cls": transformers.AutoModelForImageClassification,
    "seq_cls": transformers.AutoModelForSequenceClassification,
    "token_cls": transformers.AutoModelForTokenClassification,
    "qa": transformers.AutoModelForQuestionAnswering,
    "masked_lm": transformers.AutoModelForMaskedLM,
    "causal_lm": transformers.AutoModelForCausalLM,
}


def tiny_model(family: str, head: str = "base", seed: int = 0, **overrides):
    """A randomly initialised tiny ``family`` model with the given ``head``, in eval mode."""
    torch.manual_seed(seed)
    model = HEADS[head].from_config(tiny_config(family, **overrides))
    return model.eval()


def tiny_inputs(batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``VOCAB`` tokens built locally with ``tokenizers``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_sentence_transformer(folder, seed: int = 0, **overrides):
    """A 4-layer, 16-wide BERT + word-level tokenizer saved to ``folder``, wrapped with mean pooling."""
    # heavy optional dependency: only the tests that use sentence-transformers need it
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    tiny_model("bert", seed=seed, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    transformer = Transformer(str(folder))
    return SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())], device="cpu")


def lm_head(family: str) -> str:
    """The task head tested for ``family``: causal / masked (tied weights) / seq2seq LM, image classification."""
    if family in ENCODER_DECODERS:
        return "speech_seq2seq" if family == "whisper" else "seq2seq_lm"
    if family in VISION:
        return "image_cls"
    return "masked_lm" if family in EVERY_ENCODER else "causal_lm"


def family_inputs(family: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """:func:`tiny_inputs` as ``family`` reads them: decoder ids for encoder-decoders, log-mel frames for Whisper."""
    if family in VISION:
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))}
    inputs = tiny_inputs(batch, seq, seed)
    if family in ENCODER_DECODERS:
        inputs["decoder_input_ids"] = inputs["input_ids"].flip(1)
    if family == "whisper":
        g = torch.Generator().manual_seed(seed)
        inputs["input_features"] = torch.randn(batch, 8, 16, generator=g)
        del inputs["input_ids"], inputs["attention_mask"]
    return inputs

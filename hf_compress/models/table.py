"""The table of supported model families: where attention heads, FFN neurons and blocks live in each.

``FAMILIES`` maps a ``config.model_type`` to the attribute paths of its blocks and projections (a :class:`Family`);
``REFUSED`` names the model types refused on purpose, with the reason. Adding a family whose blocks follow a layout
already described here is one dict entry; the helpers that read the table are in :mod:`hf_compress.models.families`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Attribute paths of one model family. Block-relative paths are dotted, ``None`` when absent."""

    layers: str  # path from the backbone (``model.base_model``) to the ``nn.ModuleList`` of blocks
    o: str  # attention output projection
    up: str  # FFN input projection (rows = neurons)
    down: str  # FFN output projection (columns = neurons)
    head_dim: str  # attribute on the attention module holding the per-head width
    attention: str  # the attention module (owner of the head-count attributes)
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused projection laid out [q heads][k heads][v heads] (GPT-2 ``c_attn``, Phi-3)
    gate: str | None = None  # gated FFNs (Llama family)
    fused_gate_up: bool = False  # ``up`` holds both GLU halves, [gate neurons][up neurons] (Phi-3 ``gate_up_proj``)
    ffn_config: str = "intermediate_size"  # config field holding the FFN width
    conv1d: bool = False  # weights stored as [in, out] (transformers ``Conv1D``)
    causal_cache: bool = False  # blocks carry a ``layer_idx`` used by the KV cache
    # Config field the modeling code reads the head width from (``head_dim``), sizing every projection with it, so that
    # fewer heads with the same width are expressible; ``None`` when the width is ``hidden_size / num_heads``.
    config_head_dim: str | None = None
    forward_reads_config_heads: bool = False  # attention reads ``config.num_attention_heads`` at run time (Phi-3)
    heads_refused: str | None = None  # why heads cannot be removed exactly (the rest of the sentence)
    hidden_refused: str | None = None  # why the hidden size cannot be pruned (the rest of the sentence)
    head_rows: tuple[str, ...] = ()  # more projections with one row block per query head, when present (DeBERTa)
    layers_config: str = "num_hidden_layers"  # config field holding the number of blocks
    heads_config: str = "num_attention_heads"  # config field holding the number of query heads
    # Encoder-decoder models: the entry above describes the encoder blocks; ``decoder`` describes the decoder blocks
    # (its ``layers`` is their path from the backbone), whose cross-attention has the ``cross_*`` roles.
    decoder: Family | None = None
    cross_q: str | None = None
    cross_k: str | None = None
    cross_v: str | None = None
    cross_o: str | None = None
    cross_attention: str | None = None
    # Mixture of experts: in a sparse block the FFN neurons are those of the routed experts (``ffn_config`` is their
    # width, the same for every expert of a block); ``up`` / ``gate`` / ``down`` then name a dense block's MLP.
    experts: str | None = None  # fused experts: ``gate_up_proj`` [experts, 2 * ffn, hidden], ``down_proj`` [.., ffn]
    router: str | None = None  # the experts' router: ``weight`` [experts, hidden] and ``top_k``
    experts_config: str | None = None  # config field holding the number of experts per block


_BERT = Family(
    layers="encoder.layer",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
    attention="attention.self",
    head_dim="attention_head_size",
)
_LLAMA = Family(
    layers="layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    attention="self_attn",
    head_dim="head_dim",
    causal_cache=True,
    config_head_dim="head_dim",
)

# Mixture of experts (transformers 5 fuses each block's experts into 3-D tensors).
_MOE = dataclasses.replace(
    _LLAMA,
    ffn_config="moe_intermediate_size",
    experts="mlp.experts",
    router="mlp.gate",
    experts_config="num_experts",
)

_BART_ENCODER = Family(
    layers="encoder.layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    up="fc1",
    down="fc2",
    attention="self_attn",
    head_dim="head_dim",
    ffn_config="encoder_ffn_dim",
    layers_config="encoder_layers",
    heads_config="encoder_attention_heads",
)
_BART = dataclasses.replace(
    _BART_ENCODER,
    hidden_refused=(
        "the head width of both stacks is `d_model / heads`, so a narrower encoder-decoder cannot be rebuilt from its "
        "config, and Whisper's convolutional front end carries the hidden size too; prune `heads`, `ffn_neurons` or "
        "`layers` instead"
    ),
    decoder=dataclasses.replace(
        _BART_ENCODER,
        layers="decoder.layers",
        ffn_config="decoder_ffn_dim",
        layers_config="decoder_layers",
        heads_config="decoder_attention_heads",
        causal_cache=True,
        cross_q="encoder_attn.q_proj",
        cross_k="encoder_attn.k_proj",
        cross_v="encoder_attn.v_proj",
        cross_o="encoder_attn.out_proj",
        cross_attention="encoder_attn",
    ),
)
_DEBERTA = dataclasses.replace(
    _BERT,
    q="attention.self.query_proj",
    k="attention.self.key_proj",
    v="attention.self.value_proj",
    # Relative-position projections of the shared position embeddings (without `share_att_key`; with it, the
    # query / key projections project them too, so their rows already carry each head).
    head_rows=("attention.self.pos_key_proj", "attention.self.pos_query_proj"),
    # No `config_head_dim`: the config's `attention_head_size` sizes q/k/v, but the output projection is built
    # hidden_size x hidden_size, so fewer heads are never plainly expressible.
)
_VIT = Family(
    layers="layers",
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
    o="attention.o_proj",
    up="mlp.fc1",
    down="mlp.fc2",
    attention="attention",
    head_dim="head_dim",
    config_head_dim="head_dim",
    hidden_refused=(
        "its patch embedding (a `Conv2d`), `cls_token` and position embeddings carry the hidden size outside any "
        "embedding, norm or linear layer hf_compress slices; prune `heads`, `ffn_neurons` or `layers` instead"
    ),
)
_OLMO2 = dataclasses.replace(
    _LLAMA,
    heads_refused=(
        "its `q_norm` / `k_norm` RMSNorm normalise over all heads together, so removing a head changes the others; "
        "prune `ffn_neurons` or `layers` instead"
    ),
    hidden_refused=(
        "its `q_norm` / `k_norm` read the same `rms_norm_eps` as the hidden norms, whose epsilon hidden pruning "
        "scales by d / d' to stay exact, so the q / k norms would change the function (by up to 2e-3 on small "
        "models); prune `ffn_neurons` or `layers` instead"
    ),
)

FAMILIES: dict[str, Family] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "distilbert": Family(
        layers="transformer.layer",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        up="ffn.lin1",
        down="ffn.lin2",
        attention="attention",
        head_dim="attention_head_size",
        ffn_config="hidden_dim",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "granite": _LLAMA,
    "smollm3": _LLAMA,
    "olmo2": _OLMO2,
    "phi3": Family(
        layers="layers",
        qkv="self_attn.qkv_proj",
        o="self_attn.o_proj",
        up="mlp.gate_up_proj",
        fused_gate_up=True,
        down="mlp.down_proj",
        attention="self_attn",
        head_dim="head_dim",
        causal_cache=True,
        config_head_dim="head_dim",
        forward_reads_config_heads=True,
    ),
    "bart": _BART,
    "whisper": _BART,  # the same block layout; the encoder reads log-mel `input_features`
    "vit": _VIT,
    "deberta-v2": _DEBERTA,
    "mpnet": dataclasses.replace(
        _BERT,
        q="attention.attn.q",
        k="attention.attn.k",
        v="attention.attn.v",
        o="attention.attn.o",
        attention="attention.attn",
        heads_refused=(
            "its encoder computes one relative position bias for all heads and adds it in every layer, so a layer "
            "with fewer heads would need its own bias columns, which the stock module cannot select; prune "
            "`ffn_neurons` or `layers` instead"
        ),
    ),
    "modernbert": Family(
        layers="layers",
        qkv="attn.Wqkv",  # [3][heads][head_dim]
        o="attn.Wo",
        up="mlp.Wi",  # GLU: [input neurons][gate neurons]
        fused_gate_up=True,
        down="mlp.Wo",
        attention="attn",
        head_dim="head_dim",
    ),
    "deit": _VIT,
    "gpt2": Family(
        layers="h",
        qkv="attn.c_attn",
        o="attn.c_proj",
        up="mlp.c_fc",
        down="mlp.c_proj",
        attention="attn",
        head_dim="head_dim",
        ffn_config="n_inner",
        conv1d=True,
        causal_cache=True,
    ),
    "qwen2_moe": _MOE,  # its shared expert (``mlp.shared_expert``) is kept whole
    "qwen3_moe": _MOE,
    "mixtral": dataclasses.replace(_MOE, ffn_config="intermediate_size", experts_config="num_local_experts"),
}

# Runtime attributes of the attention modules (BERT, DistilBERT, GPT-2, Llama family) and what they hold.
HEAD_ATTRIBUTES: dict[str, str] = {
    "num_attention_heads": "heads",  # BERT / RoBERTa
    "n_heads": "heads",  # DistilBERT
    "num_heads": "heads",  # GPT-2
    "num_key_value_heads": "kv_heads",
    "num_key_value_groups": "groups",  # Llama family (GQA repeat factor)
    "all_head_size": "width",  # BERT / RoBERTa
    "split_size": "width",  # GPT-2 (splits the fused q/k/v output)
}

# Config lists with one entry per block (attention kind, SmolLM3's NoPE layers), kept in step by `drop_layers`.
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")

# Model types refused on purpose, with the reason (the rest of the error sentence).
REFUSED: dict[str, str] = {
    "albert": (
        "ALBERT shares one set of block weights across all its layers (`albert_layer_groups`), so there are no "
        "per-layer heads, neurons or blocks to remove; for a shallower student lower `config.num_hidden_layers` "
        "(the shared block then runs fewer times)"
    ),
}

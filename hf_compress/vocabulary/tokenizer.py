"""Tokenizer surgery for vocabulary pruning: read a fast tokenizer's JSON, work out which ids must stay (special and
post-processor tokens; for BPE the pieces its kept merges need) and rebuild the tokenizer with renumbered ids.

Used by :func:`hf_compress.vocabulary.prune_vocabulary`, which owns the model side (embedding rows, output head,
config ids) and the documentation of what happens to removed tokens.
"""

from __future__ import annotations

import json
import os
import tempfile

SUPPORTED_MODELS = ("WordPiece", "WordLevel", "BPE", "Unigram")
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"`tokenizer` must be a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}; load it with "
            "`AutoTokenizer.from_pretrained(...)`."
        )
    data = json.loads(backend.to_str())
    model = data["model"]
    kind = model.get("type") or (
        "BPE"
        if "merges" in model
        else "Unigram"
        if isinstance(model["vocab"], list)
        else "WordPiece"
        if "continuing_subword_prefix" in model
        else "WordLevel"
    )
    if kind not in SUPPORTED_MODELS:
        raise ValueError(f"`tokenizer` model type must be one of {list(SUPPORTED_MODELS)}, got {kind!r}.")
    model["type"] = kind
    return data


def vocab_ids(data: dict) -> dict[str, int]:
    """Token string -> id over the model vocabulary and the added tokens."""
    vocab = data["model"]["vocab"]
    ids = {entry[0]: i for i, entry in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
    ids.update({tok["content"]: tok["id"] for tok in data["added_tokens"]})
    return ids


def _processor_ids(proc: dict | None) -> list[int]:
    if not proc:
        return []
    if proc["type"] == "Sequence":
        return [i for sub in proc["processors"] for i in _processor_ids(sub)]
    if proc["type"] == "TemplateProcessing":
        return [i for special in proc["special_tokens"].values() for i in special["ids"]]
    return [proc[key][1] for key in ("sep", "cls") if key in proc]


def _remap_processor(proc: dict | None, old_to_new: dict[int, int]) -> None:
    if not proc:
        return
    if proc["type"] == "Sequence":
        for sub in proc["processors"]:
            _remap_processor(sub, old_to_new)
    elif proc["type"] == "TemplateProcessing":
        for special in proc["special_tokens"].values():
            special["ids"] = [old_to_new[i] for i in special["ids"]]
    else:
        for key in ("sep", "cls"):
            if key in proc:
                proc[key][1] = old_to_new[proc[key][1]]


def required_ids(tokenizer, data: dict, token_ids: dict[str, int]) -> set[int]:
    """Ids the tokenizer machinery needs: unk, pad, post-processor tokens and the named special tokens."""
    model = data["model"]
    required = set(_processor_ids(data.get("post_processor")))
    if model.get("unk_token") in token_ids:
        required.add(token_ids[model["unk_token"]])
    if model["type"] == "Unigram" and model.get("unk_id") is not None:
        required.add(model["unk_id"])
    if data.get("padding"):
        required.add(data["padding"]["pad_id"])
    for name in NAMED_SPECIAL_TOKENS:
        token = getattr(tokenizer, name, None)
        if token is not None and str(token) in token_ids:
            required.add(token_ids[str(token)])
    return required


def _split_merge(merge: str | list[str]) -> tuple[str, str]:
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)


def _merged(left: str, right: str, prefix: str) -> str:
    return left + (right[len(prefix) :] if prefix and right.startswith(prefix) else right)


def bpe_closure(model: dict, keep: set[int]) -> set[int]:
    """Add the BPE alphabet, byte-fallback tokens and every merge part needed to build a kept token."""
    vocab, prefix = model["vocab"], model.get("continuing_subword_prefix") or ""
    keep = keep | {i for tok, i in vocab.items() if len(tok) == 1 or (len(tok) == 6 and tok.startswith("<0x"))}
    producers: dict[str, list[tuple[str, str]]] = {}
    for merge in model["merges"]:
        left, right = _split_merge(merge)
        producers.setdefault(_merged(left, right, prefix), []).append((left, right))
    id_to_token = {i: tok for tok, i in vocab.items()}
    stack = [id_to_token[i] for i in keep if i in id_to_token]
    while stack:
        for pair in producers.get(stack.pop(), []):
            for part in pair:
                if part in vocab and vocab[part] not in keep:
                    keep.add(vocab[part])
                    stack.append(part)
    return keep


def prune_json(data: dict, old_to_new: dict[int, int]) -> dict:
    """Rewrite a tokenizer.json dict to the kept ids, renumbered contiguously."""
    model = data["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [entry for i, entry in enumerate(model["vocab"]) if i in old_to_new]
        if model.get("unk_id") is not None:
            model["unk_id"] = old_to_new[model["unk_id"]]
    else:
        model["vocab"] = {tok: old_to_new[i] for tok, i in model["vocab"].items() if i in old_to_new}
    if model["type"] == "BPE":
        vocab, prefix = model["vocab"], model.get("continuing_subword_prefix") or ""
        model["merges"] = [
            m
            for m in model["merges"]
            if all(part in vocab for part in (*_split_merge(m), _merged(*_split_merge(m), prefix)))
        ]
    data["added_tokens"] = [
        {**tok, "id": old_to_new[tok["id"]]} for tok in data["added_tokens"] if tok["id"] in old_to_new
    ]
    _remap_processor(data.get("post_processor"), old_to_new)
    if data.get("padding"):
        data["padding"]["pad_id"] = old_to_new[data["padding"]["pad_id"]]
    return data


def rebuild_tokenizer(tokenizer, data: dict, old_to_new: dict[int, int]):
    """Save ``tokenizer``, swap in the pruned tokenizer.json and reload it: the exact path a saved folder takes."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in getattr(tokenizer, "vocab_files_names", {}).values():
            if name != "tokenizer.json" and os.path.isfile(os.path.join(tmp, name)):
                os.remove(os.path.join(tmp, name))  # stale vocab/merges files would shadow the pruned JSON
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        config_path = os.path.join(tmp, "tokenizer_config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {
                str(old_to_new[int(i)]): tok
                for i, tok in config["added_tokens_decoder"].items()
                if int(i) in old_to_new
            }
        kept_tokens = {tok["content"] for tok in data["added_tokens"]}
        if isinstance(config.get("extra_special_tokens"), list):
            config["extra_special_tokens"] = [
                t for t in config["extra_special_tokens"] if (t if isinstance(t, str) else t["content"]) in kept_tokens
            ]
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        new = type(tokenizer).from_pretrained(tmp)
    new.name_or_path = tokenizer.name_or_path
    expected = vocab_ids(data)
    if any(new.convert_tokens_to_ids(tok) != i for tok, i in expected.items()) or len(new) > len(old_to_new):
        raise RuntimeError(
            f"The rebuilt `{type(tokenizer).__name__}` does not reproduce the pruned vocabulary ({len(new)} tokens "
            f"for {len(old_to_new)} kept ids); please report this tokenizer."
        )
    return new

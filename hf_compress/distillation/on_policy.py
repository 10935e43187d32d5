"""On-policy and sequence-level distillation data: prompt/completion batches, seeded sampling, re-packing.

Batches keep one shape from the collator to the loss: right-padded `input_ids`, `attention_mask` and `labels` where
only completion tokens carry labels (`-100` on the prompt and the padding). A generated batch has that same shape,
so the teacher scores prompt + generated tokens in one forward and the chunked loss runs as for any causal LM batch:

1. [`PromptCompletionCollator`] tokenizes TRL-style examples (`prompt` + `completion`, plain or conversational, or
   chat `messages`) into such a batch;
2. [`split_prompts`] recovers the left-padded prompts from it (the leading `-100` labels of each row);
3. [`generate_completions`] samples completions with a model (the unwrapped student, or the teacher for
   sequence-level KD) and one seeded generator per row, so a row's completion does not depend on the other rows of
   its micro-batch (gradient accumulation and data parallelism see the same tokens);
4. [`join_completions`] packs prompt + completion back into a right-padded, completion-labelled batch.

[`rollout`] chains 2-4; [`is_on_policy_step`] draws, per optimizer step, whether its batches are generated.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

IGNORE_INDEX = -100
GENERATED_KEY = "generated_by"
"""Batch key set by [`rollout`]: `"student"` or `"teacher"` (popped by the trainer before the forward passes)."""

TRL_COLUMNS = ("prompt", "completion", "messages")
"""Dataset columns [`PromptCompletionCollator`] reads (kept by the trainer although the model does not take them)."""

__all__ = [
    "TRL_COLUMNS",
    "check_generation_options",
    "GENERATED_KEY",
    "PromptCompletionCollator",
    "SeededSampler",
    "generate_completions",
    "is_on_policy_step",
    "join_completions",
    "rollout",
    "row_seeds",
    "special_token_ids",
    "split_prompts",
]


def is_on_policy_step(step: int, ratio: float, seed: int) -> bool:
    """Whether optimizer step `step` uses generated completions: true with probability `ratio` (GKD's lambda).

    The draw depends on `(seed, step)` only, so every micro-batch of an accumulated step and every process agree.

    >>> is_on_policy_step(3, 1.0, 0), is_on_policy_step(3, 0.0, 0)
    (True, False)
    """
    if ratio <= 0:
        return False
    return ratio >= 1 or random.Random(f"{seed}-{step}").random() < ratio


# ---- data --------------------------------------------------------------------------------------------------------


class PromptCompletionCollator:
    """
    Collate prompt/completion examples into right-padded `input_ids`, `attention_mask` and completion-only `labels`.

    Accepted examples (TRL's conventions): `{"prompt": str, "completion": str}`; conversational
    `{"prompt": [messages], "completion": [messages]}`; or `{"messages": [...]}` whose last message is the
    completion. Conversations are rendered with the tokenizer's chat template (prompt with the generation prompt),
    plain text is tokenized as is and the completion ends with the EOS token.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): Its pad token (or EOS when there is none) pads the batch.
        max_length (`int`, *optional*): Longest prompt + completion kept; longer completions are cut at the end.
        max_prompt_length (`int`, *optional*): Longest prompt kept; longer prompts keep their last tokens.

    >>> collator = PromptCompletionCollator(tokenizer)  # doctest: +SKIP
    >>> batch = collator([{"prompt": "2 + 2 =", "completion": " 4"}])  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
    ):
        for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or None, got {value}.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = 0 if pad is None else pad

    def encode(self, example: dict[str, Any]) -> tuple[list[int], list[int]]:
        """The prompt and completion token ids of one example."""
        if "messages" in example:
            messages = list(example["messages"])
            if len(messages) < 2:
                raise ValueError(f"`messages` must hold a prompt and a completion message, got {len(messages)}.")
            return self._encode_chat(messages[:-1], messages[-1:])
        if "prompt" not in example:
            raise ValueError(
                f"Examples must have `prompt` (and `completion`), or `messages`, got keys {sorted(example)}; see "
                "TRL's prompt-completion dataset format."
            )
        prompt, completion = example["prompt"], example.get("completion")
        tok = self.tokenizer
        if completion is None:  # prompt-only data (fully on-policy): the EOS token stands for the completion
            eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
            if isinstance(prompt, list):
                return self._encode_chat(prompt, None)[0], eos
            return tok(prompt)["input_ids"], eos
        if isinstance(prompt, list):
            return self._encode_chat(prompt, completion if isinstance(completion, list) else [completion])
        prompt_ids = tok(prompt)["input_ids"]
        completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            completion_ids = completion_ids + [tok.eos_token_id]
        return prompt_ids, completion_ids

    def _encode_chat(self, prompt: list, completion: list | None) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if tok.chat_template is None:
            raise ValueError("Conversational examples need `tokenizer.chat_template`, got None; set a chat template.")
        prompt_ids = _ids(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        if completion is None:
            return prompt_ids, []
        full_ids = _ids(tok.apply_chat_template(prompt + completion, tokenize=True))
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "The chat template renders the prompt differently inside the full conversation, so the completion "
                "cannot be located; use a template whose generation prompt is a prefix of the assistant turn."
            )
        return prompt_ids, full_ids[len(prompt_ids) :]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = []
        for example in examples:
            prompt, completion = self.encode(example)
            if self.max_prompt_length is not None:
                prompt = prompt[-self.max_prompt_length :]
            if self.max_length is not None:
                completion = completion[: max(self.max_length - len(prompt), 0)]
            if not completion:
                raise ValueError(
                    f"An example has an empty completion after truncation (prompt of {len(prompt)} tokens, "
                    f"`max_length`={self.max_length}); raise `max_length` or set `max_prompt_length`."
                )
            rows.append((prompt, completion))
        return pack(rows, self.pad_token_id)


def _ids(encoded) -> list[int]:
    """`apply_chat_template(tokenize=True)` returns a list in some versions, a `BatchEncoding` in others."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def pack(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and completion-only `labels` of `(prompt, completion)` id lists."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        ids[i, : n + m] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        labels[i, n : n + m] = ids[i, n : n + m]
        mask[i, : n + m] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def special_token_ids(model: torch.nn.Module, tokenizer: Any = None) -> tuple[int | list[int] | None, int]:
    """`(eos_token_id, pad_token_id)` for generation: the tokenizer's, else the model's generation config."""
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = eos if eos is not None else getattr(config, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(config, "pad_token_id", None)
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos, pad if pad is not None else first_eos if first_eos is not None else 0


# ---- prompts and completions -------------------------------------------------------------------------------------


def split_prompts(batch: dict[str, torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded prompts `(prompt_ids, prompt_mask)` of a right-padded prompt/completion batch.

    A row's prompt is its attended tokens before the first label that is not `-100`.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    labelled = labels != IGNORE_INDEX
    if not labelled.any(1).all():
        raise ValueError("Every row needs completion labels (not -100) to locate its prompt, got a row without.")
    lengths = labelled.int().argmax(1)
    width = int(lengths.max())
    prompt_ids = torch.full((ids.shape[0], width), pad_token_id, dtype=ids.dtype, device=ids.device)
    prompt_mask = torch.zeros((ids.shape[0], width), dtype=mask.dtype, device=ids.device)
    for i, n in enumerate(lengths.tolist()):
        prompt_ids[i, width - n :] = ids[i, :n]
        prompt_mask[i, width - n :] = mask[i, :n]
    return prompt_ids, prompt_mask


def row_seeds(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int, step: int) -> list[int]:
    """One seed per row from its prompt tokens, `seed` and `step`: independent of the other rows in the batch."""
    seeds = []
    for ids, keep in zip(prompt_ids.tolist(), prompt_mask.tolist()):
        tokens = [t for t, k in zip(ids, keep) if k]
        data = f"{seed}-{step}-" + ",".join(map(str, tokens))
        seeds.append(zlib.crc32(data.encode()))
    return seeds


class SeededSampler(LogitsProcessor):
    """
    Sample each row's next token with its own `torch.Generator` (temperature, then nucleus `top_p`) and return
    logits that are `-inf` everywhere else, so that greedy decoding (`do_sample=False`) emits the sampled token.

    Args:
        seeds (`list[int]`): One seed per row (see [`row_seeds`]).
        temperature (`float`): Softmax temperature, > 0.
        top_p (`float`): Nucleus probability mass in (0, 1].
    """

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        if not 0 < top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p}.")
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > self.top_p  # keeps the first token past the mass
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        noise = torch.stack([torch.rand(probs.shape[-1], generator=g, device=probs.device) for g in self.generators])
        # Exponential race: argmax(p / E), E ~ Exp(1), draws from p (zero-probability tokens never win).
        choice = (probs / (-torch.log1p(-noise)).clamp(min=1e-20)).argmax(-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter(-1, choice, 0.0)


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seeds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Complete left-padded prompts with `model.generate`; returns `(completion_ids, completion_mask)`.

    A completion ends with (and includes) its first EOS token; `completion_mask` is 0 after it. `temperature=0` is
    greedy; otherwise [`SeededSampler`] samples with one generator per row (`seeds`, default 0 for every row). The
    model is put in eval mode for generation and returned to its previous mode.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    processors = LogitsProcessorList()
    if temperature > 0:
        processors.append(SeededSampler(seeds or [0] * prompt_ids.shape[0], temperature, top_p))
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, logits_processor=processors
        )
    finally:
        model.train(was_training)
    completion = out[:, prompt_ids.shape[1] :]
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=completion.device).view(-1)
    is_eos = torch.isin(completion, eos)
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return completion, (~after_eos).long()


def join_completions(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and completion-only `labels` of left-padded prompts plus completions,
    on the prompts' device."""
    prompts = [[t for t, k in zip(p, m) if k] for p, m in zip(prompt_ids.tolist(), prompt_mask.tolist())]
    completions = [[t for t, k in zip(c, m) if k] for c, m in zip(completion_ids.tolist(), completion_mask.tolist())]
    rows = list(zip(prompts, completions))
    return {key: value.to(prompt_ids.device) for key, value in pack(rows, pad_token_id).items()}


def rollout(
    model: torch.nn.Module,
    batch: dict[str, Any],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int = 0,
    generated_by: str = "student",
) -> dict[str, Any]:
    """`batch` with its completions replaced by `model`'s (see the module docstring); other tensor keys are dropped.

    The result carries [`GENERATED_KEY`] = `generated_by`.
    """
    prompt_ids, prompt_mask = split_prompts(batch, pad_token_id)
    seeds = row_seeds(prompt_ids, prompt_mask, seed, step)
    completion, keep = generate_completions(
        model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_p, seeds
    )
    return {**join_completions(prompt_ids, prompt_mask, completion, keep, pad_token_id), GENERATED_KEY: generated_by}


def check_generation_options(options: dict[str, Any], head: str, sharded: bool, has_teacher: bool) -> bool:
    """Whether the trainer generates completions (`on_policy_ratio` > 0 or `seq_kd`); raises when it cannot.

    Args:
        options (`dict`): The distillation options (see [`~hf_compress.distillation.config.distillation_options`]).
        head (`str`): The student's distilled head; generation needs `"causal_lm"`.
        sharded (`bool`): Whether FSDP or DeepSpeed shards the student (sharded generation is unverified).
        has_teacher (`bool`): Whether a live teacher exists (sequence-level KD generates with it).
    """
    if not (options["on_policy_ratio"] > 0 or options["seq_kd"]):
        return False
    if head != "causal_lm":
        raise ValueError(
            f"`on_policy_ratio` > 0 and `seq_kd` need a causal LM student, got head {head!r}; set "
            "`on_policy_ratio=0` and `seq_kd=False`."
        )
    if sharded:
        raise ValueError(
            "`on_policy_ratio` > 0 / `seq_kd` under FSDP or DeepSpeed (generation with sharded parameters) is "
            "unverified, got a sharded run; train with DDP until bench/verify_sharded_gpu.py passes on a GPU."
        )
    if options["seq_kd"] and not has_teacher:
        raise ValueError("`seq_kd`=True needs a live `teacher_model` to generate, got None (cached teacher outputs).")
    return True

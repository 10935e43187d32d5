"""Model cards for compressed models, rendered offline with ``huggingface_hub.ModelCard`` from a Jinja template.

The card's YAML metadata carries ``base_model``, ``datasets``, ``tags``, ``library_name`` and a ``model-index`` of
the measured metrics; its body has the teacher-vs-result table (from :mod:`hf_compress.reporting.measure`), the exact
loading code (plain ``AutoModel*.from_pretrained`` unless ``config.json`` records hf_compress structure or
quantisation), the recipe and the limitations that apply. A ``SentenceTransformer`` folder (``modules.json``) gets
sentence-transformers metadata, loading code and pair metrics (:mod:`hf_compress.reporting.sentence_card`).
Its "Training" section comes from :func:`~hf_compress.reporting.training_section.training_section`;
:mod:`hf_compress.reporting.card_callback` gathers those facts from the Trainer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import transformers
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_compress.loading import needs_loader
from hf_compress.models.heads import head_of
from hf_compress.models.hub_ids import hub_id
from hf_compress.models.sentence import is_sentence_transformer_folder, transformer_folder
from hf_compress.quantization.quantize import is_quantized
from hf_compress.reporting import sentence_card
from hf_compress.reporting.measure import format_table, metric_name, quality_metrics, summary_row
from hf_compress.shipped import shipped_path

TEMPLATE_PATH = shipped_path("model_cards", "default.md")
BASE_TAGS = ["distillation", "pruning", "hf-compress"]


def needs_hf_compress(config: Mapping) -> bool:
    """Whether a ``config.json`` dict records per-layer shapes or int8 modules, which plain transformers can't load."""
    return needs_loader(dict(config))


def card_base_model(*names: str | None) -> str | None:
    """The card's ``base_model``: the first of ``names`` that is a Hub repo id (a local folder has no page to link).

    Trainer cards pass the teacher's name then the student's; recipe cards pass the teacher's Hub id.

    >>> card_base_model("/no/such/teacher", None, "google-bert/bert-base-uncased")
    'google-bert/bert-base-uncased'
    """
    return next((name for name in names if hub_id(name)), None)


def load_code(repo_id: str, config: Mapping | None = None, onnx: bool = False) -> str:
    """The exact Python that loads ``repo_id`` given its ``config.json`` dict (and its ONNX graphs, with ``onnx``).

    >>> print(load_code("me/tiny", {"architectures": ["BertForMaskedLM"]}))
    from transformers import AutoModelForMaskedLM
    <BLANKLINE>
    model = AutoModelForMaskedLM.from_pretrained("me/tiny")
    """
    head = head_of((config or {}).get("architectures"))
    if config is not None and needs_hf_compress(config):
        code = (
            "import hf_compress\n\n"
            f'model = hf_compress.from_pretrained("{repo_id}")  # rebuilds the compressed layers from config.json'
        )
    else:
        code = f'from transformers import {head.auto_class}\n\nmodel = {head.auto_class}.from_pretrained("{repo_id}")'
    if not onnx:
        return code
    ort_class = head.auto_class.replace("AutoModel", "ORTModel")
    return (
        f"{code}\n\n# ONNX Runtime (onnx/model_quantized.onnx: int8 weights), no hf_compress needed\n"
        f"from optimum.onnxruntime import {ort_class}\n\n"
        f'model = {ort_class}.from_pretrained("{repo_id}", subfolder="onnx", file_name="model_quantized.onnx")\n\n'
        "# transformers.js (JavaScript):\n"
        f'# const pipe = await pipeline("{head.pipeline_task}", "{repo_id}", {{ dtype: "q8" }});'
    )


def _limitations(config: Mapping | None, report: Mapping | None, reports: list) -> list[str]:
    items = []
    if report and report.get("linear_sparsity", report.get("sparsity", 0)) > 0.05:
        items.append(
            "Unstructured sparsity is stored as explicit zeros: dense kernels run no faster and the "
            "safetensors file is no smaller; only structured pruning (removed heads, neurons, layers) "
            "shrinks and speeds up the model."
        )
    if (config and is_quantized(config)) or (report and report.get("quantized")):
        items.append(
            "Int8 weights target CPU inference (fbgemm/x86 dynamic int8 kernels); on GPU they are "
            "dequantised on the fly, and the folder needs `hf_compress` to load."
        )
    elif config and needs_hf_compress(config):
        items.append(
            "The layers have non-uniform shapes recorded in config.json, so loading needs `hf_compress`; "
            "its ONNX export (`hf-compress export`) runs in ONNX Runtime and transformers.js without it."
        )
    items.append(
        "A compressed student can lose more accuracy than the table shows on data unlike the evaluation "
        "set; re-evaluate on your own data."
    )
    if any(r and r.get("latency_ms") for r in reports):
        items.append(
            "Latency depends on the CPU, thread count and sequence length; the figures above are one "
            "machine's medians."
        )
    return items


def render_card(
    model_name: str,
    base_model: str | None = None,
    datasets: list[str] | str | None = None,
    report: Mapping | None = None,
    reference_report: Mapping | None = None,
    recipe: str | Mapping | None = None,
    config: Mapping | None = None,
    repo_id: str | None = None,
    methods: list[str] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    template_path: str | Path | None = None,
    training: str | None = None,
    reference_name: str | None = None,
    tags: list[str] | None = None,
    onnx: bool = False,
    sentence_transformers: bool = False,
) -> ModelCard:
    """Render the model card of a compressed model (offline).

    Args:
        model_name (`str`): title of the card and ``model-index`` name.
        base_model (`str`, *optional*): Hub id of the teacher / original model.
        datasets (`list[str]`, *optional*): datasets used for distillation and evaluation (the first one names the
            ``model-index`` results).
        report (`dict`, *optional*): :func:`hf_compress.reporting.measure.model_report` of the compressed model.
        reference_report (`dict`, *optional*): the same for the teacher; adds ratios and retention % to the table.
        recipe (`str` or `dict`, *optional*): the recipe as YAML text (or a dict, dumped to YAML).
        config (`dict`, *optional*): the saved ``config.json``; picks the loading code and the pipeline tag.
        repo_id (`str`, *optional*): id used in the loading code; defaults to ``model_name``.
        methods (`list[str]`, *optional*): extra tags, e.g. ``["quantization"]`` (added automatically for int8).
        language, license (`str`, *optional*): card metadata.
        template_path (`str` or `Path`, *optional*): a Jinja template; defaults to the packaged ``default.md``.
        training (`str`, *optional*): Markdown of the "Training" section, e.g. from :func:`training_section`.
        reference_name (`str`, *optional*): table label of ``reference_report``; defaults to
            ``"<base_model> (reference)"``.
        tags (`list[str]`, *optional*): the methods used, defaults to ``["distillation", "pruning"]``;
            ``"hf-compress"`` is always added.
        onnx (`bool`, *optional*, defaults to `False`): the folder has `onnx/model.onnx` (an `hf-compress export`
            folder): the card also shows how to load it with optimum's ONNX Runtime classes and transformers.js.
        sentence_transformers (`bool`, *optional*, defaults to `False`): the model is a ``SentenceTransformer`` folder
            (``config`` is its transformer's): sentence-transformers metadata and loading code, and only the pair
            metrics (accuracy, average precision, F1) and the loss in the table.

    Example:

    >>> import torch
    >>> from hf_compress.reporting.cards import render_card
    >>> from hf_compress.reporting.measure import model_report
    >>> report = model_report(torch.nn.Linear(4, 2), batch_sizes=())
    >>> card = render_card("bert-tiny-sst2", base_model="google-bert/bert-base-uncased", datasets=["glue"],
    ...                    report=report)
    >>> card.data.base_model, card.data.tags
    ('google-bert/bert-base-uncased', ['distillation', 'pruning', 'hf-compress'])
    >>> card.save("out/README.md")  # doctest: +SKIP
    """
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError(f"`model_name` must be a non-empty string, got {model_name!r}.")
    for name, value in (("report", report), ("reference_report", reference_report), ("config", config)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"`{name}` must be a dict, got {type(value).__name__}.")
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    quantized = bool((config and is_quantized(config)) or (report and report.get("quantized")))
    tags = list(dict.fromkeys([*(BASE_TAGS if tags is None else tags), "hf-compress", *(methods or [])]))
    if quantized and "quantization" not in tags:
        tags.append("quantization")
    head = head_of((config or {}).get("architectures"))
    auto_class, task_type, library = head.auto_class, head.pipeline_task, "transformers"
    if sentence_transformers:
        tags = list(dict.fromkeys([*sentence_card.TAGS, *tags]))
        task_type, library = sentence_card.PIPELINE_TAG, sentence_card.LIBRARY_NAME
        report, reference_report = (
            None if r is None else {**r, "metrics": sentence_card.sentence_metrics(r.get("metrics"))}
            for r in (report, reference_report)
        )
    metrics = quality_metrics((report or {}).get("metrics"))
    eval_results = None
    if metrics and datasets:
        eval_results = [
            EvalResult(
                task_type=task_type,
                dataset_type=datasets[0],
                dataset_name=datasets[0],
                metric_type=metric_name(key),
                metric_name=metric_name(key),
                metric_value=round(value, 6),
            )
            for key, value in metrics.items()
        ]
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=datasets or None,
        tags=tags,
        library_name=library,
        pipeline_tag=task_type,
        language=language,
        license=license,
        eval_results=eval_results,
    )
    rows = []
    if reference_report is not None:
        rows.append(summary_row(reference_name or f"{base_model or 'reference'} (reference)", reference_report))
    if report is not None:
        rows.append(summary_row(model_name, report, reference=reference_report))
    setup = (report or reference_report or {}).get("latency_setup", {})
    on_disk = any("disk_bytes" in r for r in (report, reference_report) if r)
    note = (
        "Sizes are bytes on disk (safetensors + config) when saved, else in memory. "
        if on_disk
        else "Sizes are the bytes of the weights in memory. "
    )
    if setup:
        note += (
            f"Latency: median of {setup.get('repeats')} runs on {setup.get('device')} "
            f"({setup.get('cpu')}), threads: {setup.get('threads')}."
        )
    else:
        note += "Latency was not measured."
    if isinstance(recipe, Mapping):
        recipe = yaml.safe_dump(dict(recipe), sort_keys=False)
    methods_text = ", ".join(t for t in tags if t not in ("hf-compress", *sentence_card.TAGS))
    summary = f"A compressed `{auto_class}` model made with hf_compress."
    code = load_code(repo_id or model_name, config, onnx=onnx)
    if sentence_transformers:
        inner = ((config or {}).get("architectures") or ["transformers"])[0]
        summary = (
            f"A compressed sentence-transformers model (a `SentenceTransformer` around a `{inner}`) made with "
            "hf_compress: it maps sentences to embeddings for semantic similarity."
        )
        plain = not (quantized or (config and needs_hf_compress(config)))
        code = sentence_card.sentence_load_code(repo_id or model_name, plain=plain, onnx=onnx)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        model_name=model_name,
        summary=summary,
        methods=methods_text,
        table=format_table(rows, markdown=True) if rows else "",
        measurement_note=note,
        load_code=code,
        recipe=(recipe or "").strip(),
        training=(training or "").strip(),
        limitations=_limitations(config, report, [report, reference_report]),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__.split("+")[0],
    )


def write_card(folder: str | Path, model_name: str | None = None, **kwargs) -> ModelCard:
    """Render the card for a saved model folder (reading its ``config.json``) and write ``folder/README.md``.

    A sentence-transformers folder (one with ``modules.json``) gets a sentence-transformers card, with the config of
    its transformer module.

    Args:
        folder (`str` or `Path`): the saved model folder.
        model_name (`str`, *optional*): defaults to the folder name.
        kwargs: forwarded to :func:`render_card` (``base_model``, ``datasets``, ``report``, ...).

    Example:

    >>> from hf_compress.reporting.cards import write_card
    >>> write_card("out/student", base_model="bert-base-uncased", datasets=["glue"])  # doctest: +SKIP
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"`folder` must be an existing model folder, got {str(folder)!r}.")
    sentence = is_sentence_transformer_folder(folder)
    kwargs.setdefault("sentence_transformers", sentence)
    config_file = (transformer_folder(folder) if sentence else folder) / "config.json"
    if "config" not in kwargs and config_file.is_file():
        kwargs["config"] = json.loads(config_file.read_text())
    kwargs.setdefault("onnx", (folder / "onnx" / "model.onnx").is_file())  # an `hf-compress export` folder
    card = render_card(model_name or folder.resolve().name, **kwargs)
    card.save(folder / "README.md")
    return card

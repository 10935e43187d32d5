"""`hf-compress push`: uploads through `huggingface_hub.HfApi` (faked here, no network), with the ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hf_compress.reporting.hub
from hf_compress.cli import main
from tests.tiny_models import tiny_model, tiny_tokenizer


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        FakeApi.calls.append(("create_repo", repo_id, private))
        if repo_id.endswith("boom"):
            raise OSError(f"403 Forbidden for token {FakeApi.calls[0][1]}")
        return type("Url", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        sent = hf_compress.reporting.hub.files_to_upload(folder_path, kwargs["ignore_patterns"])
        prefix = kwargs.get("path_in_repo")
        sent = [f"{prefix}/{name}" for name in sent] if prefix else sent
        FakeApi.calls.append(("upload_folder", repo_id, Path(folder_path).name, sent))


def carded_student(out: Path) -> Path:
    """A finished `distill` stage folder with a model card, as `push` finds it."""
    folder = out / "student"
    tiny_model("bert", "seq_cls", num_labels=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# card\n")
    (folder / "report.json").write_text(json.dumps({"name": "student", "type": "distill", "status": "done"}))
    return folder


def test_push_goes_through_hub_without_network_and_never_prints_the_token(tmp_path, capsys, monkeypatch):
    folder = carded_student(tmp_path / "out")
    monkeypatch.setattr(hf_compress.reporting.hub, "HfApi", FakeApi)
    FakeApi.calls = []
    secret = "hf_SECRETtoken123"
    assert main(["push", str(tmp_path / "out"), "me/tiny-student", "--private", "--token", secret]) == 0
    captured = capsys.readouterr()
    assert FakeApi.calls[0] == ("init", secret) and FakeApi.calls[1] == ("create_repo", "me/tiny-student", True)
    assert FakeApi.calls[2][:3] == ("upload_folder", "me/tiny-student", "student")
    assert "README.md" in FakeApi.calls[2][3]
    assert "https://huggingface.co/me/tiny-student" in captured.out
    assert secret not in captured.out + captured.err

    FakeApi.calls = []
    assert main(["push", str(folder), "me/boom", "--token", secret]) == 1  # a Hub failure, not a user error
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == "error: 403 Forbidden for token ***"
    assert secret not in captured.out + captured.err


def test_push_uploads_the_onnx_export_unless_no_onnx(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    carded_student(out)
    (out / "export" / "onnx").mkdir(parents=True)  # an `export_onnx` stage of the run
    (out / "export" / "onnx" / "model.onnx").write_bytes(b"graph")
    (out / "export" / "report.json").write_text(json.dumps({"name": "export", "type": "export_onnx"}))
    monkeypatch.setattr(hf_compress.reporting.hub, "HfApi", FakeApi)
    FakeApi.calls = []
    assert main(["push", str(out), "me/tiny"]) == 0
    uploads = [call for call in FakeApi.calls if call[0] == "upload_folder"]
    assert [call[2] for call in uploads] == ["student", "onnx"]
    assert uploads[1][3] == ["onnx/model.onnx"] and "model.safetensors" in uploads[0][3]
    assert "with its ONNX export" in capsys.readouterr().out

    FakeApi.calls = []
    assert main(["push", str(out), "me/tiny", "--no-onnx"]) == 0
    assert [call[2] for call in FakeApi.calls if call[0] == "upload_folder"] == ["student"]

    own = carded_student(tmp_path / "alone")  # `hf-compress export` writes onnx/ into the model folder itself
    (own / "onnx").mkdir()
    (own / "onnx" / "model_quantized.onnx").write_bytes(b"graph")
    for flag, expected in (([], True), (["--no-onnx"], False)):
        FakeApi.calls = []
        assert main(["push", str(own), "me/tiny", *flag]) == 0
        uploads = [call for call in FakeApi.calls if call[0] == "upload_folder"]
        assert len(uploads) == 1 and ("onnx/model_quantized.onnx" in uploads[0][3]) is expected
    with pytest.raises(FileNotFoundError, match="not a folder of .onnx graphs"):
        hf_compress.reporting.hub.push_folder(own, "me/tiny", verify=False, onnx=tmp_path / "nowhere")

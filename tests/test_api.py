"""The top-level calls on a SentenceTransformer: make_student, prune_vocabulary, quantize_model, save / from_pretrained
(and that plain transformers models still go to the functions of their home modules)."""

import pytest
import torch

pytest.importorskip("sentence_transformers")

from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

import hf_compress  # noqa: E402
from hf_compress.integrations import sentence_transformers as st_integration  # noqa: E402
from hf_compress.integrations.sentence_transformers import is_sentence_transformer  # noqa: E402
from hf_compress.models.families import get_layers  # noqa: E402
from tests.tiny_models import VOCAB, tiny_model, tiny_sentence_transformer, tiny_tokenizer  # noqa: E402

TEXTS = [" ".join(f"w{(5 * i + 2 * j) % 40 + 3}" for j in range(3 + i % 3)) for i in range(12)]


def _embed(model):
    return model.encode(TEXTS, convert_to_tensor=True, batch_size=4)


def test_make_student_on_a_sentence_transformer(tmp_path):
    teacher = tiny_sentence_transformer(tmp_path / "teacher")
    student = hf_compress.make_student(teacher, num_layers=2)
    assert isinstance(student, SentenceTransformer) and isinstance(student[1], Pooling)
    assert len(get_layers(student)) == 2 and len(get_layers(teacher)) == 4
    assert student[0].auto_model.config.hf_compress["teacher_layers"] == [0, 3]
    plain = hf_compress.make_student(tiny_model("bert"), num_layers=1)  # a transformers model: unchanged path
    assert not is_sentence_transformer(plain) and plain.config.num_hidden_layers == 1


def test_prune_vocabulary_on_a_sentence_transformer(tmp_path):
    model = tiny_sentence_transformer(tmp_path / "base")
    before = _embed(model)
    same, tokenizer, report = hf_compress.prune_vocabulary(model, None, TEXTS)
    assert same is model and model.tokenizer is tokenizer
    assert report.kept_vocab_size < VOCAB == report.original_vocab_size
    assert model[0].auto_model.get_input_embeddings().num_embeddings == report.kept_vocab_size
    torch.testing.assert_close(_embed(model), before)
    with pytest.raises(ValueError, match="`tokenizer` must be None or the SentenceTransformer's own"):
        hf_compress.prune_vocabulary(model, tiny_tokenizer(), TEXTS)


def test_quantize_model_save_and_from_pretrained_on_a_sentence_transformer(tmp_path):
    model = tiny_sentence_transformer(tmp_path / "base")
    before = _embed(model)
    assert hf_compress.quantize_model(model) is model
    assert type(model[0].auto_model.encoder.layer[0].attention.self.query).__name__ == "Int8Linear"
    after = _embed(model)
    assert torch.nn.functional.cosine_similarity(after, before).min() > 0.98
    hf_compress.save_pretrained(model, tmp_path / "int8")
    assert (tmp_path / "int8" / "modules.json").is_file()
    reloaded = hf_compress.from_pretrained(tmp_path / "int8", device="cpu")
    assert isinstance(reloaded, SentenceTransformer) and isinstance(reloaded[1], Pooling)
    assert type(reloaded[0].auto_model.encoder.layer[0].attention.self.query).__name__ == "Int8Linear"
    torch.testing.assert_close(_embed(reloaded), after)
    with pytest.raises(ValueError, match="apply to transformers models only"):
        hf_compress.save_pretrained(model, tmp_path / "again", max_shard_size="1GB")


def test_from_pretrained_of_a_pruned_sentence_transformer_folder_gives_equal_embeddings(tmp_path):
    teacher = tiny_sentence_transformer(tmp_path / "teacher")
    student = hf_compress.make_student(teacher, layers=[1, 2])
    student.eval()
    expected = _embed(student)
    hf_compress.save_pretrained(student, tmp_path / "student")
    reloaded = hf_compress.from_pretrained(str(tmp_path / "student"), device="cpu")
    assert isinstance(reloaded, SentenceTransformer) and len(get_layers(reloaded)) == 2
    torch.testing.assert_close(_embed(reloaded), expected)
    # the transformers folder inside (config.json at its root) still loads as a transformers model
    tiny_model("bert").save_pretrained(tmp_path / "plain")
    assert type(hf_compress.from_pretrained(tmp_path / "plain")).__name__ == "BertModel"


def test_from_pretrained_of_a_hub_repo_id_of_a_sentence_transformer(tmp_path, monkeypatch):
    """A Hub repo with modules.json (the downloads faked by local folders) gives a SentenceTransformer; a repo
    without one, or one the Hub cannot be asked about, goes to the transformers loader."""
    student = hf_compress.make_student(tiny_sentence_transformer(tmp_path / "teacher"), layers=[0, 3])
    student.eval()
    hf_compress.save_pretrained(student, tmp_path / "st_snapshot")
    tiny_model("bert").save_pretrained(tmp_path / "bert_snapshot")
    repos = {"me/tiny-st": tmp_path / "st_snapshot", "me/tiny-bert": tmp_path / "bert_snapshot"}
    downloads = []

    def hf_hub_download(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename, kwargs))
        if repo_id == "me/offline":
            raise LocalEntryNotFoundError("outgoing traffic has been disabled")
        if not (repos[repo_id] / filename).is_file():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(repos[repo_id] / filename)

    monkeypatch.setattr(st_integration, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(st_integration, "snapshot_download", lambda repo_id, **kwargs: str(repos[repo_id]))
    loaded = hf_compress.from_pretrained("me/tiny-st", revision="main", device="cpu")
    assert downloads == [("me/tiny-st", "modules.json", {"revision": "main"})]
    assert isinstance(loaded, SentenceTransformer) and len(get_layers(loaded)) == 2
    torch.testing.assert_close(_embed(loaded), _embed(student))
    assert st_integration.sentence_transformer_folder("me/tiny-bert") is None
    assert st_integration.sentence_transformer_folder("me/offline") is None
    assert st_integration.sentence_transformer_folder(tmp_path / "st_snapshot") == tmp_path / "st_snapshot"
    assert st_integration.sentence_transformer_folder(tmp_path / "bert_snapshot") is None
    assert [d[0] for d in downloads] == ["me/tiny-st", "me/tiny-bert", "me/offline"]  # local folders: no Hub call

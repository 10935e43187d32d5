import pytest

from hf_compress.models.hub_ids import hub_id, is_repo_id


@pytest.mark.parametrize("name", ["bert-base-uncased", "org/model", "me/tiny-int8.v2"])
def test_repo_ids(name):
    assert is_repo_id(name) and hub_id(name) == name


@pytest.mark.parametrize("name", ["has space/model", "a/b/c", "", "-bad/--name--", None, 3])
def test_not_repo_ids(name):
    assert not is_repo_id(name) and hub_id(name) is None


def test_local_paths_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert is_repo_id("org/model") and hub_id("org/model") is None  # an existing folder wins
    assert hub_id("./model") is None and hub_id("~/model") is None and hub_id(str(tmp_path / "x")) is None

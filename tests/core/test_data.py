import json

import pytest

from hfsqueeze import RecipeError
from hfsqueeze.core.data import builtin_text, load_texts, token_blocks


def test_builtin_splits_are_disjoint_real_english():
    train, held_out = builtin_text("train"), builtin_text("eval")
    assert len(held_out) > 20_000 and len(train) > 8 * len(held_out)
    assert "the" in held_out.split() and held_out[:2000] not in train
    with pytest.raises(ValueError, match="split must be"):
        builtin_text("test")


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, a plain text file")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(3)))
    (tmp_path / "c.json").write_text(json.dumps([{"body": "x y z"}]))
    (tmp_path / "d.csv").write_text("text,label\nfirst row,0\nsecond row,1\n")
    assert load_texts(tmp_path / "a.txt") == ["hello world, a plain text file"]
    assert load_texts(str(tmp_path / "b.jsonl")) == ["row 0", "row 1", "row 2"]
    assert load_texts(tmp_path / "c.json", column="body") == ["x y z"]
    assert load_texts(tmp_path / "d.csv") == ["first row", "second row"]
    with pytest.raises(RecipeError, match="no text under key 'text'"):
        load_texts(tmp_path / "c.json")
    with pytest.raises(RecipeError, match="text file not found"):
        load_texts(str(tmp_path / "missing.txt"))


def test_datasets_object():
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["one doc", "two doc"], "label": [0, 1]})
    assert load_texts(ds) == ["one doc", "two doc"]


def test_token_blocks(tiny_tokenizer):
    blocks = token_blocks(tiny_tokenizer, [builtin_text("eval")], max_tokens=1000, seq_len=128)
    assert blocks.shape == (7, 128)
    short = token_blocks(tiny_tokenizer, ["just a few words"], max_tokens=1000, seq_len=128)
    assert short.shape[0] == 1 and short.shape[1] < 128
    with pytest.raises(RecipeError, match="fewer than 2 tokens"):
        token_blocks(tiny_tokenizer, [""], max_tokens=10, seq_len=4)

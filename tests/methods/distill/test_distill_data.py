"""Distillation data: texts, splits, multi-task mixing."""

from __future__ import annotations

import json

import pytest

from hfsqueeze.core.context import CompressionContext
from hfsqueeze.core.errors import RecipeError
from hfsqueeze.methods.distill import DistillConfig
from hfsqueeze.methods.distill.data import MixedDataset, build_tasks
from distillkit import FAST, stage
from distillkit import _one_thread  # noqa: F401  (autouse: one torch thread per module)




# ---- data ---------------------------------------------------------------------------------------------------------


def test_builtin_heldout_split_is_never_trained_on(tiny_tokenizer):
    (task,) = build_tasks(stage().tasks, tiny_tokenizer, 64)
    train = {tuple(e["input_ids"]) for e in task.train}
    assert task.eval and not any(tuple(e["input_ids"]) in train for e in task.eval)
    assert all(len(e["input_ids"]) == 64 for e in task.train)
    assert task.train_tokens() <= FAST["max_tokens"]


@pytest.mark.parametrize("suffix", ["txt", "jsonl", "csv", "parquet"])
def test_local_text_files_hold_out_documents(tmp_path, tiny_tokenizer, suffix):
    from hfsqueeze.core.data import builtin_text

    docs = [p for p in builtin_text("train").split("\n\n") if len(p) > 200][:40]
    path = tmp_path / f"docs.{suffix}"
    if suffix == "txt":
        path.write_text("\n\n".join(docs))
    elif suffix == "jsonl":
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    else:
        import pandas as pd

        frame = pd.DataFrame({"text": docs})
        frame.to_csv(path, index=False) if suffix == "csv" else frame.to_parquet(path)
    cfg = DistillConfig.from_dict({"data": {"text": str(path), "eval_fraction": 0.25}})
    (task,) = build_tasks(cfg.tasks, tiny_tokenizer, 32)
    train = {tuple(e["input_ids"]) for e in task.train}
    assert task.train and task.eval and not any(tuple(e["input_ids"]) in train for e in task.eval)
    if suffix != "txt":  # 40 documents, every 4th held out
        held_text = tiny_tokenizer.decode(task.eval[0]["input_ids"])
        assert held_text[:20] in "\n".join(docs[3::4])


def test_datasets_objects_by_name_and_as_calibration(tiny_tokenizer):
    from datasets import Dataset

    from hfsqueeze.core.data import builtin_text

    paragraphs = [p for p in builtin_text("train").split("\n\n") if len(p) > 100][:30]
    text = Dataset.from_dict({"text": paragraphs})
    labelled = Dataset.from_dict({"text": [f"item {i}" for i in range(20)], "label": [i % 3 for i in range(20)]})
    ctx = CompressionContext(tokenizer=tiny_tokenizer, calibration=text, extras={"datasets": {"topics": labelled}})
    cfg = DistillConfig.from_dict({"data": [{"text": "calibration"},
                                            {"text": "topics", "task": "sequence_classification"}]})
    lm, cls = build_tasks(cfg.tasks, tiny_tokenizer, 32, ctx)
    assert lm.kind == "causal_lm" and lm.train and lm.eval
    assert cls.label_names == ["0", "1", "2"] and len(cls.eval) == 2 and len(cls.train) == 18
    with pytest.raises(RecipeError, match="needs columns 'text' and 'label'; found: text"):
        build_tasks(DistillConfig.from_dict({"data": {"text": "calibration", "task": "sequence_classification"}})
                    .tasks, tiny_tokenizer, 32, ctx)


def test_mixed_dataset_samples_tasks_by_weight(tiny_tokenizer, tmp_path):
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"sample {i}", "label": ["neg", "pos"][i % 2]})
                              for i in range(40)))
    cfg = DistillConfig.from_dict({"data": [
        {"text": "builtin", "weight": 3.0, **FAST}, {"text": str(path), "task": "sequence_classification"},
    ]})
    tasks = build_tasks(cfg.tasks, tiny_tokenizer, 32)
    assert tasks[1].label_names == ["neg", "pos"] and len(tasks[1].eval) == 4
    ds = MixedDataset(tasks, num_examples=2000, seed=0)
    share = sum(e["task_id"] == 0 for e in ds.examples) / len(ds)
    assert 0.70 < share < 0.80

"""The distill stage: losses by hand, configs, students, data splits, multi-task, QLoRA, recovery, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from hfsqueeze.core.context import CompressionContext
from hfsqueeze.core.errors import RecipeError
from hfsqueeze.core.hf import frozen_copy
from hfsqueeze.methods.distill import DistillConfig, expand_recovery, losses
from hfsqueeze.methods.distill.apply import apply_distill
from hfsqueeze.methods.distill.data import MixedDataset, build_tasks
from hfsqueeze.methods.distill.trainer import DistillationTrainer, DistillSpec
from hfsqueeze.recipe import Recipe

warnings.filterwarnings("ignore", category=DeprecationWarning)
REPO = Path(__file__).resolve().parent.parent
SMALL_EVAL = {"max_tokens": 256, "seq_len": 128, "latency": False, "disk_size": False}
FAST = {"max_tokens": 12_000, "eval_tokens": 1024}


def tiny_llama(layers: int = 4, **overrides) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True, **overrides,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def stage(**kwargs: Any) -> DistillConfig:
    base = {"block_size": 64, "data": {"text": "builtin", **FAST},
            "training_args": {"max_steps": 6, "learning_rate": 2e-3, "per_device_train_batch_size": 4}}
    for key, value in kwargs.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return DistillConfig.from_dict(base)


def context(model, tokenizer, **kwargs: Any) -> CompressionContext:
    return CompressionContext(tokenizer=tokenizer, original=frozen_copy(model), stage_index=1, **kwargs)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 33, 80, 120, 7, 9, 250]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them ~4x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- losses, checked against values computed by hand ---------------------------------------------------------------


def test_kd_loss_matches_hand_computed_kl_with_temperature_scaling():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2).
    expected_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    # float32, computed as cross-entropy minus the teacher's entropy: the difference of two numbers near 0.6 keeps
    # ~1e-7 absolute, and exp/log kernels differ between CPUs (AVX512 or not), so the bound is absolute.
    assert losses.kd_loss(student, teacher, 1.0).item() == pytest.approx(expected_t1, rel=1e-5, abs=1e-6)
    # T = 2: teacher logits halve, p_t = (sqrt3, 1) / (sqrt3 + 1); the KL is scaled by T^2 = 4.
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    expected_t2 = 4 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert losses.kd_loss(student, teacher, 2.0).item() == pytest.approx(expected_t2, rel=1e-5, abs=1e-6)
    assert losses.kd_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_mask_averages_only_counted_positions():
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0], [5.0, -5.0]]])
    first_only = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert losses.kd_loss(student, teacher, 1.0, torch.tensor([[1, 0]])).item() == pytest.approx(first_only, abs=1e-6)
    assert losses.kd_loss(student, teacher, 1.0).item() == pytest.approx(first_only / 2, abs=1e-6)
    with pytest.raises(ValueError, match="vocabularies"):
        losses.kd_loss(student, teacher[..., :1])


def test_a_logged_hard_loss_works_a_sequence_at_a_time_with_the_same_value(monkeypatch):
    # With alpha 1 the hard loss is only logged: no vocabulary-sized copy of the whole batch's logits (and its
    # log-softmax) beside the logits, which were the peak of a recovery step; the value is the batched one exactly.
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits, ids = torch.randn(3, 20, 50), torch.randint(0, 50, (3, 20))
    mask = torch.ones(3, 20)
    mask[1, 12:] = 0
    targets = ids[:, 1:]
    batched = losses._masked_mean(F.cross_entropy(logits[:, :-1].reshape(-1, 50), targets.reshape(-1),
                                                  reduction="none").view_as(targets), mask[:, 1:])
    rows, real = [], F.cross_entropy
    monkeypatch.setattr(losses.F, "cross_entropy", lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k))
    with torch.no_grad():
        logged = losses.causal_lm_loss(logits, ids, mask)
    assert torch.equal(logged, batched) and rows and max(rows) == 19


def test_causal_lm_loss_equals_transformers_loss():
    model = tiny_llama(2)
    with torch.no_grad():
        out = model(input_ids=IDS, labels=IDS)
    assert losses.causal_lm_loss(out.logits, IDS).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_hidden_state_and_attention_losses_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[0.0, 1.0], [0.0, 2.0]]])
    # MSE over the width: position 0 -> (1 + 1) / 2 = 1, position 1 -> 0; mean 0.5.
    assert losses.hidden_state_loss([s], [t]).item() == pytest.approx(0.5)
    assert losses.hidden_state_loss([s], [t], mask=torch.tensor([[0, 1]])).item() == pytest.approx(0.0)
    # cosine: orthogonal -> 1, parallel -> 0.
    assert losses.hidden_state_loss([s], [t], kind="cosine").item() == pytest.approx(0.5)
    double = torch.nn.Linear(2, 2, bias=False)
    double.weight.data = torch.eye(2) * 2
    assert losses.hidden_state_loss([s / 2], [s], [double]).item() == pytest.approx(0.0)
    # attention: one head, rows (1/2, 1/2) vs teacher (1, 0) -> KL = log 2 on the first query; causal row 2 equal.
    s_att = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    t_att = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    assert losses.attention_loss([s_att], [t_att]).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    # head averaging: a 2-head teacher whose mean equals the 1-head student gives 0.
    t_two = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]])
    assert losses.attention_loss([s_att], [t_two]).item() == pytest.approx(0.0, abs=1e-6)


def test_combine_losses_weights():
    kd, hard = torch.tensor(2.0), torch.tensor(4.0)
    assert losses.combine_losses(alpha=0.25, hard=hard, kd=kd).item() == pytest.approx(0.25 * 2 + 0.75 * 4)
    assert losses.combine_losses(alpha=0.25, hard=None, kd=kd).item() == pytest.approx(2.0)
    assert losses.combine_losses(alpha=0.25, hard=hard, kd=None).item() == pytest.approx(4.0)


# ---- config -------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_defaults():
    cfg = DistillConfig.from_dict({
        "teacher": "previous", "student": {"keep": 0.5}, "hidden_states": {"weight": 0.1, "layer_map": [1, 3]},
        "data": [{"text": "builtin"}, {"text": "x.jsonl", "task": "sequence_classification", "weight": 0.5}],
        "training_args": {"max_steps": 3},
    })
    again = Recipe.load({"stages": [cfg.to_dict()]}).stages[0]
    assert again.to_dict() == cfg.to_dict()
    assert again.snapshot_needed() == "previous"
    assert DistillConfig().snapshot_needed() == "original"
    assert DistillConfig(teacher="some/model").snapshot_needed() is None
    assert [t.task for t in again.tasks] == ["causal_lm", "sequence_classification"]


@pytest.mark.parametrize("bad, message", [
    ({"alpha": 1.5}, "key 'alpha': got 1.5; must be between 0 and 1"),
    ({"temperature": 0}, "key 'temperature': got 0.0; must be > 0"),
    ({"training_args": {"max_step": 3}}, "unknown TrainingArguments field 'max_step'; similar: .*max_steps"),
    ({"training_args": {"output_dir": "x"}}, "'output_dir' is set by the stage"),
    ({"student": {"layers": [0], "keep": 2}}, "give exactly one of 'layers', 'keep' or 'config'"),
    ({"student": {"keep": 1.5}}, "key 'keep': got 1.5"),
    ({"data": {"task": "mlm"}}, "key 'data': key 'task': got 'mlm'; allowed: 'causal_lm' | 'sequence_classification'"),
    ({"data": [{"weight": 0}]}, r"key 'data\[0\]': key 'weight': got 0.0; must be > 0"),
    ({"tempreature": 2}, r"unknown key 'tempreature' \(did you mean 'temperature'\?\); allowed keys: .*temperature"),
])
def test_config_errors_name_key_value_and_allowed(bad, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.load({"stages": [{"method": "distill", **bad}]})


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


# ---- the stage on tiny models -------------------------------------------------------------------------------------


def test_teacher_is_frozen_and_outside_the_optimizer(tiny_tokenizer, tmp_path):
    student, teacher = tiny_llama(2), tiny_llama(4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    (task,) = build_tasks(stage().tasks, tiny_tokenizer, 32)
    from hfsqueeze.methods.distill.data import Collator

    trainer = DistillationTrainer(
        model=student, teacher=teacher, spec=DistillSpec(temperature=2.0, alpha=0.5),
        args=tf.TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                                  remove_unused_columns=False, use_cpu=True, learning_rate=1e-3),
        train_dataset=MixedDataset([task]), data_collator=Collator(1),
    )
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not teacher_ids & optimized
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert len(trainer.component_log) == 3 and {"kd", "hard", "loss"} <= set(trainer.component_log[0])


def test_hard_loss_only_skips_the_teacher_and_frozen_embeddings_stay(tiny_tokenizer, tmp_path):
    student, teacher = tiny_llama(2), tiny_llama(4)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    (task,) = build_tasks(stage().tasks, tiny_tokenizer, 32)
    from hfsqueeze.methods.distill.data import Collator

    trainer = DistillationTrainer(
        model=student, teacher=teacher, spec=DistillSpec(alpha=0.0),
        args=tf.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                                  remove_unused_columns=False, use_cpu=True),
        train_dataset=MixedDataset([task]), data_collator=Collator(1),
    )
    trainer.train()
    assert calls == [] and "kd" not in trainer.component_log[0]

    model = tiny_llama(2)
    embed = model.get_input_embeddings().weight.detach().clone()
    d = apply_distill(model, stage(freeze_embeddings=True, training_args={"max_steps": 2, "bf16": True}),
                      context(model, tiny_tokenizer))
    # bf16 autocast was on for training only: the model runs fp32 again afterwards.
    assert "_original_forward" not in model.__dict__
    plain = tiny_llama(2)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(logits(model, IDS), logits(plain, IDS)) and d["steps"] == 2
    assert d["trainable_parameters"] == sum(p.numel() for p in model.parameters()) - embed.numel()
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert model.get_input_embeddings().weight.requires_grad  # flags restored after training


def test_layer_subset_student_learns_from_teacher_and_reloads(tiny_tokenizer, tmp_path):
    model = tiny_llama(4)
    ctx = context(model, tiny_tokenizer)
    d = apply_distill(model, stage(student={"layers": [0, 3]}, hidden_states={"weight": 0.1},
                                   attentions={"weight": 0.1}), ctx)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert d["student"]["source_layers"] == [0, 3]
    assert d["student"]["parameters_after"] < d["student"]["parameters_before"]
    assert d["steps"] == 6 and d["tokens_seen"] == 6 * 4 * 64 and d["world_size"] == 1
    assert d["perplexity_after"] < d["perplexity_before"]
    assert len(d["loss_curve"]) == 6 and Path(d["artifacts"][0]).read_bytes()[:4] == b"\x89PNG"
    assert not hasattr(model, "hfsqueeze_distill") and not model.training
    assert model.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)
    model.save_pretrained(tmp_path / "student")
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    torch.testing.assert_close(logits(again, IDS), logits(model, IDS))


def test_keep_fraction_and_student_from_config(tiny_tokenizer):
    model = tiny_llama(4)
    d = apply_distill(model, stage(student={"keep": 0.5}), context(model, tiny_tokenizer))
    assert d["student"]["source_layers"] == [0, 3]

    model = tiny_llama(4)
    ctx = context(model, tiny_tokenizer)
    d = apply_distill(model, stage(student={"config": {"num_hidden_layers": 2, "intermediate_size": 64}},
                                   hidden_states={"weight": 0.5}), ctx)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 64
    assert model.model.layers[0].mlp.up_proj.out_features == 64
    # Attention weights matched by name and shape, so layer 1 of the student starts as layer 3 of the teacher.
    assert d["student"]["source_layers"] == [0, 3]
    assert d["perplexity_after"] < d["perplexity_before"]
    with pytest.raises(RecipeError, match="not fields of LlamaConfig"):
        apply_distill(tiny_llama(2), stage(student={"config": {"num_hiden_layers": 1}}),
                      context(tiny_llama(2), tiny_tokenizer))


def test_hidden_width_projection_for_a_narrower_student(tiny_tokenizer):
    model = tiny_llama(2)
    ctx = context(model, tiny_tokenizer)
    cfg = stage(student={"config": {"hidden_size": 32, "head_dim": 8, "intermediate_size": 64}},
                hidden_states={"weight": 1.0})
    d = apply_distill(model, cfg, ctx)
    assert model.config.hidden_size == 32 and d["steps"] == 6
    assert not any("hfsqueeze_distill" in k for k in model.state_dict())


def test_teacher_from_a_path(tiny_tokenizer, tmp_path):
    teacher = tiny_llama(4, initializer_range=0.1)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    cfg = stage(teacher=str(tmp_path / "teacher"), student={"layers": [0, 1]})
    assert cfg.snapshot_needed() is None
    model = tiny_llama(4)
    d = apply_distill(model, cfg, CompressionContext(tokenizer=tiny_tokenizer, stage_index=1))
    assert d["teacher"] == str(tmp_path / "teacher") and d["steps"] == 6
    from hfsqueeze.methods.distill.trainer import lm_perplexity

    (task,) = build_tasks(cfg.tasks, tiny_tokenizer, cfg.block_size)
    assert d["teacher_perplexity"] == pytest.approx(lm_perplexity(teacher, task.eval, pad_id=1), abs=1e-3)


def test_errors_are_clear(tiny_tokenizer):
    model = tiny_llama(2)
    with pytest.raises(RecipeError, match="'original' needs the frozen copy that hfsqueeze.compress makes"):
        apply_distill(model, stage(), CompressionContext(tokenizer=tiny_tokenizer))
    with pytest.raises(RecipeError, match="needs a tokenizer"):
        apply_distill(model, stage(), CompressionContext(original=frozen_copy(model)))
    ctx = context(model, tiny_tokenizer)
    ctx.original.resize_token_embeddings(512)
    with pytest.raises(RecipeError, match=r"teacher vocabulary \(512\) differs from the student's \(400\)"):
        apply_distill(model, stage(student={"layers": [0]}), ctx)
    assert model.config.num_hidden_layers == 2  # refused before the student was built
    with pytest.raises(RecipeError, match="student layers \\[7\\] do not exist; the model has 2 layers"):
        apply_distill(model, stage(student={"layers": [0, 7]}), context(model, tiny_tokenizer))


def test_multitask_text_and_classification(tiny_tokenizer, tmp_path):
    path = tmp_path / "sentiment.jsonl"
    words = [("great fine good", "pos"), ("bad awful poor", "neg")]
    path.write_text("\n".join(json.dumps({"text": f"{words[i % 2][0]} {i}", "label": words[i % 2][1]})
                              for i in range(60)))
    model = tiny_llama(2)
    cfg = stage(data=[{"text": "builtin", "name": "lm", **FAST},
                      {"text": str(path), "task": "sequence_classification", "name": "sentiment", "weight": 1.0}],
                training_args={"max_steps": 12})
    d = apply_distill(model, cfg, context(model, tiny_tokenizer))
    assert set(d["tasks"]) == {"lm", "sentiment"}
    assert d["tasks"]["sentiment"]["labels"] == ["neg", "pos"]
    assert d["tasks"]["sentiment"]["after"]["accuracy"] == 1.0  # trivially separable
    assert d["tasks"]["lm"]["after"]["perplexity"] < d["tasks"]["lm"]["before"]["perplexity"]
    assert not hasattr(model, "hfsqueeze_distill")


def test_encoder_student_imitates_teacher_embeddings(tiny_tokenizer):
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=512,
                                      initializer_range=0.2)).eval()
    d = apply_distill(bert, stage(student={"layers": [0, 2]}, training_args={"max_steps": 10}),
                      context(bert, tiny_tokenizer))
    cos = d["tasks"]["causal_lm"]
    assert bert.config.num_hidden_layers == 2
    assert cos["after"]["embedding_cosine"] > cos["before"]["embedding_cosine"] + 0.2


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_recovery_on_bnb_model_merges_and_reloads(tiny_tokenizer, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    import hfsqueeze

    model = tiny_llama(2)
    recipe = {"evaluation": SMALL_EVAL, "stages": [
        {"method": "quantize", "bits": bits},
        # merge: true (the default keeps the adapter unmerged on a quantized model: tests/test_recover.py).
        {"method": "distill", "block_size": 64, "data": {"text": "builtin", **FAST}, "lora": {"merge": True},
         "guard": False, "training_args": {"max_steps": 4, "learning_rate": 1e-3}},
    ]}
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    d = report.stages[1].details
    # r=16 on q, o (64->64), k, v (64->32), gate, up (64->128), down (128->64): 16 * (128*2 + 96*2 + 192*3) per layer.
    assert d["adapter"] == "lora" and d["trainable_parameters"] == 2 * 16 * (128 * 2 + 96 * 2 + 192 * 3)
    assert not any("lora" in k for k in model.state_dict())
    expected = logits(model, IDS)
    out = hfsqueeze.save_compressed(model, tmp_path / "q", tokenizer=tiny_tokenizer)
    assert (out / Path(d["artifacts"][0]).name).is_file()
    again = tf.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    for module in again.modules():  # bnb's AVX512-BF16 repack would change the kernel, not the weights
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    assert not any("lora" in k for k in again.state_dict())
    torch.testing.assert_close(logits(again, IDS), expected)
    with pytest.raises(RecipeError, match="bnb-quantized, so its weights cannot be fine-tuned directly"):
        apply_distill(model, stage(adapter="none"), context(model, tiny_tokenizer))


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_from_last_checkpoint_to_same_steps(tiny_tokenizer, tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Interrupt()

    def cfg(out):
        return stage(output_dir=str(out), training_args={"max_steps": 8, "save_steps": 2})

    reference = tiny_llama(2)
    full = apply_distill(reference, cfg(tmp_path / "full"), context(reference, tiny_tokenizer))

    model = tiny_llama(2)
    ctx = context(model, tiny_tokenizer, extras={"distill_callbacks": [StopAt()]})
    with pytest.raises(_Interrupt):
        apply_distill(model, cfg(tmp_path / "run"), ctx)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # Ctrl-C during the next checkpoint save: only the config files made it to disk.
    broken = tmp_path / "run" / "checkpoint-6"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "run" / "checkpoint-4" / "config.json").read_text())
    (broken / "generation_config.json").write_text("{}")
    model = tiny_llama(2)
    d = apply_distill(model, cfg(tmp_path / "run"), context(model, tiny_tokenizer))
    assert d["resumed_from"].endswith("checkpoint-4")
    assert d["steps"] == full["steps"] == 8
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS), rtol=1e-4, atol=1e-4)


# ---- recovery expansion -------------------------------------------------------------------------------------------


@dataclass
class _FakePrune:
    method: str = "prune"
    recover: Any = None


@dataclass
class _FakeRecipe:
    stages: list
    recover: Any = None


def test_expand_recovery_inserts_after_pruning_and_is_idempotent():
    quantize = Recipe.load({"stages": [{"method": "quantize", "bits": 8}]}).stages[0]
    recipe = _FakeRecipe([_FakePrune(), quantize], recover="auto")
    expanded = expand_recovery(recipe)
    assert [s.method for s in expanded.stages] == ["prune", "distill", "quantize"]
    assert expanded.stages[1].teacher == "original" and expanded.recover is None
    assert expand_recovery(expanded).stages == expanded.stages
    assert [s.method for s in recipe.stages] == ["prune", "quantize"]  # the input is untouched

    own = expand_recovery(_FakeRecipe([_FakePrune(recover={"training_args": {"max_steps": 7}}), _FakePrune()]))
    assert [s.method for s in own.stages] == ["prune", "distill", "prune"]
    assert own.stages[1].training_args["max_steps"] == 7
    assert own.stages[1].training_args["per_device_train_batch_size"] == 4
    off = expand_recovery(_FakeRecipe([_FakePrune(recover="none"), _FakePrune()], recover="auto"))
    assert [s.method for s in off.stages] == ["prune", "prune", "distill"]
    explicit = _FakeRecipe([_FakePrune(), DistillConfig(teacher="original")], recover="auto")
    assert [s.method for s in expand_recovery(explicit).stages] == ["prune", "distill"]
    with pytest.raises(RecipeError, match="key 'recover': got 'sometimes'; allowed: auto, none, or a mapping"):
        expand_recovery(_FakeRecipe([_FakePrune(recover="sometimes")]))
    with pytest.raises(RecipeError, match="unknown key 'max_steps'"):
        expand_recovery(_FakeRecipe([_FakePrune()], recover={"max_steps": 5}))


def test_compress_recover_auto_inserts_recovery_after_pruning(tiny_tokenizer):
    import hfsqueeze

    model = tiny_llama(4, initializer_range=0.2)  # peaked outputs: pruning moves them, recovery brings them back
    recipe = {
        "evaluation": SMALL_EVAL,
        "recover": {"block_size": 64, "data": {"text": "builtin", **FAST},
                    "training_args": {"max_steps": 8, "learning_rate": 1e-3}},
        "stages": [{"method": "prune", "heads": 0.5, "ffn": 0.5, "importance": "magnitude"}],
    }
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    assert [s.method for s in report.stages] == ["prune", "distill"]
    assert "recover" not in report.recipe and report.recipe["stages"][1]["teacher"] == "original"
    d = report.stages[1].details
    assert d["teacher"] == "original" and d["steps"] == 8 and report.recipe["stages"][1]["alpha"] == 1.0
    # Pure distillation: recovery brings the pruned model closer to the original.
    points = d["quality"]["held-out: causal_lm"]
    assert points["saved"]["kl_divergence"] < points["before"]["kl_divergence"] and d["kept"] == "recovered"


# ---- scripts under a real two-process launcher ----------------------------------------------------------------------


@pytest.mark.slow
def test_distill_script_runs_two_processes_with_torchrun(tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_llama(2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "evaluation: {max_tokens: 256, seq_len: 128, latency: false, disk_size: false}\n"
        "stages:\n  - method: distill\n    block_size: 64\n"
        "    data: {text: builtin, max_tokens: 12000, eval_tokens: 1024}\n"
        "    training_args: {max_steps: 4, per_device_train_batch_size: 2, learning_rate: 1.0e-3}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HFSQUEEZE_DISABLE_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "scripts" / "distill.py"), "--model", str(model_dir), "--recipe", str(recipe),
           "--output", str(tmp_path / "out"), "--report-json", str(tmp_path / "report.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = json.loads((tmp_path / "report.json").read_text())["stages"][0]["details"]
    assert d["world_size"] == 2 and d["steps"] == 4
    assert d["tokens_seen"] == 4 * 2 * 2 * 64  # steps x per-device batch x processes x block
    assert "world size 2" in proc.stdout
    assert (tmp_path / "out" / "config.json").is_file()


def test_kd_loss_gradient_is_the_written_out_kl_gradient():
    torch.manual_seed(0)
    student, teacher, mask = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    for temperature in (1.0, 2.0):
        s = student.clone().requires_grad_(True)
        losses.kd_loss(s, teacher, temperature, mask).backward()
        r = student.clone().requires_grad_(True)
        log_t = torch.log_softmax(teacher / temperature, -1)
        kl = (log_t.exp() * (log_t - torch.log_softmax(r / temperature, -1))).sum(-1)
        ((kl * mask).sum() / mask.sum() * temperature**2).backward()
        torch.testing.assert_close(s.grad, r.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_value_and_gradient_match_autograd_and_keep_no_extra_vocabulary_tensor(dtype):
    # The chunked KD loss equals F.cross_entropy through autograd (value and gradient), and its backward keeps no
    # vocabulary-sized tensor besides the student's logits and the teacher's probabilities (autograd through
    # cross_entropy keeps s/T and its log-softmax too: 200 MB each at 4 x 256 positions of a 49k vocabulary).
    import torch.nn.functional as F

    torch.manual_seed(0)
    vocab = 300
    student = (torch.randn(2, 70, vocab) * 3).to(dtype).requires_grad_(True)
    teacher = torch.randn(2, 70, vocab) * 3
    mask = torch.ones(2, 70)
    mask[1, 50:] = 0
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = losses.kd_loss(student, teacher, 2.0, mask)
    loss.backward()
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= student.numel()}
    assert big <= {student.untyped_storage().data_ptr()} | {t.untyped_storage().data_ptr() for t in saved
                                                            if t.dtype == torch.float32 and not t.requires_grad}
    assert len(big - {student.untyped_storage().data_ptr()}) == 1  # the teacher's probabilities

    reference = student.detach().clone().requires_grad_(True)
    log_t = F.log_softmax(teacher / 2.0, dim=-1)
    cross = F.cross_entropy((reference.float() / 2.0).reshape(-1, vocab), log_t.exp().reshape(-1, vocab),
                            reduction="none").view(2, 70)
    expected = ((cross + (log_t.exp() * log_t).sum(-1)) * mask).sum() / mask.sum() * 4.0
    expected.backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance)
    assert torch.allclose(student.grad.float(), reference.grad.float(), rtol=tolerance, atol=1e-6)

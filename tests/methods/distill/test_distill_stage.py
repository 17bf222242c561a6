"""The distill stage on tiny models: a frozen teacher, layer-subset and narrower students, a teacher from a path,
errors, multi-task, encoders, QLoRA, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from hfsqueeze.core.context import CompressionContext
from hfsqueeze.core.errors import RecipeError
from hfsqueeze.core.hf import frozen_copy
from hfsqueeze.methods.distill.apply import apply_distill
from hfsqueeze.methods.distill.data import MixedDataset, build_tasks
from hfsqueeze.methods.distill.trainer import DistillationTrainer, DistillSpec
from distillkit import FAST, IDS, SMALL_EVAL, stage, tiny_llama
from distillkit import _one_thread  # noqa: F401  (autouse: one torch thread per module)




def context(model, tokenizer, **kwargs: Any) -> CompressionContext:
    return CompressionContext(tokenizer=tokenizer, original=frozen_copy(model), stage_index=1, **kwargs)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


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
        # merge: true (the default keeps the adapter unmerged on a quantized model: tests/methods/distill/test_recover.py).
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

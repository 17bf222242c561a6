"""Weights out of the memory-mapped checkpoint: what hfsqueeze loads, and what it compresses, owns its memory, so
weights a stage frees go back to the system (see hfsqueeze.core.memory)."""

import sys

import pytest
import torch
from conftest import SMALL_EVAL, outputs
from transformers import AutoModelForCausalLM

import hfsqueeze
from hfsqueeze.core.memory import mapped_tensors, unmap_weights
from hfsqueeze.models import load_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

IDS = torch.randint(5, 400, (1, 24), generator=torch.Generator().manual_seed(3))


def test_stock_transformers_maps_the_checkpoint(model_dir):
    # What the fix is for: a plain load points into the file, so this test suite would notice if it stopped doing so.
    assert mapped_tensors(AutoModelForCausalLM.from_pretrained(model_dir))


def test_a_loaded_model_owns_its_weights_with_the_same_outputs(model_dir):
    model, _ = load_model(model_dir)
    assert mapped_tensors(model) == []
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay tied
    assert torch.equal(outputs(model, IDS), outputs(AutoModelForCausalLM.from_pretrained(model_dir).eval(), IDS))


def test_unmap_keeps_values_for_other_holders(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    before = outputs(model, IDS)
    kept = model.model.layers[0].mlp.up_proj.weight.data  # a view something else holds: its pages are dropped
    kept_values = kept.clone()
    assert unmap_weights(model) > 0
    assert mapped_tensors(model) == []
    assert torch.equal(kept, kept_values) and torch.equal(outputs(model, IDS), before)


def test_compress_int8_leaves_nothing_in_the_checkpoint_mapping(model_dir, tiny_tokenizer):
    # A model the caller loaded (memory-mapped): after compress, no parameter or buffer points into the file, so the
    # fp32 weights the quantize stage freed are really gone instead of staying resident behind the embeddings.
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hfsqueeze.compress(model, "int8", tokenizer=tiny_tokenizer, overrides=[f"evaluation.{k}={v}" for k, v in
                                                                           SMALL_EVAL.items()])
    assert mapped_tensors(model) == []

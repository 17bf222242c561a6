"""The exact size of the safetensors files a save writes, computed instead of writing them.

A workaround around library internals (checked on safetensors 0.8.0, Transformers 5.25.0, peft 0.21.2): the size of a
model on disk is the size of what ``save_pretrained`` (plus a kept LoRA adapter) writes, and writing it to measure it
costs a full copy of the weights on disk (an 8B model in fp32: 32 GB) and its time. `safetensors_bytes` runs the same
save (same state dict, shards, metadata), with safetensors' ``save_file`` replaced for the duration, in the modules
that call it (`WRITERS`), by one that records the exact size of the file it was given and writes nothing.

A safetensors file is 8 bytes (the header's length), a compact JSON header padded with spaces to a multiple of 8,
then the tensors' bytes, laid out sorted by dtype (in safetensors' own order, descending) and name. It fails safe, so
the number is never wrong, only sometimes slower: a writer that is missing or is not ``save_file`` in an installed
version is left alone, and a dict it cannot size (an unlisted dtype, a non-contiguous, shared, sparse or meta tensor,
non-string metadata) is written for real (safetensors raises for it as it would have); the files written for real are
counted from disk. Before its first use the formula is checked against safetensors' own in-memory serializer on a
probe that covers every dtype it sizes, and sizing is off in a process where they differ.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("hfsqueeze")

# (module, attribute) of every ``save_file`` a save reaches: safetensors' own (peft and `compat.peft` import it when
# they write), Transformers' ``save_pretrained`` and peft's ``PeftModel.save_pretrained`` (imported by name there).
WRITERS = (("safetensors.torch", "save_file"), ("transformers.modeling_utils", "safe_save_file"),
           ("peft.peft_model", "safe_save_file"))
# safetensors' dtypes in its own order (the Rust `Dtype` enum), with the torch dtype each is written from; the tensors
# of a file are laid out in this order, last first. Sub-byte formats (F4, F6) and E8M0 are not sized: written instead.
DTYPE_ORDER = (("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("F8_E5M2", "float8_e5m2"),
               ("F8_E4M3", "float8_e4m3fn"), ("I16", "int16"), ("U16", "uint16"), ("F16", "float16"),
               ("BF16", "bfloat16"), ("I32", "int32"), ("U32", "uint32"), ("F32", "float32"), ("C64", "complex64"),
               ("F64", "float64"), ("I64", "int64"), ("U64", "uint64"))

_state = threading.local()  # ``sizes``: path -> bytes while this thread sizes a save, else absent
_lock = threading.Lock()
_installed: list[tuple[Any, str, Callable]] = []  # (module, attribute, original) while any thread sizes
_users = 0


def _dtypes() -> dict[torch.dtype, tuple[int, str]]:
    """torch dtype -> (rank in safetensors' order, safetensors name), for the dtypes this torch has."""
    table = {}
    for rank, (name, torch_name) in enumerate(DTYPE_ORDER):
        dtype = getattr(torch, torch_name, None)
        if isinstance(dtype, torch.dtype):
            table[dtype] = (rank, name)
    return table


def safetensors_size(tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> int | None:
    """Exact size in bytes of the file ``safetensors.torch.save_file(tensors, path, metadata)`` writes.

    Args:
        tensors (`dict[str, torch.Tensor]`): what would be saved.
        metadata (`dict[str, str]`, *optional*): the header's ``__metadata__``.

    Returns:
        `int | None`: the size, or ``None`` for a dict this does not size (``save_file`` would refuse it or the dtype
        is not in `DTYPE_ORDER`); the caller then writes it.
    """
    if not isinstance(tensors, Mapping) or (metadata is not None and not (
            isinstance(metadata, Mapping) and all(isinstance(v, str) and isinstance(k, str)
                                                  for k, v in metadata.items()))):
        return None
    dtypes, storages, items = _dtypes(), set(), []
    for name, t in tensors.items():
        if not (isinstance(name, str) and isinstance(t, torch.Tensor) and t.layout == torch.strided
                and t.device.type != "meta" and t.dtype in dtypes and t.is_contiguous()):
            return None
        nbytes = t.numel() * t.element_size()
        if nbytes:  # two tensors on one storage: save_file refuses them (tied weights are deduplicated before)
            storage = (t.device, t.untyped_storage().data_ptr())
            if storage in storages:
                return None
            storages.add(storage)
        items.append((-dtypes[t.dtype][0], name, dtypes[t.dtype][1], list(t.shape), nbytes))
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for _, name, dtype, shape, nbytes in sorted(items):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    try:
        length = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    except UnicodeEncodeError:  # a lone surrogate in a name: not valid UTF-8, so not a header safetensors writes
        return None
    return 8 + length + (-length) % 8 + offset


@functools.cache
def layout_verified() -> bool:
    """Whether `safetensors_size` equals the length of safetensors' own serialization of a probe, in this process.

    The probe holds two tensors of every sized dtype, of sizes and names that make a wrong order, offset, padding or
    escaping change the length; ``safetensors.torch.save`` serializes it in memory (about 100 kB).
    """
    from safetensors.torch import save

    probe = {}
    for i, dtype in enumerate(_dtypes()):
        probe[f"z.{i}.é\"/"] = torch.zeros(1 + 97 * (i % 3), dtype=dtype)
        probe[f"a.{i}"] = torch.zeros((i % 4, 3), dtype=dtype)
    metadata = {"format": "pt", "note": "ü\n"}
    size = safetensors_size(probe, metadata)
    real = len(save(probe, metadata=metadata))
    if size != real:
        logger.debug("safetensors' layout is not the one hfsqueeze sizes (%s bytes computed, %d real): "
                     "weight sizes are measured by writing them", size, real)
    return size == real


def _sizing_save_file(tensors: dict[str, torch.Tensor], filename: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """``save_file`` while a save is sized: record the file's size in this thread's sizes, or write it."""
    sizes = getattr(_state, "sizes", None)
    if sizes is not None:
        size = safetensors_size(tensors, metadata)
        if size is not None:
            sizes[os.path.abspath(os.fspath(filename))] = size
            return
        logger.debug("%s cannot be sized without writing it; writing it", filename)
    # Not sizing in this thread (another thread saves for real, or a module imported during the save kept this
    # function): the real writer.
    from safetensors import torch as st

    original = next((o for m, a, o in _installed if m is st and a == "save_file"), st.save_file)
    original(tensors, filename, metadata=metadata)


def _install() -> None:
    from safetensors.torch import save_file

    importlib.import_module("transformers.modeling_utils")
    for module_name, attribute in WRITERS:
        module = sys.modules.get(module_name)  # peft only when a save may use it (it is imported already then)
        current = getattr(module, attribute, None)
        if current is save_file:
            _installed.append((module, attribute, current))
        elif module is not None:
            logger.debug("%s.%s is not safetensors' save_file in this version; its files are measured by writing "
                         "them", module_name, attribute)
    for module, attribute, _ in _installed:
        setattr(module, attribute, _sizing_save_file)


def _uninstall() -> None:
    for module, attribute, original in _installed:
        setattr(module, attribute, original)
    _installed.clear()


@contextlib.contextmanager
def _sizing() -> Iterator[dict[str, int]]:
    global _users
    with _lock:
        if _users == 0:
            _install()
        _users += 1
    outer, _state.sizes = getattr(_state, "sizes", None), {}
    try:
        yield _state.sizes
    finally:
        _state.sizes = outer
        with _lock:
            _users -= 1
            if _users == 0:
                _uninstall()


def safetensors_bytes(directory: str | os.PathLike, save: Callable[[], object]) -> int:
    """Run ``save`` (which writes into ``directory``) and return the bytes of the ``*.safetensors`` files it writes
    there, computed instead of written where possible (see the module's docstring) and read from disk otherwise.

    Args:
        directory (`str` or `os.PathLike`): where ``save`` writes (a temporary directory: other files are written).
        save (`Callable`): the save, e.g. ``lambda: model.save_pretrained(directory)``.
    """
    root = Path(directory).resolve()
    if not layout_verified():
        save()
        return sum(p.stat().st_size for p in root.glob("*.safetensors"))
    with _sizing() as sizes:
        save()
    sized = {Path(f).name: n for f, n in sizes.items()
             if f.endswith(".safetensors") and Path(f).parent.resolve() == root}
    written = {p.name: p.stat().st_size for p in root.glob("*.safetensors")}
    return sum({**sized, **written}.values())


__all__ = ["DTYPE_ORDER", "WRITERS", "layout_verified", "safetensors_bytes", "safetensors_size"]

"""Weights that live in a memory-mapped checkpoint, moved into the process's own memory.

Transformers memory-maps a safetensors checkpoint and hands out tensors that point into the mapping (on the CPU, when
the checkpoint's dtype is the one asked for). The mapping is one per file and stays as long as any of its tensors
lives, and every page a forward pass touched stays resident. So after quantizing or pruning, the freed fp32 weights
give nothing back: the embeddings alone hold the whole file's mapping, and the quantized model sits on top of a
resident copy of the original (at 800M parameters, int8 peaked at 1.41x of the fp32 size instead of about 1.1x).
`unmap_weights` copies each mapped tensor into ordinary memory and drops its pages from the mapping as it goes, so
the peak stays near one model, and every weight a stage frees afterwards is returned to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("hfsqueeze")

_MADV_DONTNEED = 4
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# Allocations from this size up get pages of their own from the system, returned when freed: tensors of a layer's
# activations (MiB each) and freed weights, not the many small allocations the heap serves well.
MMAP_THRESHOLD = 1 << 20


def file_mappings() -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of this process's file-backed memory mappings (Linux ``/proc/self/maps``; empty
    elsewhere)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5]))
    return out


def _mapped(tensor: torch.Tensor, mappings: list[tuple[int, int, str]]) -> bool:
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    ptr = tensor.untyped_storage().data_ptr()
    return any(start <= ptr < end for start, end, _ in mappings)


def mapped_tensors(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters and buffers whose memory is a file mapping (a memory-mapped checkpoint)."""
    mappings = file_mappings()
    if not mappings:
        return []
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in named if _mapped(t, mappings)]


def _drop_pages(tensor: torch.Tensor) -> None:
    """Drop the whole pages of ``tensor``'s storage from this process's memory. A page nothing wrote into comes back
    from the file if anything reads it again, so no value changes (a page written into since loading would come back
    as the file has it: hence `unmap_weights` runs before any stage)."""
    libc = _libc()
    if libc is None:
        return
    storage = tensor.untyped_storage()
    page = mmap.PAGESIZE
    start = -(-storage.data_ptr() // page) * page  # whole pages only: a neighbour may share the edge pages
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name, use_errno=True) if name else None
    return lib if lib is not None and hasattr(lib, "madvise") else None


def _rebind(model: nn.Module, wanted: Callable[[torch.Tensor], bool], key_of: Callable[[torch.Tensor], Any],
            copy_of: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Give each parameter and buffer of ``model`` for which ``wanted`` holds the tensor ``copy_of`` makes, one copy
    per ``key_of`` (so tied weights stay tied); parameters stay the same objects (their ``.data`` is rebound).
    Return the bytes copied."""
    copied, done = 0, {}
    for module in model.modules():
        for kind, items in (("param", module._parameters), ("buffer", module._buffers)):
            for name, tensor in items.items():
                if tensor is None or not wanted(tensor):
                    continue
                key = key_of(tensor)
                if key not in done:
                    done[key] = copy_of(tensor)
                    copied += tensor.numel() * tensor.element_size()
                if kind == "param":
                    tensor.data = done[key]
                else:
                    items[name] = done[key]
    return copied


@torch.no_grad()
def unmap_weights(model: nn.Module) -> int:
    """Copy every parameter and buffer of ``model`` that points into a file mapping into memory of its own, one at a
    time, dropping the mapped pages as each is copied; return the bytes moved.

    Parameters stay the same objects (their ``.data`` is rebound), so tied weights stay tied. A tensor shared with
    something outside ``model`` keeps its values there: the dropped pages are re-read from the file on demand.
    Call it before anything writes into the weights (right after loading): a page written since would be dropped
    for the other holders too.
    """
    mappings = file_mappings()
    if not mappings:
        return 0

    def copy_out(tensor: torch.Tensor) -> torch.Tensor:
        copy = torch.empty_like(tensor.data, memory_format=torch.preserve_format).copy_(tensor.data)
        _drop_pages(tensor.data)  # copied: the mapped pages can go now, before the next tensor is copied
        return copy

    moved = _rebind(model, lambda t: _mapped(t, mappings),
                    lambda t: (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype), copy_out)
    if moved:
        logger.debug("copied %.1f MiB of memory-mapped weights into memory", moved / 2**20)
    return moved


@functools.lru_cache(maxsize=1)
def return_freed_memory() -> bool:
    """Make glibc give large freed blocks back to the system at once (a fixed ``M_MMAP_THRESHOLD``); return whether
    it could be set (glibc only; elsewhere nothing changes).

    glibc raises its threshold to the size of every large block freed (up to 32 MiB), so after the first freed weight
    or activation, blocks of that size come from the heap, and the heap only grows: freed activations of one training
    step stayed resident through the next (a recovery step at 200M parameters kept 2 GB it no longer used, and its
    peak fell from 5.8x to 4.0x of the fp32 model with the threshold fixed). It is process-wide and stays set: the
    cost is a page fault per large allocation.
    """
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_heap() -> None:
    """Free unreachable reference cycles now and hand the heap's free pages back to the system (glibc's
    ``malloc_trim``; elsewhere only the collection). For loops that build and drop many small modules (a search over
    candidate layers): their freed blocks stay in the heap, under the mmap threshold, and the heap only grows."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@torch.no_grad()
def unshare(model: nn.Module, other: nn.Module) -> int:
    """Give ``model`` its own copy of every tensor it shares with ``other`` (a `hfsqueeze.core.hf.sharing_copy`
    made it), so that writing into one never changes the other; return the bytes copied."""
    theirs = {t.untyped_storage().data_ptr() for t in (*other.parameters(), *other.buffers()) if t.numel()}
    return _rebind(model, lambda t: bool(t.numel()) and t.untyped_storage().data_ptr() in theirs, id,
                   lambda t: t.data.clone())


__all__ = ["MMAP_THRESHOLD", "file_mappings", "mapped_tensors", "release_heap", "return_freed_memory", "unmap_weights",
           "unshare"]

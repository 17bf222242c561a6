"""Tune workers each get a GPU of their own."""

from __future__ import annotations


# ---- tune workers each get a GPU of their own ------------------------------------------------------------------


def test_tune_workers_get_their_own_gpu():
    from hfsqueeze.tune.resources import worker_placement

    gpus = ["0", "1", "2", "3"]
    assert worker_placement("cuda:0", False, 4, gpus) == [("1", "cuda:0"), ("2", "cuda:0"), ("3", "cuda:0")]
    assert worker_placement("cuda:2", False, 3, gpus) == [("0", "cuda:0"), ("1", "cuda:0")]
    assert worker_placement("cuda", False, 5, ["4", "7"]) == [("7", "cuda:0")] * 4  # more workers than GPUs
    assert worker_placement("cuda:0", False, 3, ["0"]) == [(None, "cuda:0")] * 2  # one GPU: shared
    assert worker_placement("cuda:0", True, 2, gpus) == [(None, "auto")]  # a spread model: spread again
    assert worker_placement("cpu", False, 3, gpus) == [(None, None)] * 2

"""`hfsqueeze.tune` budgets: parsing ``--budget`` and what a budget allows."""

from __future__ import annotations

import pytest

from hfsqueeze import RecipeError
from hfsqueeze.tune import Budget
from tunekit import _own_cache  # noqa: F401  (autouse: a sensitivity cache per test)




# ---- budgets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, minimize, limits", [
    ("size=0.30", "kl", {"size": 0.30}),
    ("size=150MiB", "kl", {"size_bytes": 150 * 2**20}),
    ("size=1.5GB,ppl=+1%", "kl", {"size_bytes": 1.5e9, "ppl": 0.01}),
    ("bits=4.5", "kl", {"bits": 4.5}),
    ("prefill=0.6, kl=0.05", "kl", {"prefill": 0.6, "kl": 0.05}),
    ("kl=0.005", "size", {"kl": 0.005}),
    ("ppl=2%", "decode", {"ppl": 0.02}),
    ("top1=0.95,size=0.5", "prefill", {"top1": 0.95, "size": 0.5}),
])
def test_budget_parses(text, minimize, limits):
    budget = Budget.parse(text, minimize)
    assert budget.limits == pytest.approx(limits)
    assert budget.describe() and budget.to_dict()["minimize"] == minimize


@pytest.mark.parametrize("text, minimize, message", [
    ("size", "kl", "expected key=value"),
    ("size=abc", "kl", "expected a fraction of the original"),
    ("size=1.5", "kl", "must be <= 1"),
    ("size=10furlongs", "kl", "unknown unit 'furlongs'"),
    ("speed=2", "kl", "unknown key 'speed'"),
    ("ppl=1.01", "kl", "increase in percent"),
    ("kl=-1", "size", "must be a positive number"),
    ("top1=2", "size", "must be in (0, 1]"),
    ("size=0.3,size=0.4", "kl", "given twice"),
    ("kl=0.01", "kl", "minimizing KL needs a size or latency limit"),
    ("size=0.3", "size", "needs a quality limit"),
    ("size=0.3", "speed", "allowed: kl, size, prefill, decode"),
])
def test_budget_errors_are_one_line(text, minimize, message):
    with pytest.raises(RecipeError, match=None) as info:
        Budget.parse(text, minimize)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, described", [
    ("size=1e-5MiB", "size<=10.49B"),
    ("size=150MiB", "size<=150MiB"),
    ("size=149.5MiB,ppl=+1%", "size<=149.5MiB, ppl<=+1%"),
    ("size=1.5GB", "size<=1.397GiB"),
    ("size=0.00001", "size<=1e-05x"),
])
def test_budget_is_described_with_its_significant_digits(text, described):
    assert Budget.parse(text).describe() == described


def test_budget_constraints_and_size_limit():
    budget = Budget.parse("size=0.5,ppl=+2%,top1=0.9")
    m = {"size": 0.4, "disk_bytes": 40, "ppl": 1.03, "top1": 0.95, "kl": 0.01}
    c = budget.constraints(m)
    assert c["size"] < 0 and c["ppl"] == pytest.approx(0.01) and c["top1"] < 0
    assert Budget.parse("size=0.5,bits=8").size_limit_bytes(1000, 100) == 100  # 8 bits x 100 params < 500 bytes

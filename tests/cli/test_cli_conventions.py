"""CLI conventions: what the command line prints, where, and what it imports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from outputkit import REPO


# ---- CLI conventions ----------------------------------------------------------------------------------------------
NO_TORCH = """
import sys
from hfsqueeze.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


@pytest.mark.parametrize("argv, code", [(["recipes"], 0), (["--help"], 0), (["compress", "--help"], 0),
                                        (["compres"], 2), (["compress", "--bogus"], 2)])
def test_recipes_help_and_argument_errors_answer_without_torch(argv, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]


def test_recipes_is_a_grouped_table_within_100_columns(capsys):
    from hfsqueeze.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    groups = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert groups == ["quantize:", "prune:", "distill:", "combined:"]
    assert "  int8 " in out.split("prune:")[0] and "  prune-int8 " in out.split("combined:")[1]
    assert out.splitlines()[0].split() == ["recipe", "for", "time", "what", "it", "does"]
    minilm = next(line for line in out.splitlines() if line.startswith("  prune-recover-minilm "))
    assert minilm.split()[1:3] == ["encoders", "6"]  # for sentence encoders; measured minutes


def test_did_you_mean_and_verbose_after_the_subcommand(capsys):
    from hfsqueeze.cli import build_parser, main

    with pytest.raises(SystemExit) as exc:
        main(["compres"])
    assert exc.value.code == 2 and "did you mean 'compress'?" in capsys.readouterr().err
    assert main(["validate", "int9"]) == 2
    assert "did you mean 'int8'?" in capsys.readouterr().err
    for override, close in [("quantize.threshhold=5", "'threshold'"), ("quantise.threshold=5", "'quantize'"),
                            ("evaluation.max_token=64", "'max_tokens'")]:
        assert main(["validate", "int8", "--set", override]) == 2
        assert f"(did you mean {close}?)" in capsys.readouterr().err
    parser = build_parser()
    assert parser.parse_args(["validate", "int8", "-v"]).verbose is True
    assert parser.parse_args(["-v", "validate", "int8"]).verbose is True
    assert parser.parse_args(["validate", "int8"]).verbose is False
    help_text = parser._subparsers._group_actions[0].choices["compress"].format_help()
    assert "Compress a model with a recipe" in help_text and "example:\n  hfsqueeze compress --output" in help_text


def test_cli_errors_speak_in_flags_not_python_arguments(tmp_path, capsys):
    from hfsqueeze.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["compress", "--output", str(out)]) == 2  # refused before the model loads
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err and "CLI:" not in err

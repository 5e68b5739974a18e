#!/usr/bin/env bash
# GPU check of kdbench: CPU-vs-GPU loss/gradient parity of every student method and teacher
# objective, then the speed benchmarks (augment, step, epoch, teacher_cache) on CUDA. Sized to
# finish in under 8 minutes on one H100/H200 (UNTESTED on a GPU so far: see benchmarks/README.md).
#
#   benchmarks/gpu_check.sh                  # CUDA (default)
#   benchmarks/gpu_check.sh --device cpu     # the same harness, tiny sizes, on the CPU:
#                                            # parity compares CPU fp64 with CPU fp32
#
# Run from anywhere with kdbench installed (pip install -e .) in the active Python
# (override with PYTHON=/path/to/python). When $OUT is set, every stage's markdown table goes
# to $OUT/<stage>.md and its log (stderr) to $OUT/<stage>.log; $OUT/summary.md lists the stages.
# Exit status: 0 when every stage succeeded (parity: every check passed), 1 otherwise.
# Environment: THREADS=<n> sets torch's CPU threads in --device cpu mode (default: torch's).
set -uo pipefail

DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:-}"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --device cuda|cpu)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device cuda|cpu" >&2; exit 2 ;; esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-}"
[ -n "$OUTDIR" ] && mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ]; then
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to $PY (use --device cpu)" >&2
    exit 2
  fi
  GPU="$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
  # Dense bf16 peak (no sparsity) for the TFLOP/s gap: H100 SXM / H200 989, H100 PCIe 756.
  case "$GPU" in
    *H100*PCIe*) PEAK=756 ;;
    *H100*|*H200*) PEAK=989 ;;
    *A100*) PEAK=312 ;;
    *) PEAK="" ;;
  esac
  PEAK_ARG=(); [ -n "$PEAK" ] && PEAK_ARG=(--peak-tflops "$PEAK")
  # ~1 min: 2 pairs x 14 plugin configurations, CPU fp32 vs CUDA fp32 (TF32 off).
  PARITY=(parity.py --device cuda --pairs "wrn_40_2->wrn_16_2,resnet50->mobilenetv2")
  # ~30 s: CUDA only (the CPU row is in the README).
  AUGMENT=(augment.py --device cuda --rounds 7)
  # ~2-3 min: 2 pairs x 2 batch sizes x 4 loops x 5 rounds x (18 + 30) steps.
  STEP=(step.py --device cuda --precision auto,fp32 --channels-last --steps 30 --rounds 5)
  # ~1-2 min: one 50k-image epoch (+ 10k eval) of each of the six pairs.
  EPOCH=(epoch.py --device cuda "${PEAK_ARG[@]}")
  # ~1 min: 2 KD students x 3 epochs of 50k images, live teacher vs the logit cache.
  CACHE=(teacher_cache.py --device cuda --n 50000 --epochs 3 --students 2)
else
  GPU="none (cpu mode)"
  T=(); [ -n "${THREADS:-}" ] && T=(--threads "$THREADS")
  PARITY=(parity.py --device cpu --width-mult 0.25 "${T[@]}")
  AUGMENT=(augment.py --device cpu --n 10000 --rounds 3 --round-images 4096
           --threads "${THREADS:-0}")
  STEP=(step.py --device cpu --width-mult 0.125 --n 1024 --batch-sizes 64 --steps 2 --rounds 2
        --warmup 1 --workers 2 "${T[@]}")
  EPOCH=(epoch.py --device cpu --width-mult 0.125 --n 512 --n-test 256 --warmup 1 "${T[@]}")
  CACHE=(teacher_cache.py --device cpu --width-mult 0.125 --n 512 --n-test 128 --epochs 2
         --students 2 "${T[@]}")
fi

START=$(date +%s)
FAILED=()
SUMMARY="# kdbench gpu_check ($DEVICE, GPU: $GPU, $(date -u '+%Y-%m-%d %H:%M UTC'))"$'\n'

stage() {  # stage <name> <script> [args...]
  local name="$1"; shift
  local t0 rc
  t0=$(date +%s)
  echo "=== [$(( t0 - START ))s] $name: $PY $*" >&2
  if [ -n "$OUTDIR" ]; then
    "$PY" "$HERE/$1" "${@:2}" 2> >(tee "$OUTDIR/$name.log" >&2) | tee "$OUTDIR/$name.md"
    rc=${PIPESTATUS[0]}
  else
    "$PY" "$HERE/$1" "${@:2}"
    rc=$?
  fi
  local dt=$(( $(date +%s) - t0 ))
  echo "=== $name: exit $rc after ${dt}s" >&2
  SUMMARY+="- $name: exit $rc, ${dt}s: \`$*\`"$'\n'
  [ "$rc" -ne 0 ] && FAILED+=("$name")
  return 0
}

stage parity "${PARITY[@]}"
stage augment "${AUGMENT[@]}"
stage step "${STEP[@]}"
stage epoch "${EPOCH[@]}"
stage teacher_cache "${CACHE[@]}"

TOTAL=$(( $(date +%s) - START ))
SUMMARY+="- total: ${TOTAL}s; failed stages: ${FAILED[*]:-none}"$'\n'
echo "$SUMMARY" >&2
[ -n "$OUTDIR" ] && printf '%s' "$SUMMARY" > "$OUTDIR/summary.md"
[ "$DEVICE" = cuda ] && [ "$TOTAL" -gt 480 ] && echo "gpu_check.sh: took ${TOTAL}s (> 8 min budget)" >&2
[ ${#FAILED[@]} -eq 0 ]

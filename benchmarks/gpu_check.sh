#!/usr/bin/env bash
# GPU check of kdbench, for the first run on one H100/H200: under 6 minutes, the speed targets
# answered first, every stage with its own time limit, every table kept even if a later stage
# crashes or runs out of time (UNTESTED on a GPU so far: see benchmarks/README.md).
#
#   benchmarks/gpu_check.sh                                 # CUDA (default), < 6 min
#   benchmarks/gpu_check.sh --device cpu --precision bf16   # the CPU stand-in: the same stages
#                                                           # at tiny sizes, bf16 autocast (what
#                                                           # "auto" is on CUDA), ~3 min
# Options: --device cuda|cpu, --precision auto|bf16|fp32 (kdbench's rows; default auto),
# --tiny (CPU sizes on any device), --budget SECONDS (whole run; default 330 on CUDA, 900 CPU),
# --print-commands (each stage's time limit and command, nothing run).
# Environment: OUT=<folder> (default: a new temporary folder, printed at the end) receives
#   summary.md   the targets in ONE table, the stages (exit status, seconds, command), then every
#                stage's table; rewritten after every stage, so it is always current;
#   gpu_check.log   every stage's log (stderr), in order.
# PYTHON=<python> (default python3, with kdbench installed); THREADS=<n> torch CPU threads in
# CPU mode (default 1: this is meant for small shared machines).
# Exit status: 0 when every stage succeeded (parity: every check passed), 1 otherwise.
set -uo pipefail

DEVICE=cuda
PRECISION=auto
TINY=
BUDGET=
PRINT=
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:-}"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --precision) PRECISION="${2:-}"; shift 2 ;;
    --precision=*) PRECISION="${1#*=}"; shift ;;
    --tiny) TINY=1; shift ;;
    --print-commands) PRINT=1; shift ;;
    --budget) BUDGET="${2:-}"; shift 2 ;;
    --budget=*) BUDGET="${1#*=}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device cuda|cpu" >&2; exit 2 ;; esac
case "$PRECISION" in auto|bf16|fp32) ;; *) echo "gpu_check.sh: --precision auto|bf16|fp32" >&2; exit 2 ;; esac
[ "$DEVICE" = cpu ] && TINY=1

START=$(date +%s)  # the budget counts from here (CUDA's check and every stage included)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-$(mktemp -d -t kdbench_gpu_check.XXXXXX)}"
mkdir -p "$OUTDIR"
WORK="$(mktemp -d -t kdbench_gpu_check_work.XXXXXX)"  # per-stage tables and JSON (not in OUT:
                                                      # summary.md holds them all)
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
: > "$WORK/status.tsv"
export PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ] && [ -z "$PRINT" ]; then
  if ! GPU="$("$PY" -c 'import sys, torch
sys.exit(1) if not torch.cuda.is_available() else print(torch.cuda.get_device_name())')"; then
    echo "gpu_check.sh: no CUDA device visible to $PY (use --device cpu)" >&2
    exit 2
  fi
elif [ "$DEVICE" = cuda ]; then
  GPU="(not asked: --print-commands)"
else
  GPU="none (CPU stand-in)"
fi
D=(--device "$DEVICE")
P=(--precision "$PRECISION")
PAIR="wrn_40_2->wrn_16_2"

if [ -z "$TINY" ]; then
  BUDGET="${BUDGET:-330}"  # + at most 10 s for a killed stage to exit: < 6 min in all
  # name | time limit (s) | script and arguments. Sized for one H100/H200 (estimates: the first
  # GPU run is the test): the targets first, then parity, the cache, compile, the step isolation.
  STAGES=(epoch table1 parity logit_cache epoch_compiled step augment)
  declare -A CAP=([epoch]=60 [table1]=100 [parity]=45 [logit_cache]=50 [epoch_compiled]=150
                  [step]=40 [augment]=25)
  # ~20 s: the reference loop's epoch (~5-10 s) and the engine's eager epoch (~2-5 s).
  A_epoch=(epoch.py "${D[@]}" "${P[@]}" --rows reference,eager --json "$WORK/epoch.json")
  # ~80 s: 42 measurements (3 pairs x 13 rows + 3 all-pass margin teachers) x 200 steps; the
  # budget shortens later rows (never below 50 steps) if earlier ones run long.
  A_table1=(table1.py "${D[@]}" "${P[@]}" --steps 200 --min-steps 50 --budget-s 85
            --json "$WORK/table1.json")
  # ~25 s: one pair, every plugin, CUDA bf16 engine path and CUDA fp32 vs CPU fp32 (no fp64).
  A_parity=(parity.py "${D[@]}" "${P[@]}" --pairs "$PAIR" --checks engine,fp32)
  # ~40 s: 2 students x 2 epochs of 50k live and cached, then the exactness check (1 epoch).
  A_logit_cache=(logit_cache.py "${D[@]}" "${P[@]}" --n 50000 --n-test 512 --epochs 2
                 --students 2 --identity-students 2 --identity-epochs 1)
  # the rest of the budget: torch.compile as the engine does it, and mode reduce-overhead.
  A_epoch_compiled=(epoch.py "${D[@]}" "${P[@]}" --rows reference,compiled,reduce-overhead
                    --json "$WORK/epoch_compiled.json")
  # ~25 s: the layouts isolated (engine = channels_last; contiguous; fp32).
  A_step=(step.py "${D[@]}" --pairs "$PAIR" --batch-sizes 64 --steps 30 --rounds 3
          --rows "$PRECISION/engine,$PRECISION/contiguous,fp32/engine")
  # ~15 s: the data path alone, CUDA.
  A_augment=(augment.py "${D[@]}" --rounds 3)
else
  BUDGET="${BUDGET:-900}"
  export THREADS="${THREADS:-1}"
  T=(--threads "$THREADS")
  STAGES=(epoch table1 parity logit_cache epoch_compiled step augment)
  declare -A CAP=([epoch]=120 [table1]=240 [parity]=180 [logit_cache]=180 [epoch_compiled]=150
                  [step]=120 [augment]=90)
  TINYE=(--width-mult 0.125 --n 272 --n-test 128 --warmup 2 --workers 1)
  A_epoch=(epoch.py "${D[@]}" "${P[@]}" "${T[@]}" "${TINYE[@]}" --rows reference,eager
           --json "$WORK/epoch.json")
  A_table1=(table1.py "${D[@]}" "${P[@]}" "${T[@]}" --width-mult 0.125 --n 272 --n-test 64
            --max-batch 16 --steps 1 --min-steps 1 --warmup 1 --json "$WORK/table1.json")
  # the CUDA checks' code paths: the engine's (bf16) and fp32 (on the CPU: against itself)
  A_parity=(parity.py "${D[@]}" "${P[@]}" "${T[@]}" --width-mult 0.125 --pairs "$PAIR"
            --checks engine,fp32 --cpu-fp32-dry-run)
  A_logit_cache=(logit_cache.py "${D[@]}" "${P[@]}" "${T[@]}" --width-mult 0.125 --n 288
                 --n-test 64 --epochs 1 --students 2 --batch-size 64 --identity-students 1)
  # On the CPU the compiled rows use backend aot_eager (inductor takes minutes here).
  A_epoch_compiled=(epoch.py "${D[@]}" "${P[@]}" "${T[@]}" "${TINYE[@]}" --rows reference,compiled
                    --json "$WORK/epoch_compiled.json")
  if [ "$DEVICE" = cpu ]; then CL=channels_last; else CL=engine; fi
  A_step=(step.py "${D[@]}" "${T[@]}" --width-mult 0.25 --n 512 --pairs "$PAIR" --batch-sizes 64
          --steps 1 --rounds 1 --warmup 1 --workers 1
          --rows "$PRECISION/$CL,$PRECISION/contiguous,fp32/engine")
  A_augment=(augment.py "${D[@]}" --n 4096 --rounds 2 --round-images 1024 --workers 1
             --threads "$THREADS")
fi

if [ -n "$PRINT" ]; then  # each stage: name, time limit, then its command (one line each)
  for s in "${STAGES[@]}"; do
    var="A_$s[@]"; a=("${!var}")
    printf '%s\t%s\t%s' "$s" "${CAP[$s]}" "$PY $HERE/${a[0]}"; printf ' %q' "${a[@]:1}"; echo
  done
  rm -rf "$WORK"
  exit 0
fi

FAILED=()
TITLE="kdbench gpu_check: $DEVICE (GPU: $GPU), precision $PRECISION$([ -n "$TINY" ] && echo ', tiny sizes'), $(date -u '+%Y-%m-%d %H:%M UTC')"

write_summary() {
  local footer="${1:-}"
  if ! "$PY" "$HERE/summary.py" --work "$WORK" --title "$TITLE" --stages "$(IFS=,; echo "${STAGES[*]}")" \
       --footer "$footer" > "$OUTDIR/summary.md.tmp" 2>>"$LOG"; then
    # the summary script itself failed: keep the raw tables
    { echo "# $TITLE"; echo; echo "(summary.py failed: raw stage tables follow)";
      cat "$WORK/status.tsv"; for s in "${STAGES[@]}"; do echo; echo "## $s";
      cat "$WORK/$s.md" 2>/dev/null; done; } > "$OUTDIR/summary.md.tmp"
  fi
  mv -f "$OUTDIR/summary.md.tmp" "$OUTDIR/summary.md"
}

stage() {  # stage <name>
  local name="$1" cap="${CAP[$1]}" var="A_$1[@]"
  local args=("${!var}")
  local now left limit t0 rc note dt
  now=$(date +%s)
  left=$(( BUDGET - (now - START) ))
  limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 10 ]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "-" "0" "skipped: the run's time budget is spent" \
      "${args[*]}" >> "$WORK/status.tsv"
    FAILED+=("$name")
    echo "=== $name: skipped (budget spent)" | tee -a "$LOG" >&2
    write_summary
    return 0
  fi
  t0=$(date +%s)
  echo "=== [$(( t0 - START ))s] $name (limit ${limit}s): $PY ${args[*]}" | tee -a "$LOG" >&2
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" "$HERE/${args[0]}" "${args[@]:1}" \
    > "$WORK/$name.md" 2> >(tee -a "$LOG" >&2)
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  case "$rc" in
    0) note="" ;;
    124|137) note="timed out after ${limit}s (its rows measured so far are kept)" ;;
    *) note="exit $rc (see gpu_check.log)" ;;
  esac
  echo "=== $name: exit $rc after ${dt}s $note" | tee -a "$LOG" >&2
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$note" "${args[*]}" >> "$WORK/status.tsv"
  [ "$rc" -ne 0 ] && FAILED+=("$name")
  write_summary
  return 0
}

trap 'write_summary "interrupted after $(( $(date +%s) - START ))s"; exit 130' INT TERM
write_summary
for s in "${STAGES[@]}"; do
  stage "$s"
done
TOTAL=$(( $(date +%s) - START ))
write_summary "Total ${TOTAL}s (budget ${BUDGET}s); failed or skipped stages: ${FAILED[*]:-none}."
cat "$OUTDIR/summary.md"
echo "gpu_check.sh: ${TOTAL}s; summary: $OUTDIR/summary.md, log: $LOG" >&2
rm -rf "$WORK"
[ ${#FAILED[@]} -eq 0 ]

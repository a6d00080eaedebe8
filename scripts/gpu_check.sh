#!/usr/bin/env bash
# GPU check of entropy_lab at Qwen2.5-1.5B scale, within 8 minutes on one H100, no downloads
# (the project is installed with --no-deps; the checkpoint is built here).
#
#   bash scripts/gpu_check.sh [OUT_DIR]                          # on the GPU machine
#   DEVICE=cpu PRESET=smoke bash scripts/gpu_check.sh OUT_DIR    # the same steps, tiny, on a CPU
#
# Phases; each prints wall time, peak GPU memory and tokens/s (where it has tokens):
#   install      pip install --no-deps --no-build-isolation -e .
#   build        Qwen2.5-1.5B's shapes, random weights + a short warm start, LoRA r=64 on
#                q/k/v/o/gate/up/down, AdamW state from real Dr-GRPO steps, RL_Practice
#                layout (scripts/make_big_checkpoint.py)
#   profile      one sweep's phases on it: sampling, gradient, v, jvp oracles, η points
#   pytest       pytest -m gpu --checkpoint=… on a short grid (-n <GPUs> with several GPUs)
#   one_process, torchrun, compare
#                with >= 2 GPUs (or DEVICE=cpu): a 2-process quick sweep against 1 process
#   bench        entropy-lab bench, when this version has it
# Peak GPU memory: nvidia-smi's memory.used sampled every 250 ms, of the busiest GPU (the
# whole process: CUDA context and allocator cache included); the Python phases also write
# torch.cuda.max_memory_allocated into their JSON. Each phase has a time limit, and no phase
# starts past the overall budget (BUDGET_S, default 470 s). Exit status 0: every phase passed.

set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-$(mktemp -d -t entropy_gpu_check.XXXXXX)}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-qwen2.5-1.5b}
PY=${PYTHON:-python}
GRID=${GRID:-1e-6,1e-5,1e-4}
BUDGET_S=${BUDGET_S:-470}  # phases stop starting after this; the last may run to its limit
KEEP_CHECKPOINT=${KEEP_CHECKPOINT:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CKPT="$OUT/checkpoint"
SUMMARY="$OUT/summary.tsv"
LAB=("$PY" -m entropy_lab)
DEADLINE=$((SECONDS + BUDGET_S))
FAILED=0
MONITOR_PID=""
PEAK="-"
printf 'phase\tstatus\twall_s\tpeak_gpu_mib\ttokens_per_s\n' >"$SUMMARY"

NGPU=0
if command -v nvidia-smi >/dev/null 2>&1; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
echo "entropy_lab GPU check: device=$DEVICE preset=$PRESET GPUs=$NGPU budget=${BUDGET_S}s out=$OUT"

monitor_start() {  # $1: file for nvidia-smi's samples
    MONITOR_PID=""
    if ((NGPU > 0)); then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$1" 2>/dev/null &
        MONITOR_PID=$!
    fi
}

monitor_stop() {  # sets PEAK: the largest sample of any one GPU (MiB), or "-"
    PEAK="-"
    if [[ -n "$MONITOR_PID" ]]; then
        kill "$MONITOR_PID" 2>/dev/null
        wait "$MONITOR_PID" 2>/dev/null
        MONITOR_PID=""
        PEAK=$(tr -d ' ' <"$1" | grep -E '^[0-9]+$' | sort -n | tail -n 1)
        PEAK=${PEAK:--}
    fi
}

# phase NAME LIMIT_S TOKENS -- COMMAND...
# TOKENS: "-", or "FILE:EXPR", EXPR a Python expression of the JSON in FILE (named d).
phase() {
    local name=$1 limit=$2 tokens_from=$3
    shift 4
    local log="$OUT/$name.log" left=$((DEADLINE - SECONDS)) start end rc wall tps status=ok
    echo
    if ((left < 20)); then
        echo "== $name: skipped, the ${BUDGET_S}s budget is spent"
        printf '%s\tskipped\t-\t-\t-\n' "$name" >>"$SUMMARY"
        FAILED=1
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    start=$(date +%s.%N)
    monitor_start "$OUT/$name.gpu_mem"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    monitor_stop "$OUT/$name.gpu_mem"
    end=$(date +%s.%N)
    wall=$("$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$end")
    tps="-"
    if [[ "$tokens_from" != "-" && -f "${tokens_from%%:*}" ]]; then
        tps=$("$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print(${tokens_from#*:})" \
            "${tokens_from%%:*}" 2>/dev/null || echo "-")
    fi
    if ((rc == 124 || rc == 137)); then
        status="timeout"
    elif ((rc != 0)); then
        status="failed($rc)"
    fi
    [[ $status == ok ]] || FAILED=1
    grep -v -e 'Warning' -e 'warnings.warn' -e 'Loading weights' "$log" | tail -n 30
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$wall" "$PEAK" "$tps" >>"$SUMMARY"
    echo "-- $name: $status, ${wall} s, peak GPU memory ${PEAK} MiB, tokens/s ${tps}"
    return "$rc"
}

# The project itself; PYTHONPATH too, in case the install cannot run offline.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    # No registry on the GPU machine: no dependencies, no isolated build environment.
    phase install 60 - -- "$PY" -m pip install --no-deps --no-build-isolation -e .
fi

phase build 120 "$OUT/build.json:round(d['sft_tokens_per_s'])" -- \
    "$PY" scripts/make_big_checkpoint.py "$CKPT" --preset "$PRESET" --device "$DEVICE" \
    --json "$OUT/build.json" || {
    echo "no checkpoint: stopping"
    exit 1
}

# The anchor-sized measurement of issue #8 on the GPU (E 2048 × 1, U 64 prompts × 8, 5 η, true
# + first order; target ≤ 300 s), small sizes on the CPU smoke run. tokens/s: response tokens
# processed over the timed phases after loading.
if [[ "$DEVICE" == cpu ]]; then
    PROFILE=(--eval-size 64 --buffer-size 16 --num-generations 4 --learning-rates "$GRID")
else
    PROFILE=(--eval-size 2048 --buffer-size 64 --num-generations 8
        --learning-rates 1e-7,1e-6,1e-5,1e-4,1e-3 --target-s 300)
fi
phase profile 300 "$OUT/profile.json:round(sum(p['tokens'] or 0 for p in d['phases']) / sum(p['seconds'] for p in d['phases'][1:]))" -- \
    "$PY" scripts/profile_phases.py --checkpoint "$CKPT" --device "$DEVICE" \
    "${PROFILE[@]}" --json "$OUT/profile.json"

# Plugin options as --opt=value: pytest picks its rootdir before it loads plugins, and would
# take the value of `--checkpoint DIR` for a test path (and lose pytest.ini).
PYTEST=("$PY" -m pytest -m gpu -p no:cacheprovider -q)
if ! "$PY" -m pip show entropy-lab >/dev/null 2>&1; then
    PYTEST+=(-p entropy_lab.pytest_plugin)  # no entry point without the install
fi
if ((NGPU >= 2)) && [[ "$DEVICE" == cuda ]]; then
    PYTEST+=(-n "$NGPU")  # xdist worker gwK runs on GPU K mod n
fi
phase pytest 90 - -- "${PYTEST[@]}" --checkpoint="$CKPT" --device="$DEVICE" \
    --learning-rates="$GRID" --num-repeats=2 --eval-size=32 \
    --junitxml="$OUT/gpu_junit.xml" --entropy-json="$OUT/gpu_report.json"

if ((NGPU >= 2)) || [[ "$DEVICE" == cpu ]]; then
    # Data-parallel against one process on the tiny checkpoint (fp64: they must agree to 1e-6).
    QUICK=(quick --no-progress --learning-rates 1e-7,1e-6 --num-repeats 2 --eval-size 64
        --buffer-size 8 --microbatch-size 3 --dtype fp64 --device "$DEVICE")
    phase one_process 60 - -- "${LAB[@]}" "${QUICK[@]}" --output-dir "$OUT/one"
    phase torchrun 90 - -- "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
        -m entropy_lab "${QUICK[@]}" --output-dir "$OUT/two"
    phase compare 30 - -- "$PY" scripts/compare_runs.py "$OUT/one" "$OUT/two" --rtol 1e-6
fi

if "${LAB[@]}" bench --help >/dev/null 2>&1; then
    BENCH_HELP=$("${LAB[@]}" bench --help 2>/dev/null)
    BENCH=(bench --device "$DEVICE" --output "$OUT/bench.json")
    # Only the options this version of bench has; small sizes keep it within its limit.
    for option in "--checkpoint $CKPT" "--repeats 2" "--directions 1" "--eval-size 32" \
        "--buffer-size 16"; do
        if grep -q -e "${option%% *}" <<<"$BENCH_HELP"; then
            read -r -a words <<<"$option"
            BENCH+=("${words[@]}")
        fi
    done
    phase bench 90 - -- "${LAB[@]}" "${BENCH[@]}"
else
    echo
    echo "== bench: this version has no \`entropy-lab bench\`; skipped"
fi

[[ "$KEEP_CHECKPOINT" == 1 ]] || rm -rf "$CKPT"
echo
echo "== summary ($SUMMARY; logs and JSON in $OUT), ${SECONDS}s in all"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
exit "$FAILED"

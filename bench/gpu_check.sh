#!/usr/bin/env bash
# The GPU check of issue 15, sized for one short lease: run from the repository root.
#
#   bash bench/gpu_check.sh [OUTDIR] [--device cuda|cpu] [--quick] [--budget SECONDS] [--only STEP,STEP]
#
# OUTDIR defaults to $OUT. Steps, in order of what a lost minute would cost: environment, the
# Fashion-MNIST lists and images (data/fashion_mnist, or unpacked from data/fashion_mnist.tar.gz, which
# travels as one file instead of 70,000), CUDA metrics against the CPU, evaluate_retrieval timed at
# 190k x 5k x 64, training throughput (bench/bench_train.py), the demo trained and tested with --amp, its
# training alone and under torchrun with one process, the test suite, bench/bench_metrics.py, and the demo
# without --amp if 2 minutes are left. --only runs the named steps alone (a rerun of failed ones). Each
# step runs under its own time limit, cut to what is left of --budget (default 420 s, so the whole check
# ends inside 7.5 minutes); a failing step does not stop the
# others. OUTDIR gets at most 8 files: summary.json (every step's status, duration, reason and key
# numbers), gpu_check.log, pytest.log, train.log, bench_train.json, metrics_equal.json and
# bench_metrics.log (or .json). Exit 0 only if no step failed.
#
# --device cpu --quick is the dry run: the same steps at tiny sizes (training on the tests' tiny dataset,
# one test of the suite, the metrics bench's flags only), in about a minute on 2 cores.
# Nothing is installed from the network: tensorboardX comes from the wheels in .whl/ when that folder is
# there, else a no-op stand-in is put on PYTHONPATH for this check only.
set -u

OUTDIR="${OUT:-}"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
    OUTDIR="$1"
    shift
fi
DEVICE=cuda
QUICK=0
BUDGET_S=420
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --budget) BUDGET_S="$2"; shift 2 ;;
        --only) ONLY=",$2,"; shift 2 ;;
        *) echo "usage: bash bench/gpu_check.sh [OUTDIR] [--device cuda|cpu] [--quick] [--budget SECONDS]" \
                "[--only STEP,STEP]" >&2
           exit 2 ;;
    esac
done
if [ -z "$OUTDIR" ]; then
    echo "error: give OUTDIR as the first argument or set OUT" >&2
    exit 2
fi
if [ ! -f train_mmhh.py ]; then
    echo "error: run from the repository root (no train_mmhh.py here)" >&2
    exit 2
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/steps"
LOG="$OUTDIR/gpu_check.log"
STEPS_TSV="$WORK/steps.tsv"
: >"$LOG"
: >"$STEPS_TSV"
HELPER=bench/gpu_check_steps.py
FASHION=data/fashion_mnist
FASHION_ARCHIVE="${FASHION_ARCHIVE:-data/fashion_mnist.tar.gz}"
START_S="$(date +%s)"
DEADLINE_S=$((START_S + BUDGET_S))
RESERVE_S=10      # kept back for the summary
MIN_STEP_S=20     # a step given less than this is not started
# train_mmhh.py's --gpu_id: cpu, or the index of cuda:N (0 for plain cuda).
GPU_ID=cpu
if [ "$DEVICE" != cpu ]; then
    GPU_ID="${DEVICE#cuda}"
    GPU_ID="${GPU_ID#:}"
    GPU_ID="${GPU_ID:-0}"
fi
QUICK_FLAG=()
[ "$QUICK" = 1 ] && QUICK_FLAG=(--quick)

log() {
    echo "$(date +%H:%M:%S) $*" | tee -a "$LOG"
}

now() {
    date +%s.%N
}

seconds_since() {
    awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'
}

# Run one command of the current step with what is left of the step's limit; output to LOGFILE.
run_command() {  # LABEL LOGFILE COMMAND...
    local label="$1" logfile="$2"
    shift 2
    local limit=$((STEP_DEADLINE_S - $(date +%s)))
    [ "$limit" -lt 1 ] && limit=1
    local started rc
    started="$(now)"
    log "  $label: start, limit ${limit}s: $*"
    timeout -k 10 "$limit" "$@" >>"$logfile" 2>&1
    rc=$?
    COMMAND_SECONDS="$(seconds_since "$started")"
    log "  $label: exit $rc after ${COMMAND_SECONDS}s"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        STEP_REASON="$label timed out after ${limit}s"
    elif [ "$rc" != 0 ] && [ -z "$STEP_REASON" ]; then
        STEP_REASON="$label exited with status $rc (see $(basename "$logfile"))"
    fi
    return "$rc"
}

# Run step_NAME under min(LIMIT, what is left of the budget); record its status, duration and reason.
# A step that the budget leaves no time for fails, unless it is optional.
run_step() {  # NAME LIMIT_S [optional]
    local name="$1" limit="$2" optional="${3:-}"
    if [ -n "$ONLY" ] && [ "${ONLY#*,"$name",}" = "$ONLY" ]; then
        record_step "$name" skipped 0 0 "not among --only ${ONLY:1:-1}"
        return
    fi
    local left=$((DEADLINE_S - RESERVE_S - $(date +%s)))
    [ "$limit" -gt "$left" ] && limit="$left"
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        log "== $name: not run, ${left}s of the ${BUDGET_S}s budget left"
        record_step "$name" "$([ -n "$optional" ] && echo skipped || echo failed)" 0 0 \
            "not run: the ${BUDGET_S}s budget was spent"
        return
    fi
    STEP_DEADLINE_S=$(($(date +%s) + limit))
    STEP_STATUS=""
    STEP_REASON=""
    local started rc status
    started="$(now)"
    log "== $name: start, limit ${limit}s"
    "step_$name"
    rc=$?
    if [ "$STEP_STATUS" = skipped ]; then status=skipped
    elif [ "$rc" = 0 ]; then status=passed
    else status=failed; STEP_REASON="${STEP_REASON:-exit status $rc}"
    fi
    local seconds
    seconds="$(seconds_since "$started")"
    log "== $name: $status after ${seconds}s${STEP_REASON:+: $STEP_REASON}"
    record_step "$name" "$status" "$seconds" "$limit" "$STEP_REASON"
}

record_step() {  # NAME STATUS SECONDS LIMIT REASON
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(printf '%s' "$5" | tr '\t\n' '  ')" >>"$STEPS_TSV"
}

seconds_left() {
    echo $((DEADLINE_S - RESERVE_S - $(date +%s)))
}

# tensorboardX: the carried wheels when there are some; else a no-op SummaryWriter for this check only.
provide_tensorboardx() {
    TENSORBOARDX=installed
    if ls .whl/*.whl >/dev/null 2>&1; then
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$WORK/site" .whl/*.whl >>"$LOG" 2>&1; then
            export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
            TENSORBOARDX="wheels from .whl"
        else
            log "installing the wheels in .whl failed (see above)"
        fi
    fi
    if ! "$PYTHON" -c "import tensorboardX" >/dev/null 2>&1; then
        mkdir -p "$WORK/stub/tensorboardX"
        cat >"$WORK/stub/tensorboardX/__init__.py" <<'EOF'
"""Stand-in written by bench/gpu_check.sh: tensorboardX is missing, so TensorBoard logging is off."""


class SummaryWriter:
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):  # add_scalar, add_histogram, close, ...: do nothing
        return lambda *args, **kwargs: None
EOF
        export PYTHONPATH="$WORK/stub${PYTHONPATH:+:$PYTHONPATH}"
        TENSORBOARDX="stub"
        log "tensorboardX missing: TensorBoard logging disabled for this check"
    fi
}

step_environment() {
    if command -v nvidia-smi >/dev/null; then
        run_command nvidia-smi "$LOG" nvidia-smi || return
    fi
    # DataLoader workers pass batches through shared memory: a small /dev/shm breaks the loader.
    df -h /dev/shm >>"$LOG" 2>&1
    run_command environment "$LOG" "$PYTHON" "$HELPER" environment --device "$DEVICE" \
        --tensorboardx "$TENSORBOARDX" --json "$WORK/steps/environment.json"
}

fashion_lists_present() {
    [ -f "$FASHION/train.txt" ] && [ -f "$FASHION/test.txt" ] && [ -f "$FASHION/database.txt" ] \
        && [ -d "$FASHION/images" ]
}

step_fashion_data() {
    if ! fashion_lists_present && [ -f "$FASHION_ARCHIVE" ]; then
        run_command "unpack $FASHION_ARCHIVE" "$LOG" tar -xzf "$FASHION_ARCHIVE" -C "$(dirname "$FASHION")" || return
    fi
    if ! fashion_lists_present; then
        STEP_STATUS=skipped
        STEP_REASON="$FASHION is missing (and no $FASHION_ARCHIVE): build it with"
        STEP_REASON+=" 'python pre_process.py fashion_mnist' (needs the IDX files) or carry it"
        return 0
    fi
    local split counts=""
    for split in train test database; do
        counts+="${counts:+, }$(wc -l <"$FASHION/$split.txt") $split"
    done
    STEP_REASON="$FASHION: $counts lines"
}

step_metrics_equal() {
    run_command metrics-equal "$LOG" "$PYTHON" "$HELPER" metrics-equal --device "$DEVICE" "${QUICK_FLAG[@]}" \
        --json "$OUTDIR/metrics_equal.json" || return
    cp "$OUTDIR/metrics_equal.json" "$WORK/steps/metrics_equal.json"
}

step_metrics_timing() {
    run_command metrics-timing "$LOG" "$PYTHON" "$HELPER" metrics-timing --device "$DEVICE" "${QUICK_FLAG[@]}" \
        --json "$WORK/steps/metrics_timing.json"
}

step_bench_train() {
    run_command bench_train "$LOG" "$PYTHON" bench/bench_train.py --device "$DEVICE" "${QUICK_FLAG[@]}" \
        --json "$OUTDIR/bench_train.json"
    local rc=$?
    # A failed configuration still leaves the others' figures in the JSON.
    if [ -f "$OUTDIR/bench_train.json" ]; then
        run_command bench-train-numbers "$LOG" "$PYTHON" "$HELPER" bench-train-numbers "$OUTDIR/bench_train.json" \
            --json "$WORK/steps/bench_train.json"
    fi
    return "$rc"
}

# The demo's data and recipe: the Makefile's on the device; the dry run trains on the tests' tiny dataset.
# Sets DEMO_DATA_DIR, DEMO_DATASET, DEMO_SIZES, DEMO_WORKERS and DEMO_RECIPE, or STEP_STATUS=skipped.
demo_setup() {
    DEMO_DATA_DIR=data
    DEMO_DATASET=fashion_mnist
    DEMO_SIZES=()
    DEMO_WORKERS="$(nproc)"
    [ "$DEMO_WORKERS" -gt 8 ] && DEMO_WORKERS=8
    if [ "$QUICK" = 1 ]; then
        DEMO_DATA_DIR="$WORK/data"
        DEMO_DATASET=tiny
        DEMO_SIZES=(--num_iters 5 --batch_size 8 --print_every 5)
        DEMO_WORKERS=0
        if [ ! -d "$DEMO_DATA_DIR/tiny" ]; then
            run_command tiny-data "$LOG" "$PYTHON" "$HELPER" tiny-data "$DEMO_DATA_DIR" || return
        fi
    elif ! fashion_lists_present; then
        STEP_STATUS=skipped
        STEP_REASON="$FASHION is missing (see the fashion_data step)"
        return 0
    fi
    local recipe_text
    if ! recipe_text="$("$PYTHON" "$HELPER" demo-flags Makefile 2>>"$LOG")"; then
        STEP_REASON="could not read DEMO_FLAGS from the Makefile"
        return 1
    fi
    mapfile -t DEMO_RECIPE <<<"$recipe_text"
}

# The demo's training with the run's outputs under $WORK: NAME, LOGFILE, then the command before
# train_mmhh.py (python, or python -m torch.distributed.run ...) up to "--", then more train_mmhh.py flags.
demo_train() {
    local name="$1" logfile="$2" launcher=()
    shift 2
    while [ "$1" != -- ]; do launcher+=("$1"); shift; done
    shift
    run_command "$name train" "$logfile" "${launcher[@]}" train_mmhh.py "${DEMO_RECIPE[@]}" --annotation "$name" \
        --s_dataset "$DEMO_DATASET" --data_dir "$DEMO_DATA_DIR" "${DEMO_SIZES[@]}" --gpu_id "$GPU_ID" \
        --workers "$DEMO_WORKERS" --snap_path "$WORK/snapshot/" --log_dir "$WORK/log" --runs_dir "$WORK/runs" \
        --test_output_dir "$WORK/test_output" "$@"
}

# The demo trained and tested on the device: NAME, then train_mmhh.py flags (--amp or none).
demo_run() {
    local name="$1"
    shift
    demo_setup || return
    [ "$STEP_STATUS" = skipped ] && return 0
    local train_log="$OUTDIR/train.log"
    echo "===== $name: train_mmhh.py" >>"$train_log"
    demo_train "$name" "$train_log" "$PYTHON" -- "$@" || return
    local train_s="$COMMAND_SECONDS" snapshot
    snapshot="$(ls "$WORK/snapshot/${name}_"*_iter_* | sort | tail -n 1)"
    echo "===== $name: test_mmhh.py" >>"$train_log"
    run_command "$name test" "$train_log" "$PYTHON" test_mmhh.py --model_path "$snapshot" --dataset "$DEMO_DATASET" \
        --data_dir "$DEMO_DATA_DIR" --radius 2 --batch_size 256 --workers "$DEMO_WORKERS" --gpu_id "$GPU_ID" "$@" \
        --log_dir "$WORK/log" --annotation "$name-test" --output_path "$WORK/test_output/$name" || return
    run_command "$name result" "$LOG" "$PYTHON" "$HELPER" demo-result "$WORK/test_output/$name/metrics.json" \
        --reference test_output/demo/metrics.json --train_s "$train_s" --test_s "$COMMAND_SECONDS" \
        --json "$WORK/steps/$name.json"
}

# Issue 13's one-GPU figures: the demo's training under --amp, alone and under torchrun with one process
# (DistributedDataParallel, the all-gather of the batch's codes, NCCL on CUDA, gloo on the CPU).
step_ddp() {
    demo_setup || return
    [ "$STEP_STATUS" = skipped ] && return 0
    local iterations=(--num_iters 300 --print_every 50 --test_sample_ratio 0.02)
    [ "$QUICK" = 1 ] && iterations=()
    ddp_train ddp_plain "$PYTHON" -- "${iterations[@]}" --amp || return
    local plain_s="$COMMAND_SECONDS"
    ddp_train ddp_torchrun "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -- \
        "${iterations[@]}" --amp || return
    run_command "ddp result" "$LOG" "$PYTHON" "$HELPER" ddp-result "$WORK/ddp_plain.log" "$WORK/ddp_torchrun.log" \
        --plain_s "$plain_s" --torchrun_s "$COMMAND_SECONDS" --json "$WORK/steps/ddp.json"
}

# One training of step_ddp, logged alone to $WORK/NAME.log (ddp-result reads its speed) and copied into
# train.log: NAME, then demo_train's launcher, "--" and flags.
ddp_train() {
    local name="$1"
    shift
    echo "===== $name: train_mmhh.py, launcher and flags: $*" >>"$OUTDIR/train.log"
    demo_train "$name" "$WORK/$name.log" "$@"
    local rc=$?
    cat "$WORK/$name.log" >>"$OUTDIR/train.log"
    return "$rc"
}

step_demo_amp() {
    demo_run demo_amp --amp
}

step_demo_fp32() {
    if [ "$QUICK" = 1 ]; then
        STEP_STATUS=skipped
        STEP_REASON="quick: the demo runs once, with --amp"
    elif [ "$(seconds_left)" -lt 120 ]; then
        STEP_STATUS=skipped
        STEP_REASON="only $(seconds_left)s of the budget left; it runs when 120s are"
    else
        demo_run demo_fp32
    fi
}

step_test_suite() {
    local selection=() parallel=()
    if [ "$QUICK" = 1 ]; then
        # One test that passes and one that needs CUDA: the counting and the CUDA-skip check run too.
        selection=(-k "readme_commands_parse or cuda_matches_cpu")
    elif "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
        # pytest-xdist: the suite takes minutes in one process; half the cores, at most 8.
        local processes=$(($(nproc) / 2))
        [ "$processes" -gt 8 ] && processes=8
        [ "$processes" -ge 2 ] && parallel=(-n "$processes")
    fi
    # This check is running: its own CPU dry run (tests/test_gpu_check.py) is left out.
    run_command pytest "$OUTDIR/pytest.log" "$PYTHON" -m pytest -rs -p no:cacheprovider \
        --junitxml "$WORK/pytest.xml" --ignore=tests/test_gpu_check.py "${parallel[@]}" "${selection[@]}"
    local rc=$?
    [ -f "$WORK/pytest.xml" ] || return "$rc"
    run_command pytest-counts "$LOG" "$PYTHON" "$HELPER" pytest-counts "$WORK/pytest.xml" --device "$DEVICE" \
        --json "$WORK/steps/test_suite.json" || return
    return "$rc"
}

# The metrics bench at 190k x 5k x 64 on the device: `--cases c190k` in its current form, `--sizes full`
# in its first; its CPU baselines at that size are opt-in (--full) and not run here.
step_bench_metrics() {
    local help="$WORK/bench_metrics_help.txt" size=()
    run_command "bench_metrics --help" "$help" "$PYTHON" bench/bench_metrics.py --help || return
    if grep -q -- "--cases" "$help" && grep -q "c190k" "$help"; then
        size=(--cases c190k)
    elif grep -q -- "--sizes" "$help" && grep -q "full" "$help"; then
        size=(--sizes full)
    else
        STEP_REASON="bench/bench_metrics.py takes neither --cases c190k nor --sizes full: update step_bench_metrics"
        return 1
    fi
    local flag
    for flag in --device --repeat; do
        if ! grep -q -- "$flag" "$help"; then
            STEP_REASON="bench/bench_metrics.py has no $flag flag: update step_bench_metrics"
            return 1
        fi
    done
    if [ "$QUICK" = 1 ]; then
        STEP_STATUS=skipped
        STEP_REASON="quick: the metrics bench runs at full size only (it takes --device, --repeat and ${size[*]})"
        return 0
    fi
    local output=()
    grep -q -- "--json" "$help" && output=(--json "$OUTDIR/bench_metrics.json")
    # Best of 2 rather than its default 3: each run is a fresh process that starts CUDA again.
    run_command bench_metrics "$OUTDIR/bench_metrics.log" "$PYTHON" bench/bench_metrics.py --device "$DEVICE" \
        "${size[@]}" --repeat 2 "${output[@]}"
}

main() {
    log "gpu_check: device $DEVICE, quick $QUICK, budget ${BUDGET_S}s, python $PYTHON, output $OUTDIR"
    provide_tensorboardx
    run_step environment 60
    run_step fashion_data 60
    run_step metrics_equal 120
    run_step metrics_timing 120
    run_step bench_train 180
    run_step demo_amp 200
    run_step ddp 120
    run_step test_suite 240
    run_step bench_metrics 150
    run_step demo_fp32 200 optional
    "$PYTHON" "$HELPER" summary "$STEPS_TSV" "$WORK/steps" --device "$DEVICE" "${QUICK_FLAG[@]}" \
        --started "$START_S" --json "$OUTDIR/summary.json" | tee -a "$LOG"
    local rc="${PIPESTATUS[0]}"
    log "gpu_check: finished after $(($(date +%s) - START_S))s, exit $rc;" \
        "files in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
    # What comes back from a lease: at most 8 files.
    [ "$(ls -A "$OUTDIR" | wc -l)" -le 8 ] || log "warning: more than 8 files in $OUTDIR; some will not come back"
    return "$rc"
}

main

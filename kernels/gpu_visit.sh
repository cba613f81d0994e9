#!/usr/bin/env bash
# One GPU visit in one command (README, "Next GPU visit"). The device machines have no network and get the
# working tree without git history, so the versions to compare are written here first:
#
#   bash kernels/gpu_visit.sh prepare     # here: visit/ (the kernel versions to compare), .whl/ (mamba_ssm)
#   bash kernels/gpu_visit.sh run         # there (device tool: carry [".whl", "visit"]); results in $OUT
#   bash kernels/gpu_visit.sh run-splits  # there, a short visit (~3.5 min): the dB/dC head splits only
#   bash kernels/gpu_visit.sh run-batch1  # there, a short visit (~3 min): batch 1 × 2048, eager, 5 rounds
#
# `run` goes through its steps in order of what matters most, each under a time limit, so that one call of
# at most ~9.5 minutes leaves every step's output (kernels.bench rewrites its JSON after each measurement):
#   1. kernels.bench: correctness and timings of this kernel, session 10's first (visit/s10.py: before
#      the dC split) and its last timed one (visit/s10b.py: the split and the cap of 8 head splits, before
#      the closing sums became one Triton program), against torch (also replayed
#      from CUDA graphs) and, last, mamba_ssm
#   2. the whole 370m model, a training step (tokens/s, peak memory)
#   3. the float32 path (cs in two parts) checked on the GPU (its IEEE-precision dots compile slowly:
#      ~200 s for every config on the 2-core VM, fewer seconds on the device's 16 cores)
# Step limits from session 10's first visit (H100): the bench with two baselines took 325 s to reach
# mamba_ssm's 8 × 2048 row (its first compile ~80 s), the model step ~20 s, the fp32 check ~90 s.
# `run-splits` times this kernel against copies of it that differ only in `_DBC_PROGRAMS_PER_SM` (how many
# dCB/dC/dB programs per SM the head splits aim for: 4 here; the copies 8, 2, 1 and 0.5), at 1 × 2048 and
# 8 × 2048, with CUDA graphs: at batch 1 the splits' partial sums and per-split dCB are ~100 MB of traffic.
# `run-batch1` times batch 1 × 2048 (host-bound: single eager readings move by tens of percent) in 5 rounds
# in turns, with CUDA graphs, against visit/s10b.py (the kernel of the README's table): the issue's last
# target, ≥ 10× the torch reference there, and what the closing-sums program did to the host time; and
# where that host time goes (--host-breakdown: Triton's launcher, autograd, this module's Python).
# Each exits 1 if any step failed or ran out of time.
set -u
cd "$(dirname "$0")/.."
SESSION10B=3f7e3ac  # the kernel of the README's H100 table (session 10: the split and the head-split cap)
SESSION10=51c9837  # the kernel of session 10's first visit, before the dC split was merged

start_run() {  # for the run modes: the output folder, mamba_ssm's Triton kernels, the card's name
    for f in visit/s10b.py visit/s10.py visit/pps8.py visit/pps2.py visit/pps1.py visit/pps0.5.py; do
        [ -f "$f" ] || { echo "$f is missing: run 'bash kernels/gpu_visit.sh prepare' first, and carry visit/"; exit 2; }
    done
    out=${OUT:-visit/out}
    mkdir -p "$out"
    mamba_path=
    sdist=$(ls .whl/mamba_ssm-2.3.2.post1.tar.gz 2> /dev/null)
    if [ -n "$sdist" ]; then  # its Triton kernels only (its __init__ imports CUDA extensions)
        mkdir -p /tmp/ms && tar xzf "$sdist" -C /tmp/ms
        mamba_path=/tmp/ms/mamba_ssm-2.3.2.post1
        echo '__version__ = "2.3.2.post1"' > "$mamba_path/mamba_ssm/__init__.py"
    fi
    failed=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
}

step() {  # step NAME SECONDS COMMAND...: its output in $out/NAME.log, its exit status printed
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s): $*"
    PYTHONUNBUFFERED=1 PYTHONPATH="$mamba_path" timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc$([ $rc = 124 ] && echo ' (out of time)') after $SECONDS s in all"
    [ $rc = 0 ] || failed=1
    tail -40 "$out/$name.log"
}

case "${1:-}" in
prepare)
    mkdir -p visit
    git show "$SESSION10B:kernels/ssd_triton.py" > visit/s10b.py
    git show "$SESSION10:kernels/ssd_triton.py" > visit/s10.py
    for pps in 8 2 1 0.5; do  # this kernel with another head-split target (run-splits)
        sed "s/^_DBC_PROGRAMS_PER_SM = 4\$/_DBC_PROGRAMS_PER_SM = $pps/" kernels/ssd_triton.py > "visit/pps$pps.py"
        grep -q "^_DBC_PROGRAMS_PER_SM = $pps\$" "visit/pps$pps.py" || { echo "visit/pps$pps.py: the target was not set"; exit 2; }
    done
    if ! ls .whl/mamba_ssm-*.tar.gz > /dev/null 2>&1; then  # (its build would compile CUDA: metadata only)
        MAMBA_SKIP_CUDA_BUILD=TRUE python3 -m pip download --no-deps --no-binary=:all: --no-build-isolation \
            -d .whl mamba_ssm==2.3.2.post1
    fi
    ls -l visit .whl
    echo 'now, with the device tool (carry: [".whl", "visit"]): bash kernels/gpu_visit.sh run-batch1 first (~3 min),'
    echo 'then run (<= ~9.5 min) or run-splits (~3.5 min); README, "Next GPU visit"'
    ;;
run)
    start_run
    step bench 380 python3 -m kernels.bench --cuda-graphs --baseline visit/s10b.py --baseline visit/s10.py \
        --out "$out/kb.json"
    step model 60 python3 -m minimamba.bench model --device cuda --scale 370m --batch 8 --seqlen 1024 --amp \
        --backend triton --phases train
    step fp32 120 python3 -m kernels.bench --quick --fp32 --no-mamba --shape 1x2048 --out "$out/fp32.json"
    exit $failed
    ;;
run-splits)
    start_run
    step splits 270 python3 -m kernels.bench --cuda-graphs --no-mamba --shape 1x2048 --shape 8x2048 \
        --baseline visit/pps8.py --baseline visit/pps2.py --baseline visit/pps1.py --baseline visit/pps0.5.py \
        --baseline visit/s10.py --out "$out/splits.json"
    exit $failed
    ;;
run-batch1)
    start_run
    step batch1 200 python3 -m kernels.bench --cuda-graphs --no-mamba --shape 1x2048 --rounds 5 --host-breakdown \
        --baseline visit/s10b.py --out "$out/batch1.json"
    exit $failed
    ;;
*)
    echo "usage: bash kernels/gpu_visit.sh prepare|run|run-splits|run-batch1" >&2
    exit 2
    ;;
esac

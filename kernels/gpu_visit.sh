#!/usr/bin/env bash
# One GPU visit in one command (README, "Next GPU visit"). The device machines have no network and get the
# working tree without git history, so the versions to compare are written here first:
#
#   bash kernels/gpu_visit.sh prepare     # here: visit/ (the kernel versions to compare), .whl/ (mamba_ssm)
#   bash kernels/gpu_visit.sh run         # there (device tool: carry [".whl", "visit"]); results in $OUT
#
# `run` goes through its steps in order of what matters most, each under a time limit, so that one call of
# at most ~9.5 minutes leaves every step's output (kernels.bench rewrites its JSON after each measurement):
#   1. kernels.bench: correctness and timings of this kernel, session 7's (the README table's) and the
#      dc-split branch's, against torch (also replayed from CUDA graphs) and, last, mamba_ssm
#   2. the whole 370m model, a training step (tokens/s, peak memory)
#   3. the float32 path (cs in two parts) checked on the GPU (its IEEE-precision dots compile slowly:
#      ~200 s for every config on the 2-core VM, fewer seconds on the device's 16 cores)
# It exits 1 if any step failed or ran out of time.
set -u
cd "$(dirname "$0")/.."
SESSION7=e2919cf  # the commit whose kernel the README's H100 table measured

case "${1:-}" in
prepare)
    mkdir -p visit
    git show "$SESSION7:kernels/ssd_triton.py" > visit/s7.py
    git show dc-split:kernels/ssd_triton.py > visit/dcsplit.py
    if ! ls .whl/mamba_ssm-*.tar.gz > /dev/null 2>&1; then  # (its build would compile CUDA: metadata only)
        MAMBA_SKIP_CUDA_BUILD=TRUE python3 -m pip download --no-deps --no-binary=:all: --no-build-isolation \
            -d .whl mamba_ssm==2.3.2.post1
    fi
    ls -l visit .whl
    echo 'now, with the device tool: bash kernels/gpu_visit.sh run   (carry: [".whl", "visit"])'
    ;;
run)
    out=${OUT:-visit/out}
    mkdir -p "$out"
    for f in visit/s7.py visit/dcsplit.py; do
        [ -f "$f" ] || { echo "$f is missing: run 'bash kernels/gpu_visit.sh prepare' first, and carry visit/"; exit 2; }
    done
    mamba_path=
    sdist=$(ls .whl/mamba_ssm-2.3.2.post1.tar.gz 2> /dev/null)
    if [ -n "$sdist" ]; then  # its Triton kernels only (its __init__ imports CUDA extensions)
        mkdir -p /tmp/ms && tar xzf "$sdist" -C /tmp/ms
        mamba_path=/tmp/ms/mamba_ssm-2.3.2.post1
        echo '__version__ = "2.3.2.post1"' > "$mamba_path/mamba_ssm/__init__.py"
    fi
    failed=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
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
    step bench 330 python3 -m kernels.bench --cuda-graphs --baseline visit/s7.py --baseline visit/dcsplit.py \
        --out "$out/kb.json"
    step model 60 python3 -m minimamba.bench model --device cuda --scale 370m --batch 8 --seqlen 1024 --amp \
        --backend triton --phases train
    step fp32 150 python3 -m kernels.bench --quick --fp32 --no-mamba --shape 1x2048 --out "$out/fp32.json"
    exit $failed
    ;;
*)
    echo "usage: bash kernels/gpu_visit.sh prepare|run" >&2
    exit 2
    ;;
esac

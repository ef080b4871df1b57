#!/usr/bin/env bash
# Runs the bundle that scripts/gpu_bundle.sh made, on the GPU machine (copied there as .gpu/run.sh).
#
#   .gpu/run.sh                 # every bundled test binary, then each bundled example (bench_step)
#   .gpu/run.sh test_parity bench_step    # only these
#   .gpu/run.sh issue21         # the multi-tensor backend's check (issue 21), about 2-4 minutes:
#                               # test_cuda (CUDA parity, incl. the multi-tensor backend against
#                               # torch's fused/foreach CUDA trajectories made here first) and
#                               # `bench_step --device cuda` (4 rounds)
#
# Before the binaries run, tests/fixtures/gen_multi.py makes torch.optim's fused/foreach CUDA
# trajectories with this machine's torch into $OUT/fixtures/multi_cuda.safetensors, which
# test_cuda finds through CASEOPT_MULTI_CUDA. The log is also copied to $OUT/gpu-<gpu>.log (e.g.
# gpu-h100.log), to be committed as docs/gpu-<gpu>.log.
#
# Test binaries run with `--test-threads=1 --nocapture` from the repository root, each under a
# time limit; examples run with `--device cuda`. Everything is tee'd to $OUT/gpu.log ($OUT is set
# by the device tool; else .gpu/out/). The exit status is non-zero if anything failed.
#
# Environment: TORCH_PYTHON (the Python whose torch provides libtorch; default
# /opt/torch/.venv/bin/python3, else python3), CASEOPT_GPU_TIMEOUT (seconds per binary, default
# 300), CASEOPT_GPU_TEST_ARGS (extra libtest arguments, e.g. a name filter),
# CASEOPT_GPU_BENCH_ARGS (extra example arguments).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
out=${OUT:-$here/out}
mkdir -p "$out"
log="$out/gpu.log"
limit=${CASEOPT_GPU_TIMEOUT:-300}

python=${TORCH_PYTHON:-}
if [[ -z "$python" ]]; then
    for p in /opt/torch/.venv/bin/python3 python3; do
        if command -v "$p" >/dev/null && "$p" -c 'import torch' 2>/dev/null; then python=$p; break; fi
    done
fi
[[ -z "$python" ]] || python=$(command -v "$python" || echo "$python")

run_all() {
    echo "== bundle"
    cat "$here/MANIFEST"
    echo "== machine"
    nvidia-smi -L || echo "nvidia-smi failed"
    ldd --version | head -1
    if [[ -z "$python" ]]; then
        echo "no Python with torch found; set TORCH_PYTHON"
        return 1
    fi
    local torch_dir
    torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))') || return 1
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
        "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())'
    "$python" -c 'import sys, torch; v = torch.__version__.split("+")[0]
sys.exit(0 if v == "2.11.0" else f"warning: the bundle was built for torch 2.11.0, this is {v}")' || true
    # The wheel's libraries find the CUDA wheels through their own $ORIGIN rpaths.
    export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # Programs that start `python` themselves (bench_step's PyTorch rows) get the torch one.
    PATH="$(dirname "$python"):$PATH"
    # Tests find their fixtures here; CARGO_MANIFEST_DIR is what cargo test would set at run time.
    export CASEOPT_FIXTURES="$repo/tests/fixtures" CARGO_MANIFEST_DIR="$repo" RUST_BACKTRACE=1
    # Tests that still use env!("CARGO_MANIFEST_DIR") see the build machine's path: make it exist.
    local build_dir
    build_dir=$(cat "$here/build-dir")
    if [[ ! -e "$build_dir" ]]; then
        mkdir -p "$(dirname "$build_dir")" && ln -s "$repo" "$build_dir" &&
            echo "linked $build_dir -> $repo"
    fi

    echo "== torch.optim fused/foreach CUDA trajectories (tests/fixtures/gen_multi.py)"
    if "$python" "$repo/tests/fixtures/gen_multi.py" --device cuda --out "$out/fixtures"; then
        export CASEOPT_MULTI_CUDA="$out/fixtures/multi_cuda.safetensors"
    else
        echo "gen_multi.py failed: the multi-tensor CUDA parity tests will skip"
    fi

    local names=("$@")
    if [[ ${#names[@]} -eq 1 && ${names[0]} == issue21 ]]; then
        names=(test_cuda bench_step)
        export CASEOPT_GPU_BENCH_ARGS=${CASEOPT_GPU_BENCH_ARGS:---rounds 4 --reps 16}
    fi
    if [[ ${#names[@]} -eq 0 ]]; then
        mapfile -t names < <(cat "$here/tests.txt" "$here/examples.txt")
    fi
    echo "== libraries"
    ldd "$here/bin/${names[0]}" | grep -E 'torch|c10|cuda|not found' || true

    cd "$repo" || return 1
    local passed=0 failed=0 failures=() name rc
    for name in "${names[@]}"; do
        [[ -n "$name" ]] || continue
        if [[ ! -x "$here/bin/$name" ]]; then
            echo "== $name: not in the bundle"
            failed=$((failed + 1)); failures+=("$name(missing)")
            continue
        fi
        local args=()
        if grep -qx "$name" "$here/tests.txt"; then
            # shellcheck disable=SC2206  # word-splitting the user's extra arguments is the point
            args=(--test-threads=1 --nocapture ${CASEOPT_GPU_TEST_ARGS:-})
        else
            # shellcheck disable=SC2206
            args=(--device cuda ${CASEOPT_GPU_BENCH_ARGS:-})
        fi
        echo "== $name ${args[*]}"
        local start=$SECONDS
        timeout -k 10 "$limit" "$here/bin/$name" "${args[@]}"
        rc=$?
        echo "== $name: exit $rc after $((SECONDS - start)) s$([[ $rc -eq 124 || $rc -eq 137 ]] && echo " (time limit $limit s)")"
        if [[ $rc -eq 0 ]]; then
            passed=$((passed + 1))
        else
            failed=$((failed + 1)); failures+=("$name($rc)")
        fi
    done
    echo "== summary: ${failures[*]:-no failures}"
    echo "binaries: $passed passed, $failed failed"
    [[ $failed -eq 0 ]]
}

run_all "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# A copy named after the GPU (gpu-h100.log, gpu-h200.log), as docs/ keeps them.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 |
    grep -oiE 'h100|h200|a100|l4|l40s?|b200' | head -1 | tr '[:upper:]' '[:lower:]')
cp "$log" "$out/gpu-${gpu:-unknown}.log"
exit "$status"

#!/usr/bin/env bash
# Build caseopt's test binaries and the bench_step example for a GPU machine whose only libtorch
# is PyTorch 2.11.0+cu130 (no Rust toolchain, no network there), and put them, with a runner, in
# .gpu/ at the root of this checkout.
#
#   scripts/gpu_bundle.sh              # build and bundle (run it here, not through scripts/env.sh)
#   ... copy the working tree plus the ignored .gpu/ folder to the GPU machine, then there:
#   .gpu/run.sh [BINARY...]            # all bundled test binaries, then `bench_step --device cuda`
#
# Why a separate build: caseopt uses tch 0.26 (libtorch 2.13), and a tch binary only runs against
# the libtorch release its torch-sys was written for. tch 0.24.0 is the release for libtorch
# 2.11.0, so this script builds a copy of the workspace with the tch requirement rewritten to
# `=0.24.0`, against the headers and libraries of the PyPI wheel torch==2.11.0 (cp311, manylinux
# x86_64: the cu130 build, the same as the GPU machine's). Nothing in the checkout changes except
# .gpu/. What it does:
#   1. Once: `pip download` the wheel and unpack torch/{include,lib,share} into
#      ${CASEOPT_CACHE:-~/.cache/caseopt}/torch-2.11.0-wheel/torch (~1 GB); the wheel is deleted.
#   2. Copies the files git would see (tracked and untracked-but-not-ignored, mtimes kept so
#      rebuilds stay incremental) to $CASEOPT_GPU_BUILD (default /tmp/caseopt-gpu-build), rewrites
#      the tch requirement, applies the source patches listed in patch_for_tch_0_24 below, and runs
#      `cargo test --release --no-run` and `cargo build --release --example bench_step` there with
#      CARGO_TARGET_DIR=$CASEOPT_GPU_TARGET (default /tmp/caseopt-gpu-target; the first build
#      compiles tch's C++ shim, ~3 min on 2 cores). The main target/ dir is never touched.
#      Link flags (target artifacts only, thanks to an explicit --target):
#        --allow-shlib-undefined  the wheel's libtorch_cpu/libtorch_cuda need the CUDA 13 libraries
#                                 (libcudart.so.13, ...) that exist only on the GPU machine;
#        --no-as-needed -ltorch_cuda  keeps libtorch_cuda.so in DT_NEEDED: tch never calls into it,
#                                 so the default --as-needed drops it, and without it loaded libtorch
#                                 registers no CUDA backend (Cuda::is_available() is false).
#   3. Copies every test executable (libtest harness) and the example, stripped, into .gpu/bin/,
#      writes .gpu/MANIFEST (commit, sizes, what was skipped) and .gpu/run.sh.
# Test binaries built on trybuild are not bundled: they run cargo at test time.
#
# Environment: CASEOPT_CACHE, CASEOPT_GPU_BUILD, CASEOPT_GPU_TARGET (above);
# CASEOPT_GPU_EXAMPLES (space-separated example names, default "bench_step").
# Tools needed here: git, python3 with pip, cargo, strip, readelf.
set -euo pipefail

TORCH_VERSION=2.11.0
TCH_VERSION=0.24.0

say() { printf 'gpu_bundle: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CASEOPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/caseopt}
wheel_dir="$cache/torch-$TORCH_VERSION-wheel"
libtorch="$wheel_dir/torch"
build=${CASEOPT_GPU_BUILD:-/tmp/caseopt-gpu-build}
target_dir=${CASEOPT_GPU_TARGET:-/tmp/caseopt-gpu-target}
examples=${CASEOPT_GPU_EXAMPLES:-bench_step}
bundle="$repo/.gpu"

case "$build" in "$repo" | "$repo"/*) die "CASEOPT_GPU_BUILD must lie outside the checkout";; esac

# --- 1. libtorch 2.11.0 from the PyPI wheel -------------------------------------------------------
if [[ ! -f "$wheel_dir/.complete" ]]; then
    say "downloading torch==$TORCH_VERSION (cp311 manylinux x86_64 wheel, ~530 MB) into $wheel_dir"
    rm -rf "$wheel_dir"
    mkdir -p "$wheel_dir/dl"
    # The platform flags pin the wheel whatever this machine's Python is; --no-deps because only
    # libtorch's own files are needed (the CUDA wheels live on the GPU machine).
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311 \
        "torch==$TORCH_VERSION" -d "$wheel_dir/dl" ||
        die "pip download torch==$TORCH_VERSION failed (is PyPI reachable?)"
    whl=$(ls "$wheel_dir"/dl/torch-"$TORCH_VERSION"-*.whl)
    python3 - "$whl" "$wheel_dir" <<'EOF'
import sys, zipfile
whl, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith(("torch/include/", "torch/lib/", "torch/share/"))]
    z.extractall(dest, names)
EOF
    # torch-sys checks LIBTORCH/build-version against the version it was written for.
    echo "$TORCH_VERSION" >"$libtorch/build-version"
    rm -rf "$wheel_dir/dl"
    touch "$wheel_dir/.complete"
fi
[[ -f "$libtorch/lib/libtorch_cuda.so" ]] || die "$libtorch/lib has no libtorch_cuda.so; remove $wheel_dir and rerun"

# --- 2. the build copy ------------------------------------------------------------------------------
say "copying the working tree to $build"
rm -rf "$build"
mkdir -p "$build"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -f "$f" || -L "$f" ]] && printf '%s\0' "$f"; done |
    tar --null -T - -cf - | tar -xf - -C "$build")

# Rewrites every `tch = ...` and `torch-sys = ...` requirement in the copy's manifests to
# =$TCH_VERSION (the two crates share version numbers, and torch-sys is a direct dependency for
# build.rs).
python3 - "$build" "$TCH_VERSION" <<'EOF'
import pathlib, re, sys
root, version = pathlib.Path(sys.argv[1]), sys.argv[2]
for manifest in root.rglob("Cargo.toml"):
    text = manifest.read_text()
    new = re.sub(r'(?m)^(\s*(?:tch|torch-sys)\s*=\s*)"[^"]*"', rf'\1"={version}"', text)
    new = re.sub(r'(?m)^(\s*(?:tch|torch-sys)\s*=\s*\{[^}\n]*\bversion\s*=\s*)"[^"]*"', rf'\1"={version}"', new)
    if new != text:
        manifest.write_text(new)
        print(f"gpu_bundle: tch -> ={version} in {manifest.relative_to(root)}", file=sys.stderr)
EOF

# Source differences between tch 0.26 and 0.24 that would stop the copy from compiling. Each
# patch is applied to the copy only; a patch whose pattern no longer matches is reported, not fatal.
# The patched file keeps its original mtime so cargo rebuilds it only when the original changes.
patch_file() { # FILE MATCH-ERE SED-EXPRESSION
    local f="$build/$1" before
    [[ -f "$f" ]] || return 0
    if ! grep -qE -- "$2" "$f"; then
        say "patch for $1 no longer matches ($2); skipped"
        return 0
    fi
    before=$(stat -c %Y "$f")
    sed -i -E -- "$3" "$f"
    touch -d "@$before" "$f"
    say "patched $1: $3"
}
patch_for_tch_0_24() {
    # None needed so far: the tree compiles unchanged against tch 0.24. The public API 0.26 has
    # and 0.24 lacks: Tensor::storage_offset, Tensor::get_device (and their f_ forms), the
    # internal_philox_*, internal_upsample_lanczos2d_aa* and
    # internal_flash_attention_forward_no_dropout_inplace ops. Should the tree start using one,
    # add a line here: patch_file PATH-IN-REPO 'ERE-THAT-MUST-MATCH' 'SED-EXPRESSION'.
    return 0
}
patch_for_tch_0_24

# --- build ------------------------------------------------------------------------------------------
host=$(rustc -vV | sed -n 's/^host: //p')
# Whatever the caller's environment says about libtorch (scripts/env.sh sets LIBTORCH_USE_PYTORCH
# and a 2.13 venv), this build uses the 2.11 wheel's files.
unset LIBTORCH_USE_PYTORCH VIRTUAL_ENV LIBTORCH_INCLUDE LIBTORCH_LIB LIBTORCH_STATIC \
    LIBTORCH_BYPASS_VERSION_CHECK CARGO_ENCODED_RUSTFLAGS
export LIBTORCH="$libtorch" LIBTORCH_CXX11_ABI=1 CARGO_TARGET_DIR="$target_dir"
export LD_LIBRARY_PATH="$libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# With --target these flags reach only the target's artifacts, not build scripts or proc macros.
export RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined -C link-arg=-Wl,--no-as-needed -C link-arg=-ltorch_cuda"
# No debug info: smaller binaries and a faster build; symbols are kept for readable backtraces.
export CARGO_PROFILE_RELEASE_DEBUG=false
cargo_args=(--release --target "$host")

cd "$build"
say "building test binaries against libtorch $TORCH_VERSION (target dir $target_dir)"
mkdir -p "$target_dir"
artifacts="$target_dir/gpu-artifacts.json"
cargo test "${cargo_args[@]}" --no-run --message-format=json-render-diagnostics >"$artifacts"
python3 - "$TCH_VERSION" <<'EOF' || die "the build copy does not resolve tch to $TCH_VERSION"
import sys, tomllib
lock = tomllib.load(open("Cargo.lock", "rb"))
versions = {p["version"] for p in lock["package"] if p["name"] == "tch"}
sys.exit(0 if versions == {sys.argv[1]} else f"tch versions in Cargo.lock: {sorted(versions)}")
EOF
known_examples=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
meta = json.load(sys.stdin)
print(" ".join(t["name"] for p in meta["packages"] for t in p["targets"] if "example" in t["kind"]))')
built_examples=()
for ex in $examples; do
    if [[ " $known_examples " == *" $ex "* ]]; then
        say "building example $ex"
        cargo build "${cargo_args[@]}" --example "$ex" --message-format=json-render-diagnostics >>"$artifacts"
        built_examples+=("$ex")
    else
        say "example $ex does not exist in this tree; not bundled"
    fi
done

# --- 3. the bundle ----------------------------------------------------------------------------------
rm -rf "$bundle"
mkdir -p "$bundle/bin"
python3 - "$artifacts" "$bundle" "${built_examples[@]}" <<'EOF'
import json, os, pathlib, shutil, sys
artifacts, bundle, *examples = sys.argv[1:]
bundle = pathlib.Path(bundle)
tests, bins, skipped = [], {}, []
for line in open(artifacts):
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    target = msg["target"]
    if msg["profile"]["test"]:
        # A library's unit tests are named after the library; keep them apart from test targets.
        name = target["name"] + ("-unit" if "lib" in target["kind"] else "")
        if "trybuild" in pathlib.Path(target["src_path"]).read_text():
            skipped.append(f"{name} (trybuild: needs cargo at run time)")
            continue
        tests.append(name)
    elif "example" in target["kind"] and target["name"] in examples:
        name = target["name"]
    else:
        continue
    bins[name] = msg["executable"]
for name, exe in bins.items():
    shutil.copy2(exe, bundle / "bin" / name)
(bundle / "tests.txt").write_text("".join(f"{t}\n" for t in sorted(set(tests))))
(bundle / "examples.txt").write_text("".join(f"{e}\n" for e in examples))
(bundle / "skipped.txt").write_text("".join(f"{s}\n" for s in skipped))
EOF
# Symbols stay (readable backtraces from a run that is costly to repeat) unless the bundle
# grows past 32 MiB; the device tool carries at most 64 MiB with the working tree.
strip --strip-debug "$bundle"/bin/*
if (($(du -sb "$bundle" | cut -f1) > 32 * 1024 * 1024)); then
    say "bundle over 32 MiB: stripping symbols too"
    strip --strip-all "$bundle"/bin/*
fi

# Every binary must pull in libtorch_cuda.so, or CUDA stays invisible on the GPU machine.
for b in "$bundle"/bin/*; do
    readelf -d "$b" | grep -q 'NEEDED.*\[libtorch_cuda\.so\]' || die "$(basename "$b") does not link libtorch_cuda.so"
done

glibc_max=$(for b in "$bundle"/bin/*; do objdump -T "$b"; done | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
glibcxx_max=$(for b in "$bundle"/bin/*; do objdump -T "$b"; done | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1)
{
    echo "built: $(date -u +%FT%TZ) on $(hostname)"
    echo "commit: $(git -C "$repo" rev-parse HEAD)$(git -C "$repo" diff --quiet HEAD && echo '' || echo ' + uncommitted changes')"
    echo "libtorch: $TORCH_VERSION (PyPI wheel, cp311 manylinux x86_64), tch $TCH_VERSION"
    echo "requires: $glibc_max, $glibcxx_max"
    echo "build copy: $build (run.sh links it to the repo when missing, for env!(CARGO_MANIFEST_DIR))"
    echo "tests: $(tr '\n' ' ' <"$bundle/tests.txt")"
    echo "examples: $(tr '\n' ' ' <"$bundle/examples.txt")"
    echo "skipped: $(tr '\n' ' ' <"$bundle/skipped.txt")"
    echo "sizes:"
    (cd "$bundle/bin" && du -b -- * | sort -k2)
    echo "total: $(du -sb "$bundle" | cut -f1) bytes"
} >"$bundle/MANIFEST"
echo "$build" >"$bundle/build-dir"
cp "$repo/scripts/gpu_run.sh" "$bundle/run.sh"
chmod +x "$bundle/run.sh"

cat "$bundle/MANIFEST" >&2
say "bundle ready in $bundle ($(du -sh "$bundle" | cut -f1)); carry '.gpu' and run '.gpu/run.sh' there"

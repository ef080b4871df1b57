#!/usr/bin/env bash
# Release build time of a crate holding one `case_optimizer!` of N disjoint rules plus `_`.
#
#   scripts/env.sh scripts/bench_macro_build.sh [CASEOPT_DIR] [N...]
#
# A benchmark, not a test: it generates a throwaway crate under a temp dir that depends on
# caseopt (CASEOPT_DIR, default: this checkout) by path, builds its dependencies once, then
# prints the time of `cargo build --release` of the crate alone for each N (default 10 50 100
# 200) and each kind of rule: `name("layerI.*")` globs and `bits(I)` widths, as rustc's time
# for the crate in cargo's --timings report (lock waits excluded). Every generated router's
# methods are called, so their code is instantiated as in a real program.
#
# Set CARGO_TARGET_DIR to share compiled dependencies (tch, libtorch's bindings) with another
# build; the crate copies CASEOPT_DIR's Cargo.lock and release profile so they are reused.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
caseopt=$(cd "${1:-$here}" && pwd)
shift || true
counts=("$@")
[[ ${#counts[@]} -gt 0 ]] || counts=(10 50 100 200)

dir=$(mktemp -d "${TMPDIR:-/tmp}/caseopt-bench.XXXXXX")
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/src"
cp "$caseopt/Cargo.lock" "$dir/Cargo.lock"
cat >"$dir/Cargo.toml" <<EOF
[package]
name = "caseopt-bench-macro-build"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
caseopt = { path = "$caseopt" }

[workspace]

[profile.release]
debug = "line-tables-only"
EOF

# main.rs for N rules of one kind.
generate() {
    local kind=$1 n=$2 i
    {
        echo 'use caseopt::case_optimizer;'
        echo 'fn main() -> Result<(), caseopt::Error> {'
        echo '    let mut opt = case_optimizer! {'
        for ((i = 1; i <= n; i++)); do
            case $kind in
                name) echo "        name(\"layer$i.*\") => Sgd<lr: 0.1, momentum: 0.9>," ;;
                bits) echo "        bits($i) => Sgd<lr: 0.1, momentum: 0.9>," ;;
            esac
        done
        echo '        _ => Adam<lr: 1e-3>,'
        echo '    }'
        echo '    .build_from(Vec::new())?;'
        echo '    opt.zero_grad();'
        echo '    opt.step()?;'
        echo '    opt.clip_grad_norm(1.0)?;'
        echo '    opt.clip_grad_norm_per_rule(1.0)?;'
        echo '    println!("{:?} {:?} {}", opt.step_counts(), opt, opt.fingerprint());'
        echo '    Ok(())'
        echo '}'
    } >"$dir/src/main.rs"
}

build() {
    (cd "$dir" && cargo build --release --quiet)
}

# Seconds rustc spent on the bench crate itself, read from cargo's --timings report: waits for
# a shared target dir's lock and other crates' builds are not counted.
crate_seconds() {
    local report
    report=$(cd "$dir" && cargo build --release --timings 2>&1 |
        sed -n 's/.*Timing report saved to \(.*\.html\).*/\1/p')
    [[ -n $report ]] || { say "cargo build failed"; exit 1; }
    awk '/"name": "caseopt-bench-macro-build"/ { found = 1 }
         found && /"duration":/ { gsub(/[^0-9.]/, "", $2); print $2; exit }' "$report"
}

say() { printf '%s\n' "$*" >&2; }

say "bench crate in $dir against $caseopt (target: ${CARGO_TARGET_DIR:-$dir/target})"
generate name 1
say "building the dependencies once..."
build

printf '%-6s %6s %10s\n' kind rules seconds
for kind in name bits; do
    for n in "${counts[@]}"; do
        generate "$kind" "$n"
        printf '%-6s %6d %10.1f\n' "$kind" "$n" "$(crate_seconds)"
    done
done

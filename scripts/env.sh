#!/usr/bin/env bash
# Provision libtorch 2.13.0 for caseopt and run a command against it.
#
#   scripts/env.sh COMMAND [ARGS...]
#
# If LIBTORCH is set (a libtorch 2.13 install of your own), it is used as is.
# Otherwise PyTorch 2.13.0 is installed once from PyPI into a virtual environment under
# ${CASEOPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/caseopt} (outside the checkout; ~4.7 GB,
# ~75 s on a fresh machine), and tch builds against it through LIBTORCH_USE_PYTORCH.
# The command then runs with the library path set so binaries and tests find libtorch.
set -euo pipefail

TORCH_VERSION=2.13.0
cache=${CASEOPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/caseopt}
venv="$cache/torch-$TORCH_VERSION"

say() { printf 'caseopt: %s\n' "$*" >&2; }

if [[ -n "${LIBTORCH:-}" ]]; then
    if [[ ! -d "$LIBTORCH/lib" ]]; then
        say "LIBTORCH=$LIBTORCH has no lib/ directory; point it at a libtorch $TORCH_VERSION install or unset it"
        exit 1
    fi
    libdir="$LIBTORCH/lib"
else
    mkdir -p "$cache"
    # Two commands started at once on a fresh machine install once: the second waits here.
    exec 9>"$cache/.install.lock"
    flock 9
    if [[ ! -f "$venv/.complete" ]]; then
        say "installing PyTorch $TORCH_VERSION (libtorch for tch) into $venv (one time, ~4.7 GB)"
        rm -rf "$venv"
        if ! { python3 -m venv "$venv" &&
               "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
                   --no-cache-dir "torch==$TORCH_VERSION" numpy; }; then
            say "installing torch==$TORCH_VERSION failed (see pip's output above)."
            say "check that PyPI is reachable and that $cache has ~6 GB free, then run again;"
            say "or set LIBTORCH to an existing libtorch $TORCH_VERSION and skip the download."
            rm -rf "$venv"
            exit 1
        fi
        touch "$venv/.complete"
    fi
    exec 9>&-
    export VIRTUAL_ENV="$venv"
    export PATH="$venv/bin:$PATH"
    export LIBTORCH_USE_PYTORCH=1
    libdir=$("$venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
fi

export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CASEOPT_LIBTORCH_LIB="$libdir"
exec "$@"

//! Three jobs, all needing the libtorch that torch-sys found (`DEP_TCH_LIBTORCH_LIB`):
//!
//! 1. Compiles the C++ shim, `runtime/kernels/shim/*.cpp`, against libtorch's headers, with the
//!    same C++ standard and ABI flags torch-sys uses for its own shim. `aten.cpp` (ATen's
//!    `add`/`addcmul`/`addcdiv` with the `alpha`/`value` scalars tch cannot pass, which the
//!    optimizers' libtorch path needs to round as torch.optim does) is always built: torch-sys
//!    compiles its own C++ with the same compiler anyway, so this asks for nothing new; so is
//!    `multi.cpp` (ATen's `_fused_*`/`_foreach_*` optimizer ops, the multi-tensor backend). With the
//!    `fused` feature (the default) the fused kernels' files are added (tensor metadata in bulk,
//!    `at::parallel_for`, the storage swap, the version counters; see those files and their
//!    Rust sides in `runtime/kernels/`), with OpenMP when libtorch uses it (see [`openmp`]).
//! 2. Makes this package's own tests, examples and benchmarks able to use CUDA. Linkers drop a
//!    shared library nothing references by symbol (`--as-needed`), and nothing in a Rust binary
//!    references `libtorch_cuda.so` by symbol: its CUDA kernels register themselves when it is
//!    loaded. Without it, `tch::Cuda::is_available()` is false even on a GPU machine. torch-sys
//!    cannot pass link arguments to its dependents, so each binary crate asks for it; this does
//!    it for caseopt's own binaries when the libtorch in use has CUDA. (A binary crate of yours
//!    that uses CUDA needs the same two lines in its build.rs; see the README.)
//! 3. With the `distributed` feature (the default), compiles `runtime/distributed/shim/c10d.cpp`
//!    (c10d's TCPStore and ProcessGroupGloo; see [`compile_c10d`]).
use std::path::{Path, PathBuf};
use std::process::Command;

/// The C++ files built with or without the `fused` feature: ATen's scalar ops, and its
/// multi-tensor optimizer ops (the multi-tensor backend, which needs no fused kernel).
const ATEN: [&str; 2] = ["runtime/kernels/shim/aten.cpp", "runtime/kernels/shim/multi.cpp"];

/// ATen's gradient-scaling ops for `GradScaler`, also built with or without the `fused` feature.
const AMP: &str = "runtime/kernels/shim/amp.cpp";

/// The C++ files of the fused kernels' shim, compiled with [`ATEN`] into one static library.
const SHIM: [&str; 4] = [
    "runtime/kernels/shim/metadata.cpp",
    "runtime/kernels/shim/parallel.cpp",
    "runtime/kernels/shim/storage.cpp",
    "runtime/kernels/shim/version.cpp",
];

/// The distributed module's shim (c10d's TCPStore and ProcessGroupGloo) and the directory of
/// the gloo declarations it compiles against (see its `gloo/README.md`).
const C10D_SHIM_DIR: &str = "runtime/distributed/shim";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let fused = std::env::var_os("CARGO_FEATURE_FUSED").is_some();
    let distributed = std::env::var_os("CARGO_FEATURE_DISTRIBUTED").is_some();
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        if !(fused || distributed) || std::env::var_os("DOCS_RS").is_some() {
            // torch-sys reports a library whenever it builds one, so this is docs.rs or tch's
            // `doc-only`: nothing is linked there and the shims are not needed.
            return;
        }
        panic!(
            "caseopt: torch-sys did not report where libtorch is (DEP_TCH_LIBTORCH_LIB); \
             build through scripts/env.sh, or set LIBTORCH as tch's README describes"
        );
    };
    let lib = PathBuf::from(lib);
    let files: Vec<&str> =
        ATEN.into_iter().chain([AMP]).chain(SHIM.into_iter().filter(|_| fused)).collect();
    for file in &files {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    compile_shim(&lib, &files, fused);
    if distributed {
        println!("cargo:rerun-if-changed={C10D_SHIM_DIR}");
        compile_c10d(&lib);
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

/// Builds the shim into a static library linked into caseopt (its libtorch symbols are
/// resolved by the libraries torch-sys links); with OpenMP for the fused kernels' files.
fn compile_shim(lib: &Path, files: &[&str], fused: bool) {
    // Both layouts torch-sys accepts keep the headers next to the libraries: `libtorch/lib` and
    // `libtorch/include`, or the wheel's `torch/lib` and `torch/include`.
    let include = lib.parent().map(|p| p.join("include")).unwrap_or_default();
    if !include.join("ATen/core/Tensor.h").exists() {
        panic!(
            "caseopt: no libtorch headers at {} (expected next to {}); a libtorch install with \
             its include/ directory is needed",
            include.display(),
            lib.display()
        );
    }
    let mut build = cc::Build::new();
    if fused {
        openmp(lib, &include, &mut build);
    }
    build
        .cpp(true)
        .files(files)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        // libtorch's headers are its own business: their warnings (C++20 idioms under C++17,
        // as torch-sys compiles them too) are not ours to fix.
        .warnings(false)
        .extra_warnings(false)
        .flag_if_supported("-Wno-c++20-extensions")
        .opt_level(2)
        .compile("caseopt_shim");
}

/// Builds the distributed module's shim (`runtime/distributed/shim/c10d.cpp`) into its own
/// static library: c10d's headers want C++20 (under C++17 they warn) and `USE_C10D_GLOO`
/// (without it `ProcessGroupGloo.hpp` is empty), and gloo's own headers, which the wheel does
/// not ship, are replaced by the declarations under `shim/gloo/`. The symbols resolve in
/// `libtorch_cpu`, which torch-sys links.
fn compile_c10d(lib: &Path) {
    let include = lib.parent().map(|p| p.join("include")).unwrap_or_default();
    if !include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp").exists() {
        panic!(
            "caseopt: the `distributed` feature needs libtorch's c10d headers \
             (torch/csrc/distributed/c10d/ under {}); this libtorch has none. Build without \
             the feature (`--no-default-features --features fused`)",
            include.display()
        );
    }
    for file in ["c10d.cpp", "gloo/context.h", "gloo/rendezvous/store.h", "gloo/transport/device.h"]
    {
        println!("cargo:rerun-if-changed={C10D_SHIM_DIR}/{file}");
    }
    cc::Build::new()
        .cpp(true)
        .file(format!("{C10D_SHIM_DIR}/c10d.cpp"))
        .include(C10D_SHIM_DIR)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++20")
        .define("USE_C10D_GLOO", None)
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .warnings(false)
        .extra_warnings(false)
        .opt_level(1)
        .compile("caseopt_c10d");
}

/// `at::parallel_for` is a header template: under libtorch's OpenMP backend (every Linux wheel
/// and download) it only runs in parallel where the code that instantiates it is compiled with
/// OpenMP; compiled without, it quietly runs every task on the calling thread. So the shim
/// is compiled with `-fopenmp` when libtorch's `ATen/Config.h` says OpenMP, and linked against
/// the very `libgomp` libtorch loads (the one beside it when there is one, by file name, so
/// that both resolve to the same library at run time; the system's otherwise).
fn openmp(lib: &Path, include: &Path, build: &mut cc::Build) {
    let config = std::fs::read_to_string(include.join("ATen/Config.h")).unwrap_or_default();
    if !config.lines().any(|l| l.split_whitespace().eq(["#define", "AT_PARALLEL_OPENMP", "1"])) {
        println!(
            "cargo:warning=caseopt: this libtorch does not use OpenMP; the fused kernels will \
             run on one thread"
        );
        return;
    }
    build.flag("-fopenmp");
    let bundled = std::fs::read_dir(lib).ok().and_then(|dir| {
        let mut names: Vec<String> = dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("libgomp") && n.contains(".so"))
            .collect();
        names.sort();
        names.into_iter().next()
    });
    match bundled {
        // torch-sys already puts `lib` on the search path.
        Some(name) => println!("cargo:rustc-link-lib=dylib:+verbatim={name}"),
        None => println!("cargo:rustc-link-lib=dylib=gomp"),
    }
}

/// The `_GLIBCXX_USE_CXX11_ABI` libtorch was built with, found the way torch-sys finds it:
/// `LIBTORCH_CXX11_ABI` when set, else PyTorch's own answer when tch builds against the Python
/// package, else 1 (every libtorch 2.x download).
fn cxx11_abi() -> String {
    if let Ok(abi) = std::env::var("LIBTORCH_CXX11_ABI") {
        return abi;
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = match std::env::var_os("VIRTUAL_ENV") {
            Some(venv) => PathBuf::from(venv).join("bin/python"),
            None => PathBuf::from("python3"),
        };
        let out = Command::new(&python)
            .args(["-c", "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"])
            .output();
        if let Ok(out) = out {
            let abi = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && (abi == "0" || abi == "1") {
                return abi;
            }
        }
    }
    "1".to_string()
}

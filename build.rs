//! Makes this package's own tests, examples and benchmarks able to use CUDA.
//!
//! Linkers drop a shared library nothing references by symbol (`--as-needed`), and nothing in a
//! Rust binary references `libtorch_cuda.so` by symbol: its CUDA kernels register themselves when
//! it is loaded. Without it, `tch::Cuda::is_available()` is false even on a GPU machine. torch-sys
//! cannot pass link arguments to its dependents, so each binary crate asks for it; this does it
//! for caseopt's own binaries when the libtorch in use has CUDA. (A binary crate of yours that
//! uses CUDA needs the same two lines in its build.rs; see the README.)
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

//! Implementation detail of `caseopt`: the `case_optimizer!` procedural macro.
//! Depend on `caseopt`, which re-exports it.

use proc_macro::TokenStream;

/// Compiles routing rules into a statically dispatched router (see `caseopt`).
#[proc_macro]
pub fn case_optimizer(input: TokenStream) -> TokenStream {
    let _ = input;
    quote::quote!(::core::compile_error!("case_optimizer! is not implemented yet")).into()
}

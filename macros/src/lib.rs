//! Implementation detail of `caseopt`: the `case_optimizer!` procedural macro.
//! Depend on `caseopt`, which re-exports it and documents it.

mod ast;
mod builtin;
mod check;
mod expand;
mod fallback;
mod logic;
#[cfg(test)]
mod proptests;

/// Compiles routing rules into a statically dispatched router (see `caseopt::case_optimizer`).
#[proc_macro]
pub fn case_optimizer(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    expand::case_optimizer(input.into()).into()
}

//! What to emit when there are errors: every error as a `compile_error!` spanned at the user's
//! tokens, next to the expansion of what did parse, so the rest of the user's code still type
//! checks against a router of the expected shape (and IDEs keep completing its methods).

use proc_macro2::TokenStream;
use quote::quote;

use caseopt_rules::ast::{Form, Input};

/// `expansion` preceded by `errors`, in a form valid where the invocation stands.
pub fn with_errors(input: &Input, expansion: TokenStream, errors: Vec<syn::Error>) -> TokenStream {
    if errors.is_empty() {
        return expansion;
    }
    let errors: TokenStream = errors.iter().map(syn::Error::to_compile_error).collect();
    match input.form {
        // At item position both are items.
        Form::Item(_) | Form::Invalid => quote!(#errors #expansion),
        // The expansion is a block; the errors become its first statements.
        Form::Expr => quote!({ #errors #expansion }),
    }
}

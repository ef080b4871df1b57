//! Code generation: one struct per invocation with one concrete field per rule's optimizer, the
//! hidden `RouterParts` impl the runtime builds on, typed accessors and the training methods.
//!
//! Generated code names only `::caseopt::__private`, `::core` and `::std`. User tokens (types,
//! keys, values, predicate functions) keep their spans, so rustc's own errors about them point
//! at what the user wrote.

use proc_macro2::{Literal as Lit, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::Ident;

use caseopt_rules::ast::{
    Atom, Form, HyperparameterArg, Input, OptimizerSpec, Pred, Rule, RulePredicate,
};
use caseopt_rules::check::{self, Analysis};
use caseopt_rules::Field;

use crate::fallback;

/// The whole macro on proc_macro2 types: parse, check, expand; errors become `compile_error!`
/// next to an expansion of what did parse, so one mistake does not bury the user in others.
pub fn case_optimizer(tokens: TokenStream) -> TokenStream {
    let input = Input::parse(tokens);
    let (analysis, check_errors) = check::check(&input);
    let mut errors = input.errors.clone();
    errors.extend(check_errors);
    let expansion = expand(&input, &analysis);
    fallback::with_errors(&input, expansion, errors)
}

/// `::caseopt::__private`.
fn private() -> TokenStream {
    quote!(::caseopt::__private)
}

/// The expansion of a parsed (possibly partial) input.
pub fn expand(input: &Input, analysis: &Analysis) -> TokenStream {
    let p = private();
    let (name, vis, attrs) = match &input.form {
        Form::Item(h) => (h.ident.clone(), h.vis.to_token_stream(), h.attrs.clone()),
        Form::Expr | Form::Invalid => (format_ident!("__CaseOptimizer"), quote!(pub), Vec::new()),
    };
    let rules = &input.rules;
    let fields: Vec<Ident> = rules.iter().map(|r| format_ident!("__rule{}", r.index)).collect();
    // Fields have the user's type as written; every place that needs it to be an optimizer
    // is spanned at the user's path, so if it is not one, each error points there.
    let types: Vec<TokenStream> = rules.iter().map(|r| optimizer_type(&r.optimizer)).collect();
    let spans: Vec<Span> = rules.iter().map(|r| r.optimizer.path.span()).collect();
    let indices: Vec<Lit> = rules.iter().map(|r| Lit::usize_unsuffixed(r.index)).collect();
    let config_types: Vec<TokenStream> = types
        .iter()
        .zip(&spans)
        .map(|(ty, &span)| quote_spanned!(span=> <#ty as ::caseopt::__private::FromConfig>::Config))
        .collect();
    let config_vars: Vec<Ident> = rules
        .iter()
        .map(|r| {
            // Hygienic (mixed-site) so user values cannot see them; located at the user's
            // optimizer so errors about them point there.
            let span = Span::mixed_site().located_at(r.optimizer.path.span());
            Ident::new(&format!("__caseopt_config{}", r.index), span)
        })
        .collect();
    let specs = rules.iter().map(rule_spec);
    let disjoint = analysis.disjoint.iter().map(|&(a, b)| {
        let (a, b) = (Lit::usize_unsuffixed(a), Lit::usize_unsuffixed(b));
        quote!((#a, #b))
    });
    let dyn_casts: Vec<TokenStream> = fields
        .iter()
        .zip(&spans)
        .map(|(f, &span)| {
            let f = Ident::new(&f.to_string(), span);
            quote_spanned!(span=> &self.#f as &dyn ::caseopt::__private::Optimizer)
        })
        .collect();
    let dyn_casts_mut: Vec<TokenStream> = fields
        .iter()
        .zip(&spans)
        .map(|(f, &span)| {
            let f = Ident::new(&f.to_string(), span);
            quote_spanned!(span=> &mut self.#f as &mut dyn ::caseopt::__private::Optimizer)
        })
        .collect();
    // The index and field tokens too, or rustc would widen the span to the whole invocation.
    let at_user = |span: Span, i: &Lit, f: &Ident| {
        let mut i = i.clone();
        i.set_span(span);
        (i, Ident::new(&f.to_string(), span))
    };
    let visits_mut = indices.iter().zip(&fields).zip(&spans).map(|((i, f), &span)| {
        let (i, f) = at_user(span, i, f);
        quote_spanned!(span=> visitor.visit(#i, &mut self.#f)?;)
    });
    let visits = indices.iter().zip(&fields).zip(&spans).map(|((i, f), &span)| {
        let (i, f) = at_user(span, i, f);
        quote_spanned!(span=> visitor.inspect(#i, &self.#f)?;)
    });
    // `assemble` keeps the configs not yet used and the optimizers built so far in one tuple
    // each, so every early return drops two values: with a local per rule, each of the N `?`
    // would drop every other rule's config or optimizer by name, O(N^2) code (200 rules took
    // minutes in LLVM).
    let positions: Vec<syn::Index> = (0..rules.len()).map(syn::Index::from).collect();
    // `master_weights: true` (checked to be a literal) builds the rule's optimizer with f32
    // state for half-precision variables.
    let masters: Vec<bool> = rules
        .iter()
        .map(|r| {
            r.optimizer.hyperparameters.iter().any(|p| {
                p.key == caseopt_rules::builtin::MASTER_WEIGHTS
                    && p.value.literal == Some(caseopt_rules::ast::Literal::Bool(true))
            })
        })
        .collect();
    let builds = indices.iter().zip(&fields).zip(&spans).zip(&types).zip(&positions).zip(&masters).map(
        |(((((i, f), &span), ty), at), &master)| {
            let (i, _) = at_user(span, i, f);
            let call = if master {
                quote_spanned!(span=> ::caseopt::__private::build_rule_master::<#ty>)
            } else {
                quote_spanned!(span=> ::caseopt::__private::build_rule::<#ty>)
            };
            quote! {
                built.#at = ::core::option::Option::Some(#call(&mut assembly, #i, &mut configs.#at)?);
            }
        },
    );

    let has_doc = attrs.iter().any(|a| a.path().is_ident("doc"));
    let default_doc = (!has_doc).then(|| {
        quote! {
            #[doc = "A router generated by `caseopt::case_optimizer!`: one optimizer per rule, variables routed by the rules' predicates."]
            #[doc = ""]
            #[doc = "The training and inspection calls are inherent methods; `variable_store`, `set_non_finite_policy`, `non_finite_policy`, `skipped_steps` and `binarised_variables` are reached through the `caseopt::Router` trait it implements."]
        }
    });
    // Said where a reader of the type looks: what the compiler did not decide costs a check
    // at build instead of a long compile.
    let budget_doc = analysis.budget_ran_out.then(|| {
        quote! {
            #[doc = ""]
            #[doc = "The compile-time exclusivity check reached its work budget: the rule pairs it left undecided are checked when the router is built (see `routing_table().checked_at_build()`)."]
        }
    });
    let struct_def = quote! {
        #(#attrs)*
        #default_doc
        #budget_doc
        #vis struct #name {
            __caseopt_core: #p::RouterCore,
            #( #fields: #types, )*
        }
    };

    let parts_impl = quote! {
        #[allow(unused_variables, unused_mut, unreachable_patterns, clippy::unused_unit)]
        impl #p::RouterParts for #name {
            type Configs = ( #(::core::option::Option<#config_types>,)* );

            fn rule_specs() -> ::std::vec::Vec<#p::RuleSpec> {
                ::std::vec![ #(#specs),* ]
            }

            fn proven_disjoint() -> &'static [(::core::primitive::usize, ::core::primitive::usize)] {
                &[ #(#disjoint),* ]
            }

            fn assemble(configs: Self::Configs, mut assembly: #p::Assembly) -> #p::Result<Self> {
                let mut configs = configs;
                let mut built = ( #(::core::option::Option::<#types>::None,)* );
                #(#builds)*
                match built {
                    ( #(::core::option::Option::Some(#fields),)* ) => ::core::result::Result::Ok(Self {
                        #(#fields,)*
                        __caseopt_core: assembly.finish(),
                    }),
                    _ => ::core::result::Result::Err(#p::rule_not_built()),
                }
            }

            fn core(&self) -> &#p::RouterCore {
                &self.__caseopt_core
            }

            fn core_mut(&mut self) -> &mut #p::RouterCore {
                &mut self.__caseopt_core
            }

            fn for_each_optimizer_mut<__CaseoptV: #p::OptimizerVisitor>(&mut self, visitor: &mut __CaseoptV) -> #p::Result<()> {
                #(#visits_mut)*
                ::core::result::Result::Ok(())
            }

            fn for_each_optimizer<__CaseoptV: #p::OptimizerInspector>(&self, visitor: &mut __CaseoptV) -> #p::Result<()> {
                #(#visits)*
                ::core::result::Result::Ok(())
            }

            fn dyn_optimizer(&self, rule: ::core::primitive::usize) -> ::core::option::Option<&dyn #p::Optimizer> {
                match rule {
                    #( #indices => ::core::option::Option::Some(#dyn_casts), )*
                    _ => ::core::option::Option::None,
                }
            }

            fn dyn_optimizer_mut(&mut self, rule: ::core::primitive::usize) -> ::core::option::Option<&mut dyn #p::Optimizer> {
                match rule {
                    #( #indices => ::core::option::Option::Some(#dyn_casts_mut), )*
                    _ => ::core::option::Option::None,
                }
            }
        }

        impl ::core::fmt::Debug for #name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                #p::debug_router(self, f)
            }
        }
    };

    let accessors = rules.iter().zip(&fields).zip(&types).map(|((rule, field), ty)| {
        let text = format!("{} => {}", rule.predicate, rule.optimizer.text());
        let doc = format!("Rule {}'s optimizer (`{text}`).", rule.index);
        let doc_mut = format!("Rule {}'s optimizer (`{text}`), mutably.", rule.index);
        let mut out = TokenStream::new();
        let mut names = vec![format_ident!("rule{}", rule.index)];
        if let Some(n) = rule.name.as_ref().filter(|_| analysis.named.contains(&rule.index)) {
            names.push(n.clone());
        }
        for n in names {
            let n_mut = format_ident!("{}_mut", n, span = n.span());
            out.extend(quote! {
                #[doc = #doc]
                #vis fn #n(&self) -> &#ty { &self.#field }
                #[doc = #doc_mut]
                #vis fn #n_mut(&mut self) -> &mut #ty { &mut self.#field }
            });
        }
        out
    });

    let (config_items, config_lets) = config_values(rules, analysis, &config_types, &config_vars);
    let builder_value = quote! {
        #(#config_items)*
        #(#config_lets)*
        #p::RouterBuilder::<#name>::new(( #(::core::option::Option::Some(#config_vars),)* ))
    };
    let constructors = match &input.form {
        Form::Item(_) => quote! {
            /// The builder holding the rules' configurations: call `.build(&vs)` or
            /// `.build_from(vars)` on it.
            #vis fn builder() -> #p::RouterBuilder<Self> {
                #builder_value
            }

            /// Routes every trainable variable of `vs` and builds the optimizers; see
            /// `caseopt::RouterBuilder::build`.
            #vis fn build(vs: &#p::VarStore) -> #p::Result<Self> {
                Self::builder().build(vs)
            }

            /// Routes an explicit list of variables and builds the optimizers; see
            /// `caseopt::RouterBuilder::build_from`.
            #vis fn build_from(vars: ::std::vec::Vec<#p::Param>) -> #p::Result<Self> {
                Self::builder().build_from(vars)
            }
        },
        Form::Expr | Form::Invalid => TokenStream::new(),
    };
    let inherent_impl = quote! {
        #[allow(dead_code)]
        impl #name {
            #constructors
            #(#accessors)*

            /// One step of every rule's optimizer, each with its variables' `.grad()`.
            #vis fn step(&mut self) -> #p::Result<()> {
                <Self as #p::Router>::step(self)
            }

            /// Zeroes the gradient of every routed variable.
            #vis fn zero_grad(&mut self) {
                <Self as #p::Router>::zero_grad(self)
            }

            /// `zero_grad`, `loss.backward()`, `step`.
            #vis fn backward_step(&mut self, loss: &#p::Tensor) -> #p::Result<()> {
                <Self as #p::Router>::backward_step(self, loss)
            }

            /// Clips the global gradient norm over all routed variables; returns the norm
            /// before clipping.
            #vis fn clip_grad_norm(&mut self, max_norm: ::core::primitive::f64) -> #p::Result<::core::primitive::f64> {
                <Self as #p::Router>::clip_grad_norm(self, max_norm)
            }

            /// Clips each rule's gradient norm separately; returns the norms before clipping.
            #vis fn clip_grad_norm_per_rule(&mut self, max_norm: ::core::primitive::f64) -> #p::Result<::std::vec::Vec<::core::primitive::f64>> {
                <Self as #p::Router>::clip_grad_norm_per_rule(self, max_norm)
            }

            /// The rules, in order, as written.
            #vis fn rules(&self) -> &[#p::RuleInfo] {
                <Self as #p::Router>::rules(self)
            }

            /// Which rule trains each variable.
            #vis fn routing_table(&self) -> &#p::RoutingTable {
                <Self as #p::Router>::routing_table(self)
            }

            /// A hash of the rules, stable across runs and platforms.
            #vis fn fingerprint(&self) -> ::core::primitive::u64 {
                <Self as #p::Router>::fingerprint(self)
            }

            /// Each rule's optimizer's step count, in rule order.
            #vis fn step_counts(&self) -> ::std::vec::Vec<::core::primitive::u64> {
                <Self as #p::Router>::step_counts(self)
            }

            /// Rule `rule`'s optimizer as a trait object.
            #vis fn optimizer(&self, rule: ::core::primitive::usize) -> ::core::option::Option<&dyn #p::Optimizer> {
                <Self as #p::Router>::optimizer(self, rule)
            }

            /// Rule `rule`'s optimizer as a mutable trait object.
            #vis fn optimizer_mut(&mut self, rule: ::core::primitive::usize) -> ::core::option::Option<&mut dyn #p::Optimizer> {
                <Self as #p::Router>::optimizer_mut(self, rule)
            }
        }
    };

    match &input.form {
        Form::Invalid => TokenStream::new(),
        Form::Item(_) => quote! {
            #struct_def
            #parts_impl
            #inherent_impl
        },
        Form::Expr => quote! {
            {
                #[allow(non_camel_case_types)]
                #struct_def
                #parts_impl
                #inherent_impl
                #builder_value
            }
        },
    }
}

/// The optimizer's type: a built-in name becomes `::caseopt::__private::Name` (with the user's
/// span), anything else is the user's path.
fn optimizer_type(spec: &OptimizerSpec) -> TokenStream {
    match spec.builtin {
        Some(_) => {
            let ident = &spec.path.segments[0].ident;
            quote_spanned!(ident.span()=> ::caseopt::__private::#ident)
        }
        None => spec.path.to_token_stream(),
    }
}

/// `RuleSpec { info, predicate }` for one rule.
fn rule_spec(rule: &Rule) -> TokenStream {
    let p = private();
    let index = Lit::usize_unsuffixed(rule.index);
    let text = rule.predicate.to_string();
    let optimizer = rule.optimizer.text();
    let default = rule.predicate.is_default();
    let name = match &rule.name {
        Some(n) => {
            let n = n.to_string();
            quote!(::core::option::Option::Some(#n))
        }
        None => quote!(::core::option::Option::None),
    };
    let predicate = match &rule.predicate {
        RulePredicate::Default(_) => quote!(#p::Predicate::Any),
        RulePredicate::Formula(pred) => predicate(pred),
    };
    quote! {
        #p::RuleSpec {
            info: #p::RuleInfo {
                index: #index,
                predicate: #text,
                optimizer: #optimizer,
                default: #default,
                name: #name,
            },
            predicate: #predicate,
        }
    }
}

/// The runtime `Predicate` a formula means.
fn predicate(pred: &Pred) -> TokenStream {
    let p = private();
    match pred {
        Pred::Atom(atom) => match atom {
            Atom::Binary => quote!(#p::Predicate::Bits(1)),
            Atom::Bits(n) => {
                let n = Lit::u8_unsuffixed(*n);
                quote!(#p::Predicate::Bits(#n))
            }
            Atom::Ndim(n) => {
                let n = Lit::u64_unsuffixed(*n);
                quote!(#p::Predicate::Ndim(#n))
            }
            Atom::Name(glob) => quote!(#p::name_predicate(#glob)),
            Atom::Dtype(d) => {
                let kind = match *d {
                    "f64" => quote!(Double),
                    "f16" => quote!(Half),
                    "bf16" => quote!(BFloat16),
                    _ => quote!(Float),
                };
                quote!(#p::Predicate::Dtype(#p::Kind::#kind))
            }
            Atom::User { expr, text, .. } => {
                let span = expr.span();
                let call = quote_spanned!(span=> ::caseopt::__private::user_predicate);
                quote!(#call(#text, #expr))
            }
            Atom::Invalid => quote!(#p::Predicate::Or(::std::vec::Vec::new())),
        },
        Pred::Not(inner) => {
            let inner = predicate(inner);
            quote!(#p::not_predicate(#inner))
        }
        Pred::Paren(inner) => predicate(inner),
        Pred::And(ps) | Pred::Or(ps) => {
            let variant = if matches!(pred, Pred::And(_)) { quote!(And) } else { quote!(Or) };
            let ps = ps.iter().map(predicate);
            quote!(#p::Predicate::#variant(::std::vec![#(#ps),*]))
        }
    }
}

/// Type aliases and `let` statements that build each rule's config from the user's values:
/// `Bop<threshold: 1e-6>` becomes `BopConfig { threshold: Into::into(1e-6), ..Default }`
/// through an alias (qualified paths are not allowed in struct literals), keys and values
/// carrying the user's spans.
fn config_values(
    rules: &[Rule],
    analysis: &Analysis,
    config_types: &[TokenStream],
    config_vars: &[Ident],
) -> (Vec<TokenStream>, Vec<TokenStream>) {
    let mut items = Vec::new();
    let mut lets = Vec::new();
    for ((rule, config_type), var) in rules.iter().zip(config_types).zip(config_vars) {
        // Spanned at the user's optimizer, so anything rustc says about the struct literal
        // points there.
        let alias =
            format_ident!("__CaseoptConfig{}", rule.index, span = rule.optimizer.path.span());
        items.push(quote! {
            #[allow(non_camel_case_types)]
            type #alias = #config_type;
        });
        let spec = &rule.optimizer;
        let hypers: Vec<&HyperparameterArg> = spec
            .hyperparameters
            .iter()
            .enumerate()
            .filter(|(position, _)| {
                !analysis.skipped_hyperparameters.contains(&(rule.index, *position))
            })
            .map(|(_, p)| p)
            .collect();
        let value = if hypers.is_empty() {
            quote_spanned!(rule.optimizer.path.span()=> ::core::default::Default::default())
        } else {
            let fields = hypers.iter().map(|param| {
                let key = &param.key;
                let value = value_tokens(spec, param);
                let span =
                    param.value.tokens.clone().into_iter().next().map_or(key.span(), |t| t.span());
                // A built-in's `Value` field (Muon's `ns_steps: usize`, ...) takes the value as
                // its own type: an unsuffixed integer literal then infers the field's integer
                // type, which `Into::into(5)` (an i32) would not.
                let own_type = spec
                    .builtin
                    .and_then(|b| b.field(&key.to_string()))
                    .is_some_and(|f| matches!(f, Field::Value));
                if own_type {
                    return quote!(#key: #value);
                }
                let into = quote_spanned!(span=> ::core::convert::Into::into);
                quote!(#key: #into(#value))
            });
            let default =
                quote_spanned!(rule.optimizer.path.span()=> ::core::default::Default::default());
            quote!(#alias { #(#fields,)* ..#default })
        };
        // The grammar asks for `(...)`/`{...}` around expressions; rustc's lints would call
        // them unnecessary inside `Into::into(...)`.
        lets.push(quote! {
            #[allow(clippy::needless_update, unused_parens, unused_braces)]
            let #var: #alias = #value;
        });
    }
    (items, lets)
}

/// A value's tokens; unsuffixed integer literals for a built-in's numeric fields become float
/// literals, so `lr: 1` means `1.0` (a `Schedule` converts from floats only).
fn value_tokens(spec: &OptimizerSpec, param: &HyperparameterArg) -> TokenStream {
    let numeric = spec
        .builtin
        .and_then(|b| b.field(&param.key.to_string()))
        .is_some_and(|f| matches!(f, Field::Schedule(_) | Field::Float(_)));
    if !numeric {
        return param.value.tokens.clone();
    }
    param
        .value
        .tokens
        .clone()
        .into_iter()
        .map(|tt| match &tt {
            TokenTree::Literal(l) => match syn::parse2::<syn::LitInt>(tt.to_token_stream()) {
                Ok(int) if int.suffix().is_empty() => {
                    let mut float = Lit::f64_unsuffixed(0.0);
                    if let Ok(parsed) = format!("{}.0", int.base10_digits()).parse::<Lit>() {
                        float = parsed;
                    }
                    float.set_span(l.span());
                    TokenTree::Literal(float)
                }
                _ => tt,
            },
            _ => tt,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn expand_str(src: &str) -> String {
        case_optimizer(TokenStream::from_str(src).expect("lexes")).to_string()
    }

    #[test]
    fn expression_form_names_only_private_core_and_std() {
        let out = expand_str("binary => Bop<threshold: 1e-6, gamma: 1>, _ => Adam<lr: 0.01>");
        assert!(!out.contains("compile_error"), "{out}");
        assert!(out.contains(":: caseopt :: __private :: Bop"));
        assert!(out
            .contains("__CaseoptConfig0 { threshold : :: core :: convert :: Into :: into (1e-6)"));
        // `gamma: 1` for a Schedule field becomes a float literal.
        assert!(out.contains("gamma : :: core :: convert :: Into :: into (1.0)"), "{out}");
        assert!(out.contains("proven_disjoint () -> & 'static"));
        assert!(!out.contains("Box"), "no boxing in generated code: {out}");
        // Every mention of the runtime is an absolute path.
        let mentions = out.matches("caseopt ::").count();
        assert!(mentions > 10);
        assert_eq!(out.matches(":: caseopt ::").count(), mentions, "{out}");
    }

    #[test]
    fn item_form_declares_the_type_and_its_builders() {
        let out = expand_str("pub struct Bnn { binary => Bop as bop, _ => Adam }");
        assert!(out.starts_with("# [doc = "), "{out}");
        assert!(out.contains("pub struct Bnn"));
        assert!(
            out.contains("pub fn builder () -> :: caseopt :: __private :: RouterBuilder < Self >")
        );
        assert!(out.contains("pub fn bop_mut (& mut self)"));
        assert!(out.contains("pub fn rule1 (& self)"));
    }

    #[test]
    fn disjoint_pairs_are_emitted() {
        let out = expand_str("binary => Bop, !binary => Adam");
        assert!(out.contains("& [(0 , 1)]"), "{out}");
    }

    #[test]
    fn a_spent_checker_budget_is_noted_in_the_docs() {
        let pairs: Vec<String> =
            (0..12).map(|i| format!(r#"(name("*a{i}*") | name("*b{i}*"))"#)).collect();
        let out = expand_str(&format!(r#"{} & !name("*") => Bop, _ => Adam"#, pairs.join(" & ")));
        assert!(!out.contains("compile_error"), "{out}");
        assert!(out.contains("reached its work budget"), "{out}");
        assert!(!expand_str("binary => Bop, _ => Adam").contains("work budget"));
    }

    #[test]
    fn errors_come_with_the_expansion() {
        let out = expand_str("binary => Bop, binary => Adam");
        assert!(out.contains("compile_error"));
        assert!(out.contains("struct __CaseOptimizer"));
    }

    #[test]
    fn a_broken_item_header_expands_to_errors_only() {
        let out = expand_str("pub struct { binary => Bop }");
        assert!(out.contains("compile_error"));
        assert!(!out.contains("struct __CaseOptimizer"), "{out}");
    }
}

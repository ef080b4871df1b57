//! Property test: the whole macro (parse, check, expand) never panics, whatever tokens it is
//! given, random or mutated from valid invocations. A panic in a proc macro is an
//! unhelpful compiler error ("proc macro panicked") instead of a spanned message.

use std::str::FromStr;

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use proptest::prelude::*;

use crate::expand::case_optimizer;

/// Words the grammar knows, words it does not, and awkward literals.
const VOCABULARY: &[&str] = &[
    "binary",
    "bits",
    "ndim",
    "name",
    "dtype",
    "where",
    "_",
    "=>",
    "=",
    ">",
    "<",
    ",",
    "&",
    "&&",
    "|",
    "||",
    "!",
    ":",
    "::",
    "-",
    "as",
    "pub",
    "struct",
    "#",
    "Bop",
    "Adam",
    "Sgd",
    "my::Opt",
    "lr",
    "gamma",
    "threshold",
    "nesterov",
    "momentum",
    "1",
    "0",
    "-1",
    "1e-6",
    "2.5",
    "1u8",
    "99999999999999999999999999999",
    "\"*.w\"",
    "\"\"",
    "\"é?\"",
    "f32",
    "bf16",
    "f8",
    "true",
    "x::y",
    "'a'",
    "b'x'",
    "é",
    "r#type",
    "fn",
    ";",
    "..",
    "@",
    "$",
    "?",
    "*",
    ".",
];

/// Valid invocations, the seeds of mutation.
const VALID: &[&str] = &[
    "binary => Bop<threshold: 1e-6, gamma: 1e-3>, _ => Adam<lr: 0.01>,",
    "pub struct Bnn { binary => Bop as bop, !binary & ndim(4) => Sgd<lr: 0.1, momentum: 0.9>, _ => Adam }",
    r#"name("*.bias") | dtype(f16) => Sgd<lr: (0.1 * 2.0)>, where(my::pred) & !(bits(2) | ndim(1)) => my::Lion<beta: { 0.9 }>, _ => AdamW"#,
    "#[doc = \"x\"] pub(crate) struct R { bits(4) => Sgd<nesterov: true, momentum: -1>, _ => Adam<eps: 0> }",
    "where(|v| v.ndim() > 1) => Bop2ndOrder<sigma: 2>, _ => RmsProp<alpha: x::Y>",
];

/// Balanced token text: words and bracketed groups of words, nested a few levels.
fn balanced() -> impl Strategy<Value = String> {
    let word = proptest::sample::select(VOCABULARY).prop_map(str::to_string);
    word.prop_recursive(4, 64, 8, |inner| {
        (proptest::collection::vec(inner, 0..8), 0..4usize).prop_map(|(items, delimiter)| {
            let body = items.join(" ");
            match delimiter {
                0 => format!("({body})"),
                1 => format!("{{{body}}}"),
                2 => format!("[{body}]"),
                _ => body,
            }
        })
    })
}

/// A token stream as flat text pieces, groups opened and closed by their own pieces, so that
/// mutations can also unbalance or re-nest them.
fn pieces(tokens: TokenStream, out: &mut Vec<String>) {
    for tt in tokens {
        match tt {
            TokenTree::Group(g) => {
                let (open, close) = match g.delimiter() {
                    Delimiter::Parenthesis => ("(", ")"),
                    Delimiter::Brace => ("{", "}"),
                    Delimiter::Bracket => ("[", "]"),
                    Delimiter::None => ("", ""),
                };
                out.push(open.to_string());
                pieces(g.stream(), out);
                out.push(close.to_string());
            }
            other => out.push(other.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Replace(usize, &'static str),
    Insert(usize, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let word = proptest::sample::select(VOCABULARY);
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Duplicate),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (any::<usize>(), word.clone()).prop_map(|(a, w)| Mutation::Replace(a, w)),
        (any::<usize>(), word).prop_map(|(a, w)| Mutation::Insert(a, w)),
    ]
}

fn mutate(seed: &str, mutations: &[Mutation]) -> String {
    let mut p = Vec::new();
    pieces(TokenStream::from_str(seed).expect("seeds lex"), &mut p);
    for m in mutations {
        if p.is_empty() {
            break;
        }
        let n = p.len();
        match *m {
            Mutation::Delete(i) => {
                p.remove(i % n);
            }
            Mutation::Duplicate(i) => {
                let t = p[i % n].clone();
                p.insert(i % n, t);
            }
            Mutation::Swap(a, b) => p.swap(a % n, b % n),
            Mutation::Replace(i, w) => p[i % n] = w.to_string(),
            Mutation::Insert(i, w) => p.insert(i % (n + 1), w.to_string()),
        }
    }
    p.join(" ")
}

/// Runs the macro on `text` if it lexes (unbalanced brackets never reach a proc macro).
fn run(text: &str) -> Option<TokenStream> {
    let tokens = TokenStream::from_str(text).ok()?;
    Some(case_optimizer(tokens))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_token_streams_never_panic(text in balanced()) {
        run(&text);
    }

    #[test]
    fn mutated_valid_invocations_never_panic(
        seed in proptest::sample::select(VALID),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let text = mutate(seed, &mutations);
        if let Some(out) = run(&text) {
            // Whatever it emits is itself a token stream rustc can read back.
            prop_assert!(TokenStream::from_str(&out.to_string()).is_ok());
        }
    }
}

#[test]
fn the_seeds_are_valid_and_mutation_changes_them() {
    for seed in VALID {
        let out = run(seed).expect("lexes").to_string();
        // Seeds 3 and 4 hold deliberate range errors; the others are clean.
        let expect_errors = seed.contains("momentum: -1") || seed.contains("sigma: 2");
        assert_eq!(out.contains("compile_error"), expect_errors, "{seed}: {out}");
    }
    assert_ne!(mutate(VALID[0], &[Mutation::Delete(0)]), mutate(VALID[0], &[]));
}

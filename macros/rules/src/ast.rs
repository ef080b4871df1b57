//! The input of `case_optimizer!`, parsed into a typed view that keeps the user's tokens for
//! spans.
//!
//! Grammar (`IDENT`, `INT`, `STRING`, `LITERAL`, `PATH`, `EXPR` as in Rust):
//!
//! ```text
//! input     := rules                                       expression form
//!            | ATTRIBUTE* VISIBILITY 'struct' IDENT '{' rules '}'   item form
//! rules     := rule (',' rule)* ','?
//! rule      := predicate '=>' optimizer ('as' IDENT)?
//! predicate := '_'                                          the default rule
//!            | or
//! or        := and ('|' and)*
//! and       := unary ('&' unary)*
//! unary     := '!' unary | '(' or ')' | atom
//! atom      := 'binary'                 declared 1-bit, same as bits(1)
//!            | 'bits' '(' INT ')'       declared INT bits wide (1..=255)
//!            | 'ndim' '(' INT ')'       exactly INT dimensions
//!            | 'name' '(' STRING ')'    full name matches the glob (`*` any run, `?` one char)
//!            | 'dtype' '(' ('f32' | 'f64' | 'f16' | 'bf16') ')'
//!            | 'where' '(' EXPR ')'     a `fn(&VarInfo) -> bool`: a path or a closure
//! optimizer := PATH ('<' (hyper (',' hyper)* ','?)? '>')?
//! hyper     := IDENT ':' value            a hyperparameter
//! value     := '-'? LITERAL | PATH | '(' EXPR ')' | '{' STATEMENTS '}'
//! ```
//!
//! Rules are split at top-level commas before parsing, so a mistake in one rule does not hide
//! the mistakes in the others: every error of an invocation is reported in one build.

use std::fmt;

use proc_macro2::{Delimiter, Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::parse::{ParseStream, Parser};
use syn::{token, Attribute, Ident, LitInt, LitStr, Token, Visibility};

use crate::builtin::OptimizerKind;

/// The keywords of the predicate language that are not Rust keywords (`where` and `_` are).
mod kw {
    syn::custom_keyword!(binary);
    syn::custom_keyword!(bits);
    syn::custom_keyword!(ndim);
    syn::custom_keyword!(name);
    syn::custom_keyword!(dtype);
}

/// Atom names, for "expected one of" messages.
pub const ATOMS: &str =
    "`binary`, `bits(N)`, `ndim(N)`, `name(\"glob\")`, `dtype(f32)`, `where(path::to::fn)`";

/// Names `dtype(...)` accepts, in the order messages list them.
pub const DTYPES: &[&str] = &["f32", "f64", "f16", "bf16"];

/// Deepest nesting accepted, where each `!` and each pair of parentheses is one level (so
/// `!!x` and `((x))` are 2 levels deep, `!(x)` too); deeper input is an error rather than a
/// stack overflow in the compiler.
pub const MAX_DEPTH: usize = 64;

/// A parsed invocation: its form, the rules that parsed, and every error met on the way.
pub struct Input {
    /// Expression or item form.
    pub form: Form,
    /// The rules that parsed (a rule with a syntax error is left out; its error is in
    /// `errors`).
    pub rules: Vec<Rule>,
    /// Syntax errors and errors found while parsing single tokens.
    pub errors: Vec<syn::Error>,
}

/// Which of the two forms the invocation uses.
pub enum Form {
    /// `case_optimizer! { rules }`: evaluates to a builder.
    Expr,
    /// `case_optimizer! { pub struct Name { rules } }`: declares a router type.
    Item(ItemHeader),
    /// An item form whose header did not parse: only its errors are emitted.
    Invalid,
}

/// `#[attrs] vis struct Name` of the item form.
pub struct ItemHeader {
    /// Outer attributes, doc comments included, forwarded to the struct.
    pub attrs: Vec<Attribute>,
    /// The struct's visibility, also given to its generated methods.
    pub vis: Visibility,
    /// The struct's name.
    pub ident: Ident,
}

/// `predicate => Optimizer<...> as name`.
pub struct Rule {
    /// Position among all rules written (also counting rules that failed to parse).
    pub index: usize,
    /// Left-hand side.
    pub predicate: RulePredicate,
    /// The predicate's tokens as written, for spans over the whole predicate.
    pub predicate_tokens: TokenStream,
    /// Right-hand side.
    pub optimizer: OptimizerSpec,
    /// The optional `as name`.
    pub name: Option<Ident>,
}

/// A rule's left-hand side.
pub enum RulePredicate {
    /// `_`.
    Default(Token![_]),
    /// A formula.
    Formula(Pred),
}

impl RulePredicate {
    /// Whether this is the default rule.
    pub fn is_default(&self) -> bool {
        matches!(self, RulePredicate::Default(_))
    }
}

impl fmt::Display for RulePredicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RulePredicate::Default(_) => f.write_str("_"),
            RulePredicate::Formula(p) => p.fmt(f),
        }
    }
}

/// A predicate formula, parentheses kept as written.
pub enum Pred {
    /// One atom.
    Atom(Atom),
    /// `!p`.
    Not(Box<Pred>),
    /// `p & q & ...` (two or more).
    And(Vec<Pred>),
    /// `p | q | ...` (two or more).
    Or(Vec<Pred>),
    /// `(p)`.
    Paren(Box<Pred>),
}

/// Prints the predicate in the macro's own syntax with normalised spacing; parentheses as
/// written. This text is the rule's name in errors, the routing table and the fingerprint.
impl fmt::Display for Pred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pred::Atom(a) => a.fmt(f),
            Pred::Not(p) => write!(f, "!{p}"),
            Pred::Paren(p) => write!(f, "({p})"),
            Pred::And(ps) | Pred::Or(ps) => {
                let sep = if matches!(self, Pred::And(_)) { " & " } else { " | " };
                for (i, p) in ps.iter().enumerate() {
                    if i > 0 {
                        f.write_str(sep)?;
                    }
                    p.fmt(f)?;
                }
                Ok(())
            }
        }
    }
}

/// One atom, as written: what it tests.
pub enum Atom {
    /// `binary`.
    Binary,
    /// `bits(N)`.
    Bits(u8),
    /// `ndim(N)`.
    Ndim(u64),
    /// `name("glob")`.
    Name(String),
    /// `dtype(f32)`: one of [`DTYPES`].
    Dtype(&'static str),
    /// `where(f)`.
    User {
        /// The function, as tokens to emit.
        expr: Box<syn::Expr>,
        /// Identity of the atom: its tokens, whitespace-insensitive.
        key: String,
        /// The function as written, for messages.
        text: String,
    },
    /// An atom that failed to parse (its error is recorded); lowered to "matches nothing".
    Invalid,
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Atom::Binary => f.write_str("binary"),
            Atom::Bits(n) => write!(f, "bits({n})"),
            Atom::Ndim(n) => write!(f, "ndim({n})"),
            Atom::Name(g) => write!(f, "name({g:?})"),
            Atom::Dtype(d) => write!(f, "dtype({d})"),
            Atom::User { text, .. } => write!(f, "where({text})"),
            Atom::Invalid => f.write_str("<invalid>"),
        }
    }
}

/// `Optimizer<key: value, ...>`.
pub struct OptimizerSpec {
    /// The type as written.
    pub path: syn::Path,
    /// The built-in optimizer a single-segment name refers to.
    pub builtin: Option<OptimizerKind>,
    /// The hyperparameters, in order written.
    pub hyperparameters: Vec<HyperparameterArg>,
}

impl OptimizerSpec {
    /// The type's path as written, without hyperparameters (`Bop`, `my::Lion`).
    pub fn text(&self) -> String {
        path_text(&self.path)
    }
}

/// `key: value`.
pub struct HyperparameterArg {
    /// The field name, with the user's span.
    pub key: Ident,
    /// The value.
    pub value: Value,
}

/// A hyperparameter value.
pub struct Value {
    /// The tokens to emit, as written.
    pub tokens: TokenStream,
    /// The value, when it is a literal the macro can read.
    pub literal: Option<Literal>,
}

/// A literal value the macro can check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Literal {
    /// A number; `integer` when written without a fraction or exponent (`1`, `-3`).
    Number {
        /// Its value.
        value: f64,
        /// Written as an integer literal without suffix.
        integer: bool,
    },
    /// `true` or `false`.
    Bool(bool),
}

/// `a::b::C` with its leading `::`, no spaces.
pub fn path_text(path: &syn::Path) -> String {
    let mut s = String::new();
    if path.leading_colon.is_some() {
        s.push_str("::");
    }
    for (i, seg) in path.segments.iter().enumerate() {
        if i > 0 {
            s.push_str("::");
        }
        s.push_str(&seg.ident.to_string());
    }
    s
}

impl Input {
    /// Parses an invocation; never panics and never fails: problems are collected in `errors`.
    pub fn parse(tokens: TokenStream) -> Input {
        let mut errors = Vec::new();
        let (form, body, body_span) = match split_item_header(tokens, &mut errors) {
            Some(parts) => parts,
            None => return Input { form: Form::Invalid, rules: Vec::new(), errors },
        };
        let mut rules = Vec::new();
        let chunks = split_rules(body);
        let count = chunks.len();
        for (index, chunk) in chunks.into_iter().enumerate() {
            if chunk.tokens.is_empty() {
                // A trailing comma leaves an empty last chunk; anywhere else it is `,,`.
                if index + 1 < count || chunk.comma.is_some() {
                    let span = chunk.comma.unwrap_or(body_span);
                    errors.push(syn::Error::new(
                        span,
                        "expected a rule before `,`; remove the extra comma",
                    ));
                }
                continue;
            }
            let mut local = Vec::new();
            let parser = |input: ParseStream| parse_rule(input, index, &mut local);
            match parser.parse2(chunk.tokens) {
                Ok(rule) => rules.push(rule),
                Err(e) => errors.push(e),
            }
            errors.extend(local);
        }
        if rules.is_empty() && errors.is_empty() {
            errors.push(syn::Error::new(
                body_span,
                "expected at least one rule, e.g. `binary => Bop, _ => Adam<lr: 1e-3>`",
            ));
        }
        Input { form, rules, errors }
    }
}

/// Splits off `#[attrs] vis struct Name { ... }` when present; returns the form, the rules'
/// tokens and a span to blame for empty input.
fn split_item_header(
    tokens: TokenStream,
    errors: &mut Vec<syn::Error>,
) -> Option<(Form, TokenStream, Span)> {
    let first = tokens.clone().into_iter().next();
    let is_item = match &first {
        Some(TokenTree::Punct(p)) => p.as_char() == '#',
        Some(TokenTree::Ident(i)) => i == "pub" || i == "struct",
        _ => false,
    };
    if !is_item {
        return Some((Form::Expr, tokens, Span::call_site()));
    }
    let parser = |input: ParseStream| -> syn::Result<(ItemHeader, TokenStream, Span)> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        input.parse::<Token![struct]>()?;
        let ident: Ident = input.parse()?;
        if input.peek(Token![<]) {
            return Err(input.error(
                "a router type cannot have generic parameters; remove them (rules name concrete optimizers)",
            ));
        }
        if !input.peek(token::Brace) {
            return Err(input.error(format!(
                "expected `{{` and the rules after `struct {ident}`, e.g. `struct {ident} {{ binary => Bop, _ => Adam }}`"
            )));
        }
        let content;
        let brace = syn::braced!(content in input);
        let body: TokenStream = content.parse()?;
        if !input.is_empty() {
            return Err(input.error("unexpected tokens after the rules' closing `}`; remove them"));
        }
        Ok((ItemHeader { attrs, vis, ident }, body, brace.span.join()))
    };
    match parser.parse2(tokens) {
        Ok((header, body, span)) => Some((Form::Item(header), body, span)),
        Err(e) => {
            errors.push(e);
            None
        }
    }
}

/// One rule's tokens and the comma that ended it.
struct Chunk {
    tokens: TokenStream,
    comma: Option<Span>,
}

/// Splits the rules at commas outside `<...>` (groups are single tokens already). `>` closes an
/// angle bracket unless it ends a `=>`.
fn split_rules(body: TokenStream) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut depth = 0usize;
    let mut joint_eq = false;
    for tt in body {
        let mut after_joint_eq = false;
        if let TokenTree::Punct(p) = &tt {
            match p.as_char() {
                ',' if depth == 0 => {
                    chunks.push(Chunk {
                        tokens: std::mem::take(&mut current).into_iter().collect(),
                        comma: Some(p.span()),
                    });
                    joint_eq = false;
                    continue;
                }
                '<' => depth += 1,
                '>' if !joint_eq => depth = depth.saturating_sub(1),
                '=' => after_joint_eq = p.spacing() == proc_macro2::Spacing::Joint,
                _ => {}
            }
        }
        joint_eq = after_joint_eq;
        current.push(tt);
    }
    chunks.push(Chunk { tokens: current.into_iter().collect(), comma: None });
    chunks
}

/// Parses one rule; recoverable problems go to `errors`, syntax errors end the rule.
fn parse_rule(input: ParseStream, index: usize, errors: &mut Vec<syn::Error>) -> syn::Result<Rule> {
    let fork = input.fork();
    let predicate = if input.peek(Token![_]) && input.peek2(Token![=>]) {
        RulePredicate::Default(input.parse()?)
    } else {
        RulePredicate::Formula(parse_or(input, errors, 0)?)
    };
    let predicate_tokens = tokens_between(&fork, input);
    if !input.peek(Token![=>]) {
        return Err(if input.is_empty() {
            syn::Error::new_spanned(
                &predicate_tokens,
                "expected `=>` and an optimizer after the predicate, e.g. `binary => Bop`",
            )
        } else {
            input.error("expected `=>`; combine predicates with `&`, `|`, `!` and parentheses")
        });
    }
    input.parse::<Token![=>]>()?;
    let optimizer = parse_optimizer(input)?;
    let name = if input.peek(Token![as]) {
        input.parse::<Token![as]>()?;
        Some(input.parse::<Ident>().map_err(|e| {
            syn::Error::new(e.span(), "expected a rule name after `as`, e.g. `as bop`")
        })?)
    } else {
        None
    };
    if !input.is_empty() {
        return Err(input.error("unexpected token after the rule; separate rules with `,`"));
    }
    Ok(Rule { index, predicate, predicate_tokens, optimizer, name })
}

/// The tokens `input` consumed since `start` was forked from it.
fn tokens_between(start: ParseStream, input: ParseStream) -> TokenStream {
    let end = input.cursor();
    let mut out = TokenStream::new();
    let mut cursor = start.cursor();
    while cursor != end {
        match cursor.token_tree() {
            Some((tt, next)) => {
                out.extend(std::iter::once(tt));
                cursor = next;
            }
            None => break,
        }
    }
    out
}

fn too_deep(input: ParseStream, depth: usize) -> syn::Result<()> {
    if depth > MAX_DEPTH {
        Err(input.error(format!(
            "predicate nested more than {MAX_DEPTH} levels deep (each `!` and each `( )` is a level); simplify it"
        )))
    } else {
        Ok(())
    }
}

fn parse_or(input: ParseStream, errors: &mut Vec<syn::Error>, depth: usize) -> syn::Result<Pred> {
    too_deep(input, depth)?;
    let mut items = vec![parse_and(input, errors, depth)?];
    while input.peek(Token![|]) {
        if input.peek(Token![||]) {
            let op: Token![||] = input.parse()?;
            errors.push(syn::Error::new_spanned(
                op,
                "write `|` instead of `||`: predicates combine with `!`, `&` and `|`",
            ));
        } else {
            input.parse::<Token![|]>()?;
        }
        items.push(parse_and(input, errors, depth)?);
    }
    Ok(if items.len() == 1 { items.remove(0) } else { Pred::Or(items) })
}

fn parse_and(input: ParseStream, errors: &mut Vec<syn::Error>, depth: usize) -> syn::Result<Pred> {
    let mut items = vec![parse_unary(input, errors, depth)?];
    while input.peek(Token![&]) {
        if input.peek(Token![&&]) {
            let op: Token![&&] = input.parse()?;
            errors.push(syn::Error::new_spanned(
                op,
                "write `&` instead of `&&`: predicates combine with `!`, `&` and `|`",
            ));
        } else {
            input.parse::<Token![&]>()?;
        }
        items.push(parse_unary(input, errors, depth)?);
    }
    Ok(if items.len() == 1 { items.remove(0) } else { Pred::And(items) })
}

fn parse_unary(
    input: ParseStream,
    errors: &mut Vec<syn::Error>,
    depth: usize,
) -> syn::Result<Pred> {
    too_deep(input, depth)?;
    if input.peek(Token![!]) {
        input.parse::<Token![!]>()?;
        return Ok(Pred::Not(Box::new(parse_unary(input, errors, depth + 1)?)));
    }
    if input.peek(token::Paren) {
        let content;
        syn::parenthesized!(content in input);
        if content.is_empty() {
            return Err(content.error(format!("expected a predicate inside `()`: one of {ATOMS}")));
        }
        let inner = parse_or(&content, errors, depth + 1)?;
        if !content.is_empty() {
            return Err(content.error("expected `&`, `|` or `)`"));
        }
        return Ok(Pred::Paren(Box::new(inner)));
    }
    parse_atom(input, errors).map(Pred::Atom)
}

fn parse_atom(input: ParseStream, errors: &mut Vec<syn::Error>) -> syn::Result<Atom> {
    if input.peek(kw::binary) {
        input.parse::<kw::binary>()?;
        return Ok(Atom::Binary);
    }
    if input.peek(kw::bits) || input.peek(kw::ndim) {
        let is_bits = input.peek(kw::bits);
        let word = if is_bits { "bits" } else { "ndim" };
        let keyword: Ident = syn::ext::IdentExt::parse_any(input)?;
        let lit: LitInt = parenthesized_arg(input, &keyword, &format!("`{word}(2)`"))?;
        let value = lit.base10_parse::<u64>().ok();
        if is_bits {
            return Ok(match value.and_then(|v| u8::try_from(v).ok()).filter(|&v| v > 0) {
                Some(v) => Atom::Bits(v),
                None => {
                    errors.push(syn::Error::new(
                        lit.span(),
                        "a bit width must be between 1 and 255; `binary` is `bits(1)`",
                    ));
                    Atom::Invalid
                }
            });
        }
        return Ok(match value {
            Some(v) => Atom::Ndim(v),
            None => {
                errors.push(syn::Error::new(
                    lit.span(),
                    "expected a number of dimensions, e.g. `ndim(2)`",
                ));
                Atom::Invalid
            }
        });
    }
    if input.peek(kw::name) {
        let keyword: Ident = syn::ext::IdentExt::parse_any(input)?;
        let lit: LitStr = parenthesized_arg(input, &keyword, "`name(\"*.weight\")`")?;
        return Ok(Atom::Name(lit.value()));
    }
    if input.peek(kw::dtype) {
        let keyword: Ident = syn::ext::IdentExt::parse_any(input)?;
        let ty: Ident = parenthesized_arg(input, &keyword, "`dtype(f32)`")?;
        let name = ty.to_string();
        return Ok(match DTYPES.iter().find(|d| **d == name) {
            Some(d) => Atom::Dtype(d),
            None => {
                let expected =
                    DTYPES.iter().map(|d| format!("`{d}`")).collect::<Vec<_>>().join(", ");
                errors.push(syn::Error::new(
                    ty.span(),
                    format!("unknown dtype `{name}`; expected one of: {expected}"),
                ));
                Atom::Invalid
            }
        });
    }
    if input.peek(Token![where]) {
        input.parse::<Token![where]>()?;
        if !input.peek(token::Paren) {
            return Err(input.error("expected `(` after `where`, e.g. `where(my::is_embedding)`"));
        }
        let content;
        let paren = syn::parenthesized!(content in input);
        if content.is_empty() {
            return Err(content.error(
                "expected a function inside `where(...)`: a path to a `fn(&VarInfo) -> bool` or a closure",
            ));
        }
        let expr: syn::Expr = content.parse()?;
        if !content.is_empty() {
            return Err(content.error("unexpected token; `where(...)` takes one function"));
        }
        let key = expr.to_token_stream().to_string();
        let text = paren
            .span
            .join()
            .source_text()
            .and_then(|s| Some(s.strip_prefix('(')?.strip_suffix(')')?.to_string()))
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| match &expr {
                syn::Expr::Path(p) if p.qself.is_none() => path_text(&p.path),
                _ => key.clone(),
            });
        return Ok(Atom::User { expr: Box::new(expr), key, text });
    }
    if input.peek(Token![_]) {
        let underscore: Token![_] = input.parse()?;
        errors.push(syn::Error::new_spanned(
            underscore,
            "`_` is the default rule and stands alone: write `_ => Optimizer` as the last rule",
        ));
        return Ok(Atom::Invalid);
    }
    if input.peek(syn::Ident) {
        let ident: Ident = syn::ext::IdentExt::parse_any(input)?;
        // Swallow an argument list so the rest of the rule still parses.
        if input.peek(token::Paren) {
            let _content;
            syn::parenthesized!(_content in input);
        }
        errors.push(syn::Error::new(
            ident.span(),
            format!("unknown predicate `{ident}`; expected one of: {ATOMS}"),
        ));
        return Ok(Atom::Invalid);
    }
    Err(input.error(format!("expected a predicate: one of {ATOMS}, or `_`")))
}

/// `(ARG)` after an atom keyword.
fn parenthesized_arg<T: syn::parse::Parse>(
    input: ParseStream,
    keyword: &Ident,
    example: &str,
) -> syn::Result<T> {
    if !input.peek(token::Paren) {
        return Err(syn::Error::new(
            keyword.span(),
            format!("`{keyword}` takes an argument in parentheses, e.g. {example}"),
        ));
    }
    let content;
    syn::parenthesized!(content in input);
    let arg = content
        .parse::<T>()
        .map_err(|e| syn::Error::new(e.span(), format!("expected an argument like {example}")))?;
    if !content.is_empty() {
        return Err(content.error(format!("`{keyword}` takes one argument, e.g. {example}")));
    }
    Ok(arg)
}

fn parse_optimizer(input: ParseStream) -> syn::Result<OptimizerSpec> {
    if !(input.peek(syn::Ident) || input.peek(Token![::])) {
        return Err(input
            .error("expected an optimizer after `=>`, e.g. `Bop<threshold: 1e-6>` or `my::Lion`"));
    }
    let path = syn::Path::parse_mod_style(input)?;
    let builtin = match (&path.leading_colon, path.segments.len()) {
        (None, 1) => OptimizerKind::from_type_name(&path.segments[0].ident.to_string()),
        _ => None,
    };
    let mut hyperparameters = Vec::new();
    if input.peek(Token![<]) {
        input.parse::<Token![<]>()?;
        loop {
            if input.peek(Token![>]) {
                break;
            }
            let key: Ident = input.parse().map_err(|e| {
                syn::Error::new(e.span(), "expected a hyperparameter name, e.g. `lr: 1e-3`, or `>`")
            })?;
            if !input.peek(Token![:]) || input.peek(Token![::]) {
                return Err(input.error(format!("expected `:` after `{key}`, e.g. `{key}: 1e-3`")));
            }
            input.parse::<Token![:]>()?;
            let value = parse_value(input, &key)?;
            hyperparameters.push(HyperparameterArg { key, value });
            if input.peek(Token![,]) {
                input.parse::<Token![,]>()?;
            } else if !input.peek(Token![>]) {
                return Err(input.error(format!(
                    "expected `,` or `>` after the value of `{}`; wrap an expression in parentheses: `{}: (...)`",
                    hyperparameters[hyperparameters.len() - 1].key,
                    hyperparameters[hyperparameters.len() - 1].key,
                )));
            }
        }
        input.parse::<Token![>]>()?;
    }
    Ok(OptimizerSpec { path, builtin, hyperparameters })
}

fn parse_value(input: ParseStream, key: &Ident) -> syn::Result<Value> {
    let fork = input.fork();
    let literal = if input.peek(Token![-]) {
        input.parse::<Token![-]>()?;
        let lit: syn::Lit = input.parse().map_err(|e| {
            syn::Error::new(
                e.span(),
                "expected a number after `-`; wrap expressions in parentheses",
            )
        })?;
        match number(&lit) {
            Some(Literal::Number { value, integer }) => {
                Some(Literal::Number { value: -value, integer })
            }
            _ => {
                return Err(syn::Error::new(
                    lit.span(),
                    "expected a number after `-`; wrap expressions in parentheses",
                ))
            }
        }
    } else if input.peek(syn::Lit) {
        let lit: syn::Lit = input.parse()?;
        number(&lit)
    } else if input.peek(token::Paren) || input.peek(token::Brace) {
        input.parse::<TokenTree>()?;
        None
    } else if input.peek(syn::Ident) || input.peek(Token![::]) {
        syn::Path::parse_mod_style(input)?;
        None
    } else if input.peek(token::Bracket) {
        let group: proc_macro2::Group = input.parse()?;
        debug_assert_eq!(group.delimiter(), Delimiter::Bracket);
        return Err(syn::Error::new(
            group.span(),
            format!("wrap an array in parentheses: `{key}: ([...])`"),
        ));
    } else {
        return Err(input.error(format!(
            "expected a value for `{key}`: a literal, a path, or an expression in parentheses `({key}: (...))`"
        )));
    };
    Ok(Value { tokens: tokens_between(&fork, input), literal })
}

/// The number or bool a literal holds, if the macro can read it.
fn number(lit: &syn::Lit) -> Option<Literal> {
    match lit {
        syn::Lit::Int(i) => {
            let value = i.base10_parse::<u128>().ok()? as f64;
            Some(Literal::Number { value, integer: i.suffix().is_empty() })
        }
        syn::Lit::Float(f) => {
            Some(Literal::Number { value: f.base10_parse().ok()?, integer: false })
        }
        syn::Lit::Bool(b) => Some(Literal::Bool(b.value)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn parse(src: &str) -> Input {
        Input::parse(TokenStream::from_str(src).expect("lexes"))
    }

    fn messages(input: &Input) -> Vec<String> {
        input.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn parses_the_design_example() {
        let input = parse("binary => Bop<threshold: 1e-6, gamma: 1e-3>, _ => Adam<lr: 0.01>,");
        assert!(input.errors.is_empty(), "{:?}", messages(&input));
        assert_eq!(input.rules.len(), 2);
        let bop = &input.rules[0];
        assert_eq!(bop.predicate.to_string(), "binary");
        assert_eq!(bop.optimizer.text(), "Bop");
        assert!(bop.optimizer.builtin.is_some());
        assert_eq!(bop.optimizer.hyperparameters.len(), 2);
        assert_eq!(
            bop.optimizer.hyperparameters[0].value.literal,
            Some(Literal::Number { value: 1e-6, integer: false })
        );
        assert!(input.rules[1].predicate.is_default());
    }

    #[test]
    fn predicate_text_is_normalised_and_keeps_parentheses() {
        let input = parse(
            r#"( binary|bits( 2 ) ) & !name("*.bias")&dtype(bf16) | where(my::pred) => my::Opt as o"#,
        );
        assert!(input.errors.is_empty(), "{:?}", messages(&input));
        let rule = &input.rules[0];
        assert_eq!(
            rule.predicate.to_string(),
            r#"(binary | bits(2)) & !name("*.bias") & dtype(bf16) | where(my::pred)"#
        );
        assert_eq!(rule.optimizer.text(), "my::Opt");
        assert!(rule.optimizer.builtin.is_none());
        assert_eq!(rule.name.as_ref().map(ToString::to_string).as_deref(), Some("o"));
    }

    #[test]
    fn values_literals_paths_and_groups() {
        let input = parse("_ => Sgd<lr: -1, momentum: (0.5 * 2.0), nesterov: true, dampening: x::Y, weight_decay: { 0.1 }>");
        assert!(input.errors.is_empty(), "{:?}", messages(&input));
        let hypers = &input.rules[0].optimizer.hyperparameters;
        assert_eq!(hypers[0].value.literal, Some(Literal::Number { value: -1.0, integer: true }));
        assert_eq!(hypers[1].value.literal, None);
        assert_eq!(hypers[2].value.literal, Some(Literal::Bool(true)));
        assert_eq!(hypers[3].value.tokens.to_string(), "x :: Y");
        assert_eq!(hypers[4].value.literal, None);
    }

    #[test]
    fn item_form_keeps_attributes_and_visibility() {
        let input =
            parse("/// Docs.\n#[derive(Foo)] pub(crate) struct Bnn { binary => Bop, _ => Adam }");
        assert!(input.errors.is_empty(), "{:?}", messages(&input));
        match &input.form {
            Form::Item(h) => {
                assert_eq!(h.ident, "Bnn");
                assert_eq!(h.attrs.len(), 2);
            }
            _ => panic!("expected the item form"),
        }
        assert_eq!(input.rules.len(), 2);
    }

    #[test]
    fn errors_in_several_rules_are_all_reported() {
        let input = parse(
            r#"binar => Bop, dtype(f8) => Sgd, bits(0) => Adam, ndim(2) && binary => Sgd, _ => Adam"#,
        );
        let msgs = messages(&input);
        assert_eq!(msgs.len(), 4, "{msgs:?}");
        assert!(msgs[0].starts_with("unknown predicate `binar`"));
        assert!(msgs[1].starts_with("unknown dtype `f8`"));
        assert!(msgs[2].starts_with("a bit width must be between 1 and 255"));
        assert!(msgs[3].starts_with("write `&` instead of `&&`"));
        // Recoverable errors keep the rules (for the expansion); nothing was dropped.
        assert_eq!(input.rules.len(), 5);
    }

    #[test]
    fn syntax_errors_drop_only_their_rule() {
        let input = parse("binary Bop, ndim(2) => Adam<lr: 0.1 * 2>, _ => Sgd");
        let msgs = messages(&input);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs[0].starts_with("expected `=>`"), "{msgs:?}");
        assert!(msgs[1].contains("wrap an expression in parentheses"), "{msgs:?}");
        assert_eq!(input.rules.len(), 1);
        assert_eq!(input.rules[0].index, 2);
    }

    #[test]
    fn commas_inside_angle_brackets_do_not_split_rules() {
        let chunks = split_rules(TokenStream::from_str("a => B<x: 1, y: 2>, _ => C").unwrap());
        assert_eq!(chunks.len(), 2);
        let chunks = split_rules(TokenStream::from_str("a => B, _ => C,").unwrap());
        assert_eq!(chunks.len(), 3);
        assert!(chunks[2].tokens.is_empty());
    }

    #[test]
    fn empty_input_and_double_commas_are_errors() {
        assert!(messages(&parse(""))[0].starts_with("expected at least one rule"));
        assert!(messages(&parse("binary => Bop,, _ => Adam"))[0]
            .starts_with("expected a rule before `,`"));
    }

    /// Whether a predicate nested this way parses.
    fn nests(open: &str, close: &str, levels: usize) -> bool {
        let src = format!("{}binary{} => Bop", open.repeat(levels), close.repeat(levels));
        let input = parse(&src);
        assert!(input.errors.iter().all(|e| e.to_string().contains("nested more than")));
        input.errors.is_empty()
    }

    #[test]
    fn one_depth_limit_counts_each_not_and_each_parenthesis() {
        assert!(nests("!", "", MAX_DEPTH) && !nests("!", "", MAX_DEPTH + 1));
        assert!(nests("(", ")", MAX_DEPTH) && !nests("(", ")", MAX_DEPTH + 1));
        // `!( )` is two levels: half as many fit.
        assert!(nests("!(", ")", MAX_DEPTH / 2) && !nests("!(", ")", MAX_DEPTH / 2 + 1));
        assert!(nests("(!", ")", MAX_DEPTH / 2) && !nests("(!", ")", MAX_DEPTH / 2 + 1));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("{}binary{} => Bop", "(".repeat(200), ")".repeat(200));
        assert!(messages(&parse(&deep))[0].contains("nested more than"));
        let nots = format!("{}binary => Bop", "!".repeat(500));
        assert!(messages(&parse(&nots))[0].contains("nested more than"));
    }
}

//! Routing predicates: what a `case_optimizer!` rule's left-hand side means at run time.
//!
//! The macro lowers every rule's predicate to a [`Predicate`], a boolean formula over atoms
//! evaluated on a variable's [`VarInfo`]: `binary` (`bits(1)`), `bits(N)`, `ndim(N)`,
//! `name("glob")`, `dtype(f32)` and user functions `where(path)`. The same formula prints back
//! in the macro's syntax, which is how errors and the routing table name rules.

use std::fmt;

use tch::Kind;

use crate::var::VarInfo;

/// A predicate over a variable's metadata, as a `case_optimizer!` rule writes it.
///
/// ```
/// use caseopt::{Glob, Predicate, VarInfo};
/// use tch::{Device, Kind};
///
/// // `binary & !name("*.bias")`
/// let p = Predicate::And(vec![
///     Predicate::Bits(1),
///     Predicate::Not(Box::new(Predicate::Name(Glob::new("*.bias")))),
/// ]);
/// let w = VarInfo::new("fc.weight", &[4, 4], Kind::Float, Device::Cpu).with_bits(1);
/// assert!(p.matches(&w));
/// assert_eq!(p.to_string(), r#"binary & !name("*.bias")"#);
/// ```
#[derive(Clone)]
pub enum Predicate {
    /// `_`: every variable (the default rule).
    Any,
    /// `bits(N)`: declared N bits wide; `binary` is `bits(1)`.
    Bits(u8),
    /// `ndim(N)`: exactly N dimensions.
    Ndim(usize),
    /// `name("glob")`: the full variable name matches the glob.
    Name(Glob),
    /// `dtype(f32)`: element type.
    Dtype(Kind),
    /// `where(path)`: a user function; `text` is the path as written.
    User {
        /// The function as written in the rule (`"my::is_embedding"`).
        text: &'static str,
        /// The function itself.
        f: fn(&VarInfo) -> bool,
    },
    /// `!p`.
    Not(Box<Predicate>),
    /// `p & q & ...`.
    And(Vec<Predicate>),
    /// `p | q | ...`.
    Or(Vec<Predicate>),
}

impl Predicate {
    /// Whether `var` satisfies the predicate.
    ///
    /// ```
    /// use caseopt::{Predicate, VarInfo};
    /// let v = VarInfo::new("w", &[3, 3], tch::Kind::Float, tch::Device::Cpu);
    /// assert!(Predicate::Ndim(2).matches(&v));
    /// assert!(!Predicate::Bits(1).matches(&v));
    /// ```
    pub fn matches(&self, var: &VarInfo) -> bool {
        match self {
            Predicate::Any => true,
            Predicate::Bits(n) => var.bits == *n,
            Predicate::Ndim(n) => var.ndim() == *n,
            Predicate::Name(glob) => glob.matches(&var.name),
            Predicate::Dtype(kind) => var.kind == *kind,
            Predicate::User { f, .. } => f(var),
            Predicate::Not(p) => !p.matches(var),
            Predicate::And(ps) => ps.iter().all(|p| p.matches(var)),
            Predicate::Or(ps) => ps.iter().any(|p| p.matches(var)),
        }
    }

    /// Binding strength when printed: `|` < `&` < `!` and atoms.
    fn precedence(&self) -> u8 {
        match self {
            Predicate::Or(ps) if ps.len() > 1 => 0,
            Predicate::And(ps) if ps.len() > 1 => 1,
            _ => 2,
        }
    }

    fn fmt_at(&self, f: &mut fmt::Formatter<'_>, min: u8) -> fmt::Result {
        if self.precedence() < min {
            f.write_str("(")?;
            self.fmt_at(f, 0)?;
            return f.write_str(")");
        }
        match self {
            Predicate::Any => f.write_str("_"),
            Predicate::Bits(1) => f.write_str("binary"),
            Predicate::Bits(n) => write!(f, "bits({n})"),
            Predicate::Ndim(n) => write!(f, "ndim({n})"),
            Predicate::Name(glob) => write!(f, "name({:?})", glob.pattern()),
            Predicate::Dtype(kind) => write!(f, "dtype({})", dtype_name(*kind)),
            Predicate::User { text, .. } => write!(f, "where({text})"),
            Predicate::Not(p) => {
                f.write_str("!")?;
                p.fmt_at(f, 2)
            }
            Predicate::And(ps) | Predicate::Or(ps) => {
                let (sep, level) =
                    if matches!(self, Predicate::And(_)) { (" & ", 2) } else { (" | ", 1) };
                if ps.is_empty() {
                    // Never produced by the macro; printed as the identity of the operator.
                    return f.write_str(if level == 2 { "_" } else { "!_" });
                }
                for (i, p) in ps.iter().enumerate() {
                    if i > 0 {
                        f.write_str(sep)?;
                    }
                    p.fmt_at(f, if ps.len() > 1 { level } else { min })?;
                }
                Ok(())
            }
        }
    }
}

/// Prints the predicate in `case_optimizer!` syntax, fully parenthesised where precedence
/// requires (`!` binds tighter than `&`, which binds tighter than `|`).
impl fmt::Display for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_at(f, 0)
    }
}

impl fmt::Debug for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Predicate({self})")
    }
}

/// A glob over a full variable name: `*` matches any run of characters (also none and also
/// dots), `?` exactly one character; every other character matches itself.
///
/// ```
/// let g = caseopt::Glob::new("block?.*.weight");
/// assert!(g.matches("block1.conv.weight"));
/// assert!(!g.matches("block12.conv.weight"));
/// assert!(!g.matches("block1.conv.bias"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Glob {
    pattern: String,
    chars: Vec<char>,
}

impl Glob {
    /// A glob; every string is a valid pattern.
    pub fn new(pattern: &str) -> Self {
        Glob { pattern: pattern.to_string(), chars: pattern.chars().collect() }
    }

    /// The pattern as written.
    ///
    /// ```
    /// assert_eq!(caseopt::Glob::new("*.bias").pattern(), "*.bias");
    /// ```
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether `name` matches the whole pattern.
    ///
    /// Greedy matching with one backtrack point (the last `*`): linear in practice and
    /// `O(len(name) * len(pattern))` at worst, without allocation.
    ///
    /// ```
    /// assert!(caseopt::Glob::new("*").matches(""));
    /// assert!(caseopt::Glob::new("a*b?").matches("axxbc"));
    /// ```
    pub fn matches(&self, name: &str) -> bool {
        let p = &self.chars;
        // `pi` indexes the pattern, `ni` is a byte offset into the name.
        let (mut pi, mut ni) = (0usize, 0usize);
        // Where the last `*` was seen and where in the name it currently stops.
        let mut star: Option<(usize, usize)> = None;
        loop {
            let next = name[ni..].chars().next();
            match (p.get(pi), next) {
                (Some('*'), _) => {
                    star = Some((pi, ni));
                    pi += 1;
                }
                (Some(&pc), Some(c)) if pc == '?' || pc == c => {
                    pi += 1;
                    ni += c.len_utf8();
                }
                (None, None) => return true,
                // Mismatch: let the last `*` swallow one more character and retry after it.
                _ => match star.and_then(|(sp, sn)| Some((sp, sn, name[sn..].chars().next()?))) {
                    Some((sp, sn, c)) => {
                        let sn = sn + c.len_utf8();
                        star = Some((sp, sn));
                        pi = sp + 1;
                        ni = sn;
                    }
                    None => return false,
                },
            }
        }
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.pattern)
    }
}

/// The dtypes a `dtype(...)` atom can name, with their tch kinds.
///
/// ```
/// let names: Vec<&str> = caseopt::DTYPE_NAMES.iter().map(|(n, _)| *n).collect();
/// assert_eq!(names, ["f32", "f64", "f16", "bf16"]);
/// ```
pub const DTYPE_NAMES: &[(&str, Kind)] =
    &[("f32", Kind::Float), ("f64", Kind::Double), ("f16", Kind::Half), ("bf16", Kind::BFloat16)];

/// The short name of a tch kind, as `dtype(...)` and the routing table write it.
///
/// ```
/// assert_eq!(caseopt::dtype_name(tch::Kind::BFloat16), "bf16");
/// assert_eq!(caseopt::dtype_name(tch::Kind::Int64), "i64");
/// ```
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Uint8 => "u8",
        Kind::Int8 => "i8",
        Kind::Int16 => "i16",
        Kind::Int => "i32",
        Kind::Int64 => "i64",
        Kind::Half => "f16",
        Kind::Float => "f32",
        Kind::Double => "f64",
        Kind::ComplexHalf => "c32",
        Kind::ComplexFloat => "c64",
        Kind::ComplexDouble => "c128",
        Kind::Bool => "bool",
        Kind::QInt8 => "qi8",
        Kind::QUInt8 => "qu8",
        Kind::QInt32 => "qi32",
        Kind::BFloat16 => "bf16",
        Kind::Float8e5m2 => "f8e5m2",
        Kind::Float8e4m3fn => "f8e4m3fn",
        Kind::Float8e5m2fnuz => "f8e5m2fnuz",
        Kind::Float8e4m3fnuz => "f8e4m3fnuz",
    }
}

/// The kind a `dtype(...)` atom names, if it is one of [`DTYPE_NAMES`].
///
/// ```
/// assert_eq!(caseopt::dtype_from_name("f16"), Some(tch::Kind::Half));
/// assert_eq!(caseopt::dtype_from_name("f8"), None);
/// ```
pub fn dtype_from_name(name: &str) -> Option<Kind> {
    DTYPE_NAMES.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Reference matcher: plain recursion over the definition.
    fn glob_reference(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|i| glob_reference(rest, &s[i..])),
            Some((&c, rest)) => {
                !s.is_empty() && (c == '?' || c == s[0]) && glob_reference(rest, &s[1..])
            }
        }
    }

    /// Every string over `alphabet` up to `max_len` characters.
    fn all_strings(alphabet: &[char], max_len: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut frontier = vec![String::new()];
        for _ in 0..max_len {
            let mut next = Vec::new();
            for s in &frontier {
                for &c in alphabet {
                    let mut t = s.clone();
                    t.push(c);
                    next.push(t);
                }
            }
            out.extend(next.iter().cloned());
            frontier = next;
        }
        out
    }

    #[test]
    fn glob_agrees_with_the_definition_on_every_short_string() {
        let patterns = all_strings(&['a', '.', '*', '?'], 4);
        let names = all_strings(&['a', '.', 'b'], 5);
        for p in &patterns {
            let g = Glob::new(p);
            let pc: Vec<char> = p.chars().collect();
            for n in &names {
                let nc: Vec<char> = n.chars().collect();
                assert_eq!(g.matches(n), glob_reference(&pc, &nc), "pattern {p:?} name {n:?}");
            }
        }
    }

    #[test]
    fn glob_question_mark_is_one_unicode_character() {
        assert!(Glob::new("w?").matches("wé"));
        assert!(!Glob::new("w?").matches("w"));
        assert!(Glob::new("*é").matches("café"));
    }

    #[test]
    fn predicates_print_in_macro_syntax_with_needed_parentheses() {
        let name = |g: &str| Predicate::Name(Glob::new(g));
        let p = Predicate::And(vec![
            Predicate::Or(vec![Predicate::Bits(1), Predicate::Bits(2)]),
            Predicate::Not(Box::new(Predicate::And(vec![name("*.b"), Predicate::Ndim(1)]))),
            Predicate::Dtype(Kind::Half),
        ]);
        assert_eq!(p.to_string(), r#"(binary | bits(2)) & !(name("*.b") & ndim(1)) & dtype(f16)"#);
        let q = Predicate::Or(vec![Predicate::And(vec![Predicate::Bits(4), Predicate::Ndim(2)])]);
        assert_eq!(q.to_string(), "bits(4) & ndim(2)");
    }

    #[test]
    fn atoms_read_the_metadata() {
        fn big(v: &VarInfo) -> bool {
            v.numel() > 10
        }
        let v = VarInfo::new("enc.emb", &[100, 8], Kind::BFloat16, Device::Cpu).with_bits(4);
        assert!(Predicate::Bits(4).matches(&v));
        assert!(Predicate::Ndim(2).matches(&v));
        assert!(Predicate::Dtype(Kind::BFloat16).matches(&v));
        assert!(Predicate::Name(Glob::new("enc.*")).matches(&v));
        assert!(Predicate::User { text: "big", f: big }.matches(&v));
        assert!(!Predicate::Or(vec![]).matches(&v));
        assert!(Predicate::And(vec![]).matches(&v));
        assert!(Predicate::Any.matches(&v));
    }

    #[test]
    fn dtype_names_round_trip() {
        for (name, kind) in DTYPE_NAMES {
            assert_eq!(dtype_name(*kind), *name);
            assert_eq!(dtype_from_name(name), Some(*kind));
        }
    }
}

//! The decision procedure behind compile-time exclusivity: satisfiability of boolean formulas
//! over the predicate atoms, in the theory of variable metadata.
//!
//! A variable has one bit width (`binary` is `bits(1)`), one number of dimensions, one dtype
//! and one name; these are independent of each other. Names are decided exactly with automata
//! over the globs; a user function is an opaque proposition, related only to itself (same
//! tokens). Formulas are brought to disjunctive normal form, and each conjunction is checked
//! per dimension. Every `Unsat` answer is a proof; when the work would exceed fixed budgets
//! the answer is `Unknown`, which callers treat like "satisfiable" (the check then happens when
//! the router is built), so a budget can cost precision but never soundness.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::ops::Not;

/// An atomic proposition about one variable: what an atom of a rule means in the theory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proposition {
    /// Declared bit width (`binary` is `Bits(1)`).
    Bits(u8),
    /// Number of dimensions.
    Ndim(u64),
    /// The full name matches this glob.
    Name(String),
    /// The dtype is this one (by name).
    Dtype(String),
    /// A user function returns true; identified by its tokens.
    User(String),
}

/// A boolean formula over atoms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Formula {
    /// An atomic proposition.
    Proposition(Proposition),
    /// Negation.
    Not(Box<Formula>),
    /// Conjunction (empty: true).
    And(Vec<Formula>),
    /// Disjunction (empty: false).
    Or(Vec<Formula>),
}

impl std::ops::Not for Formula {
    type Output = Formula;

    /// `!self`.
    fn not(self) -> Formula {
        Formula::Not(Box::new(self))
    }
}

/// A satisfiability verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Some variable satisfies it.
    Sat,
    /// Proven: no variable satisfies it.
    Unsat,
    /// Not decided within the budget.
    Unknown,
}

/// Which part of the metadata made a conjunction unsatisfiable, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// `bits`/`binary`.
    Bits,
    /// `ndim`.
    Ndim,
    /// `dtype`.
    Dtype,
    /// `name` globs.
    Name,
    /// A `where(...)` function and its negation.
    User,
}

impl Conflict {
    /// The reason in words.
    pub fn describe(self) -> &'static str {
        match self {
            Conflict::Bits => "a variable has one bit width, and its `bits`/`binary` conditions exclude each other",
            Conflict::Ndim => "a variable has one number of dimensions, and its `ndim` conditions exclude each other",
            Conflict::Dtype => "a variable has one dtype, and its `dtype` conditions exclude each other",
            Conflict::Name => "no variable name matches all of its `name` conditions",
            Conflict::User => "it requires a `where(...)` function to be both true and false",
        }
    }
}

/// Most conjunctions a formula may expand to before the answer is `Unknown`.
const MAX_TERMS: usize = 4096;
/// Most automaton states explored for one conjunction of globs before `Unknown`.
const MAX_GLOB_STATES: usize = 20_000;

/// A conjunction of literals: atoms, each required true or false.
type Term = Vec<(Proposition, bool)>;

/// Satisfiability of `f`; on `Unsat`, the conflict when `f` is a single conjunction.
pub fn satisfiable(f: &Formula) -> (Answer, Option<Conflict>) {
    let Some(terms) = dnf(f, true, true) else {
        return (Answer::Unknown, None);
    };
    if terms.is_empty() {
        // Every term contradicted on its face; name the conflict when there was just one.
        let conflict = match dnf(f, true, false).as_deref() {
            Some([single]) => check_term(single).err(),
            _ => None,
        };
        return (Answer::Unsat, conflict);
    }
    let mut unknown = false;
    let mut conflict = None;
    for term in &terms {
        match check_term(term) {
            Ok(Answer::Sat) => return (Answer::Sat, None),
            Ok(_) => unknown = true,
            Err(c) => conflict = Some(c),
        }
    }
    if unknown {
        (Answer::Unknown, None)
    } else {
        (Answer::Unsat, if terms.len() == 1 { conflict } else { None })
    }
}

/// Disjunctive normal form of `f` (negated when `positive` is false), or `None` past the
/// budget. With `prune`, terms that contradict on their face are dropped on the way to keep
/// products small.
fn dnf(f: &Formula, positive: bool, prune: bool) -> Option<Vec<Term>> {
    match f {
        Formula::Proposition(a) => Some(vec![vec![(a.clone(), positive)]]),
        Formula::Not(g) => dnf(g, !positive, prune),
        Formula::And(gs) | Formula::Or(gs) => {
            let conjunctive = matches!(f, Formula::And(_)) == positive;
            if conjunctive {
                let mut acc: Vec<Term> = vec![Vec::new()];
                for g in gs {
                    let terms = dnf(g, positive, prune)?;
                    let mut next = Vec::new();
                    for a in &acc {
                        for t in &terms {
                            let mut merged = a.clone();
                            for lit in t {
                                if !merged.contains(lit) {
                                    merged.push(lit.clone());
                                }
                            }
                            if !(prune && obviously_false(&merged)) {
                                next.push(merged);
                            }
                            if next.len() > MAX_TERMS {
                                return None;
                            }
                        }
                    }
                    acc = next;
                }
                Some(acc)
            } else {
                let mut acc = Vec::new();
                for g in gs {
                    acc.extend(dnf(g, positive, prune)?);
                    if acc.len() > MAX_TERMS {
                        return None;
                    }
                }
                Some(acc)
            }
        }
    }
}

/// A literal and its negation, or two different positive values of a single-valued
/// dimension: cheap to see, and pruning them keeps the products small.
fn obviously_false(term: &Term) -> bool {
    term.iter().enumerate().any(|(i, a)| term[i + 1..].iter().any(|b| clash(a, b)))
}

fn clash(a: &(Proposition, bool), b: &(Proposition, bool)) -> bool {
    if a.0 == b.0 {
        return a.1 != b.1;
    }
    if !(a.1 && b.1) {
        return false;
    }
    matches!(
        (&a.0, &b.0),
        (Proposition::Bits(_), Proposition::Bits(_))
            | (Proposition::Ndim(_), Proposition::Ndim(_))
            | (Proposition::Dtype(_), Proposition::Dtype(_))
    )
}

/// Whether one conjunction is satisfiable; `Err` names the dimension that contradicts.
fn check_term(term: &Term) -> Result<Answer, Conflict> {
    let mut bits = Dimension::default();
    let mut ndim = Dimension::default();
    let mut dtype = Dimension::default();
    let (mut user_pos, mut user_neg) = (BTreeSet::new(), BTreeSet::new());
    let (mut globs_pos, mut globs_neg) = (Vec::new(), Vec::new());
    for (atom, positive) in term {
        match atom {
            Proposition::Bits(n) => bits.add(u64::from(*n), *positive),
            Proposition::Ndim(n) => ndim.add(*n, *positive),
            Proposition::Dtype(d) => dtype.add_named(d, *positive),
            Proposition::User(k) => {
                if *positive {
                    user_pos.insert(k)
                } else {
                    user_neg.insert(k)
                };
            }
            Proposition::Name(g) => {
                if *positive {
                    globs_pos.push(g.as_str())
                } else {
                    globs_neg.push(g.as_str())
                }
            }
        }
    }
    // A bit width is a u8: 256 values. ndim and dtype have more values than any rule names.
    if !bits.satisfiable(Some(256)) {
        return Err(Conflict::Bits);
    }
    if !ndim.satisfiable(None) {
        return Err(Conflict::Ndim);
    }
    if !dtype.satisfiable(None) {
        return Err(Conflict::Dtype);
    }
    if user_pos.intersection(&user_neg).next().is_some() {
        return Err(Conflict::User);
    }
    match globs_satisfiable(&globs_pos, &globs_neg) {
        Answer::Unsat => Err(Conflict::Name),
        other => Ok(other),
    }
}

/// The literals about one single-valued dimension of a variable.
#[derive(Default)]
struct Dimension {
    required: BTreeSet<u64>,
    excluded: BTreeSet<u64>,
    names: Vec<String>,
}

impl Dimension {
    fn add(&mut self, value: u64, positive: bool) {
        if positive {
            self.required.insert(value);
        } else {
            self.excluded.insert(value);
        }
    }

    fn add_named(&mut self, name: &str, positive: bool) {
        let id = match self.names.iter().position(|n| n == name) {
            Some(i) => i,
            None => {
                self.names.push(name.to_string());
                self.names.len() - 1
            }
        };
        self.add(id as u64, positive);
    }

    /// One value, not excluded; or no value required and the exclusions leave one free
    /// (`domain` values in all, unbounded when `None`).
    fn satisfiable(&self, domain: Option<usize>) -> bool {
        match self.required.len() {
            0 => match domain {
                Some(d) => self.excluded.len() < d,
                None => true,
            },
            1 => self.required.iter().all(|v| !self.excluded.contains(v)),
            _ => false,
        }
    }
}

/// Whether some name matches every glob in `positive` and none in `negative`: a search over
/// the product of the globs' automata (subset construction on the fly, so complements are
/// exact). Characters that appear in no glob behave alike, so one stands for all of them.
pub fn globs_satisfiable(positive: &[&str], negative: &[&str]) -> Answer {
    if positive.is_empty() && negative.is_empty() {
        return Answer::Sat;
    }
    let globs: Vec<Vec<char>> =
        positive.iter().chain(negative).map(|g| g.chars().collect()).collect();
    let n_pos = positive.len();
    let mut alphabet: Vec<Option<char>> = globs
        .iter()
        .flatten()
        .filter(|c| **c != '*' && **c != '?')
        .copied()
        .collect::<BTreeSet<char>>()
        .into_iter()
        .map(Some)
        .collect();
    alphabet.push(None);

    type State = Vec<Vec<usize>>;
    let start: State = globs.iter().map(|g| closure(g, [0].into_iter())).collect();
    let accepting = |s: &State| {
        s.iter().enumerate().all(|(i, positions)| {
            let accepts = positions.contains(&globs[i].len());
            if i < n_pos {
                accepts
            } else {
                !accepts
            }
        })
    };
    // A positive glob with no live position can never accept again.
    let dead = |s: &State| s[..n_pos].iter().any(Vec::is_empty);
    let mut seen: HashSet<State> = HashSet::new();
    let mut queue = VecDeque::new();
    if dead(&start) {
        return Answer::Unsat;
    }
    seen.insert(start.clone());
    queue.push_back(start);
    while let Some(state) = queue.pop_front() {
        if accepting(&state) {
            return Answer::Sat;
        }
        for c in &alphabet {
            let next: State = state
                .iter()
                .zip(&globs)
                .map(|(positions, g)| {
                    let moved = positions.iter().filter_map(|&p| match g.get(p) {
                        Some('*') => Some(p),
                        Some('?') => Some(p + 1),
                        Some(x) if Some(*x) == *c => Some(p + 1),
                        _ => None,
                    });
                    closure(g, moved)
                })
                .collect();
            if dead(&next) || seen.contains(&next) {
                continue;
            }
            if seen.len() >= MAX_GLOB_STATES {
                return Answer::Unknown;
            }
            seen.insert(next.clone());
            queue.push_back(next);
        }
    }
    Answer::Unsat
}

/// The positions reachable from `positions` by letting `*` match nothing; sorted, unique.
fn closure(glob: &[char], positions: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut out = BTreeSet::new();
    for mut p in positions {
        while out.insert(p) && glob.get(p) == Some(&'*') {
            p += 1;
        }
    }
    out.into_iter().collect()
}

/// How two rules relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// No variable satisfies both: no run-time check needed.
    Disjoint,
    /// Every variable of the first satisfies the second, and vice versa.
    Equivalent,
    /// Every variable of the first satisfies the second (the first is narrower).
    FirstImpliesSecond,
    /// Every variable of the second satisfies the first.
    SecondImpliesFirst,
    /// Not decided: checked when the router is built.
    Unknown,
}

/// The relation between two satisfiable (or undecided) formulas.
pub fn relation(a: &Formula, b: &Formula) -> Relation {
    let both = Formula::And(vec![a.clone(), b.clone()]);
    if satisfiable(&both).0 == Answer::Unsat {
        return Relation::Disjoint;
    }
    let a_only = Formula::And(vec![a.clone(), b.clone().not()]);
    let b_only = Formula::And(vec![b.clone(), a.clone().not()]);
    match (satisfiable(&a_only).0 == Answer::Unsat, satisfiable(&b_only).0 == Answer::Unsat) {
        (true, true) => Relation::Equivalent,
        (true, false) => Relation::FirstImpliesSecond,
        (false, true) => Relation::SecondImpliesFirst,
        (false, false) => Relation::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn atom(a: Proposition) -> Formula {
        Formula::Proposition(a)
    }
    fn name(g: &str) -> Formula {
        atom(Proposition::Name(g.into()))
    }
    fn and(fs: Vec<Formula>) -> Formula {
        Formula::And(fs)
    }
    fn or(fs: Vec<Formula>) -> Formula {
        Formula::Or(fs)
    }

    /// Reference glob matcher.
    fn matches(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|i| matches(rest, &s[i..])),
            Some((&c, rest)) => !s.is_empty() && (c == '?' || c == s[0]) && matches(rest, &s[1..]),
        }
    }

    fn strings(alphabet: &[char], max_len: usize) -> Vec<Vec<char>> {
        let mut out = vec![Vec::new()];
        let mut frontier = vec![Vec::new()];
        for _ in 0..max_len {
            let next: Vec<Vec<char>> = frontier
                .iter()
                .flat_map(|s: &Vec<char>| {
                    alphabet.iter().map(move |&c| {
                        let mut t = s.clone();
                        t.push(c);
                        t
                    })
                })
                .collect();
            out.extend(next.iter().cloned());
            frontier = next;
        }
        out
    }

    #[test]
    fn glob_verdicts_agree_with_brute_force() {
        // Globs up to 3 characters over {a, ., *, ?}, names up to 7 characters over {a, ., x}
        // (`x` stands for a character no glob mentions). For globs this short a shortest
        // witness is a few characters long, so brute force over these names is the truth.
        let globs: Vec<String> = strings(&['a', '.', '*', '?'], 3)
            .into_iter()
            .map(|s| s.into_iter().collect())
            .collect();
        let names = strings(&['a', '.', 'x'], 7);
        let mut checked = 0;
        for (i, p) in globs.iter().enumerate() {
            for q in globs.iter().skip(i).step_by(7) {
                let pc: Vec<char> = p.chars().collect();
                let qc: Vec<char> = q.chars().collect();
                let both = names.iter().any(|n| matches(&pc, n) && matches(&qc, n));
                let p_not_q = names.iter().any(|n| matches(&pc, n) && !matches(&qc, n));
                assert_eq!(globs_satisfiable(&[p, q], &[]) == Answer::Sat, both, "{p:?} & {q:?}");
                assert_eq!(globs_satisfiable(&[p], &[q]) == Answer::Sat, p_not_q, "{p:?} & !{q:?}");
                checked += 1;
            }
        }
        assert!(checked > 500);
    }

    #[test]
    fn weight_and_bias_globs_are_disjoint_and_nested_globs_imply() {
        assert_eq!(relation(&name("*.weight"), &name("*.bias")), Relation::Disjoint);
        assert_eq!(
            relation(&name("conv*.weight"), &name("*.weight")),
            Relation::FirstImpliesSecond
        );
        assert_eq!(relation(&name("*"), &name("a?")), Relation::SecondImpliesFirst);
        assert_eq!(relation(&name("a*"), &name("*b")), Relation::Unknown);
        assert_eq!(relation(&name("a*"), &name("a**")), Relation::Equivalent);
    }

    #[test]
    fn single_valued_dimensions() {
        let bits = |n| atom(Proposition::Bits(n));
        let ndim = |n| atom(Proposition::Ndim(n));
        let dtype = |d: &str| atom(Proposition::Dtype(d.into()));
        assert_eq!(
            satisfiable(&and(vec![bits(1), bits(2)])),
            (Answer::Unsat, Some(Conflict::Bits))
        );
        assert_eq!(satisfiable(&and(vec![ndim(1), ndim(1)])).0, Answer::Sat);
        assert_eq!(relation(&bits(1), &bits(2)), Relation::Disjoint);
        assert_eq!(relation(&ndim(2), &or(vec![ndim(2), ndim(4)])), Relation::FirstImpliesSecond);
        assert_eq!(relation(&dtype("f32"), &dtype("f16")), Relation::Disjoint);
        assert_eq!(relation(&dtype("f32"), &ndim(2)), Relation::Unknown);
        // Excluding every named dtype still leaves others (complex, integer kinds).
        let none_named =
            and(["f32", "f64", "f16", "bf16"].iter().map(|d| dtype(d).not()).collect());
        assert_eq!(satisfiable(&none_named).0, Answer::Sat);
        // Excluding all 256 bit widths leaves none.
        let no_width = and((0..=255u8).map(|n| bits(n).not()).collect());
        assert_eq!(satisfiable(&no_width).0, Answer::Unsat);
    }

    #[test]
    fn user_functions_are_opaque_but_equal_to_themselves() {
        let f = atom(Proposition::User("is_emb".into()));
        let g = atom(Proposition::User("other".into()));
        assert_eq!(relation(&f, &g), Relation::Unknown);
        assert_eq!(relation(&f, &f.clone().not()), Relation::Disjoint);
        assert_eq!(relation(&and(vec![f.clone(), g.clone()]), &f), Relation::FirstImpliesSecond);
        assert_eq!(
            satisfiable(&and(vec![f.clone(), f.not()])),
            (Answer::Unsat, Some(Conflict::User))
        );
    }

    #[test]
    fn de_morgan_and_distribution() {
        let b = atom(Proposition::Bits(1));
        let n2 = atom(Proposition::Ndim(2));
        // !(b & n2) is equivalent to !b | !n2.
        let lhs = and(vec![b.clone(), n2.clone()]).not();
        let rhs = or(vec![b.clone().not(), n2.clone().not()]);
        assert_eq!(relation(&lhs, &rhs), Relation::Equivalent);
        // (b | n2) & !b implies n2.
        let f = and(vec![or(vec![b.clone(), n2.clone()]), b.not()]);
        assert_eq!(relation(&f, &n2), Relation::FirstImpliesSecond);
        assert_eq!(Formula::Or(vec![]).clone(), Formula::Or(vec![]));
        assert_eq!(satisfiable(&Formula::Or(vec![])).0, Answer::Unsat);
        assert_eq!(satisfiable(&Formula::And(vec![])).0, Answer::Sat);
    }

    #[test]
    fn budgets_give_unknown_not_a_wrong_answer() {
        // 13 binary choices expand to 8192 conjunctions, past the term budget.
        let wide = and((0..13u64)
            .map(|i| {
                or(vec![atom(Proposition::Ndim(i)).not(), atom(Proposition::User(format!("u{i}")))])
            })
            .collect());
        assert_eq!(satisfiable(&wide).0, Answer::Unknown);
    }
}

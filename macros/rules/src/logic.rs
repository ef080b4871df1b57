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
//!
//! The budgets are counted in work units (a DNF term produced, an automaton transition, a pair
//! of rules judged) against one [`Budget`] for the whole invocation, with a smaller share for
//! any one check, so no input can make a compile slow: the total work is bounded whatever the
//! number of rules and however their formulas multiply out.

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

/// The work one invocation of the checker may do, in units: a DNF term costs one unit per
/// literal plus one, an automaton transition one unit per glob it advances, a pair of rules
/// [`PAIR_COST`] units. Calibrated so that spending it all takes well under a second in the
/// unoptimised build cargo gives proc macros by default (about 0.65 s on a busy 2-core
/// machine), while 200 disjoint `name` or `bits` rules are all decided (about 0.5 M units).
pub const INVOCATION_BUDGET: u64 = 1_000_000;
/// The share of [`INVOCATION_BUDGET`] one satisfiability check may use, so a single
/// pathological rule leaves the other rules and pairs their chance to be decided.
pub const CHECK_BUDGET: u64 = 100_000;
/// The units one pair of rules costs on top of its checks' own: the formulas it builds and
/// clones cost about as much as that many automaton transitions.
pub const PAIR_COST: usize = 16;

/// The work left to one invocation of the checker. Once spent, every answer is `Unknown` (left
/// to the check when the router is built), which keeps soundness and bounds compile time.
#[derive(Debug, Clone)]
pub struct Budget {
    used: u64,
    limit: u64,
    per_check: u64,
    /// Where the current check's share ends (`used` at its start plus `per_check`).
    check_end: u64,
    /// Whether some answer was `Unknown` because a share or the whole budget ran out.
    ran_out: bool,
}

impl Default for Budget {
    /// [`INVOCATION_BUDGET`] with [`CHECK_BUDGET`] per check.
    fn default() -> Self {
        Budget::new(INVOCATION_BUDGET, CHECK_BUDGET)
    }
}

impl Budget {
    /// `limit` units in all, at most `per_check` of them for any one satisfiability check.
    pub fn new(limit: u64, per_check: u64) -> Budget {
        Budget { used: 0, limit, per_check, check_end: limit.min(per_check), ran_out: false }
    }

    /// The units spent so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Whether the whole budget is spent: nothing more will be decided.
    pub fn exhausted(&self) -> bool {
        self.used >= self.limit
    }

    /// Whether some answer was left `Unknown` for want of budget (a check's share or the
    /// whole), rather than because the theory cannot decide it.
    pub fn ran_out(&self) -> bool {
        self.ran_out
    }

    /// Opens a new check's share of the budget.
    fn start_check(&mut self) {
        self.check_end = self.used.saturating_add(self.per_check).min(self.limit);
    }

    /// Spends `units`, or refuses (false) if they would overrun the current check's share or
    /// the whole budget; what is spent never exceeds the limit.
    fn spend(&mut self, units: usize) -> bool {
        let after = self.used.saturating_add(units as u64);
        if after > self.check_end {
            self.ran_out = true;
            return false;
        }
        self.used = after;
        true
    }
}

/// A conjunction of literals: atoms, each required true or false.
type Term = Vec<(Proposition, bool)>;

/// Satisfiability of `f`, spending from `budget`; on `Unsat`, the conflict when `f` is a single
/// conjunction.
pub fn satisfiable(f: &Formula, budget: &mut Budget) -> (Answer, Option<Conflict>) {
    budget.start_check();
    let Some(terms) = dnf(f, true, true, budget) else {
        return (Answer::Unknown, None);
    };
    if terms.is_empty() {
        // Every term contradicted on its face; name the conflict when there was just one.
        let conflict = match dnf(f, true, false, budget).as_deref() {
            Some([single]) => check_term(single, budget).err(),
            _ => None,
        };
        return (Answer::Unsat, conflict);
    }
    let mut unknown = false;
    let mut conflict = None;
    for term in &terms {
        match check_term(term, budget) {
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
/// budgets. With `prune`, terms that contradict on their face are dropped on the way to keep
/// products small.
fn dnf(f: &Formula, positive: bool, prune: bool, budget: &mut Budget) -> Option<Vec<Term>> {
    match f {
        Formula::Proposition(a) => budget.spend(1).then(|| vec![vec![(a.clone(), positive)]]),
        Formula::Not(g) => dnf(g, !positive, prune, budget),
        Formula::And(gs) | Formula::Or(gs) => {
            let conjunctive = matches!(f, Formula::And(_)) == positive;
            if conjunctive {
                let mut acc: Vec<Term> = vec![Vec::new()];
                for g in gs {
                    let terms = dnf(g, positive, prune, budget)?;
                    let mut next = Vec::new();
                    for a in &acc {
                        for t in &terms {
                            let mut merged = a.clone();
                            for lit in t {
                                if !merged.contains(lit) {
                                    merged.push(lit.clone());
                                }
                            }
                            if !budget.spend(1 + merged.len()) {
                                return None;
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
                    acc.extend(dnf(g, positive, prune, budget)?);
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
fn check_term(term: &Term, budget: &mut Budget) -> Result<Answer, Conflict> {
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
    match globs_satisfiable(&globs_pos, &globs_neg, budget) {
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
/// Spends one unit of `budget` per glob for each transition. A glob's set of live positions is
/// a bit mask, so globs longer than [`MAX_GLOB_LEN`] characters are left `Unknown`.
pub fn globs_satisfiable(positive: &[&str], negative: &[&str], budget: &mut Budget) -> Answer {
    if positive.is_empty() && negative.is_empty() {
        return Answer::Sat;
    }
    let globs: Vec<Vec<char>> =
        positive.iter().chain(negative).map(|g| g.chars().collect()).collect();
    if globs.iter().any(|g| g.len() > MAX_GLOB_LEN) {
        return Answer::Unknown;
    }
    let n_pos = positive.len();
    // Most disjoint name rules differ in a literal character before any `*` (`layer1.*`,
    // `layer2.*`), or after the last one: one comparison instead of a search.
    for (i, a) in globs[..n_pos].iter().enumerate() {
        for b in &globs[i + 1..n_pos] {
            if !budget.spend(1) {
                return Answer::Unknown;
            }
            if literal_clash(a.iter(), b.iter()) || literal_clash(a.iter().rev(), b.iter().rev()) {
                return Answer::Unsat;
            }
        }
    }
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
    let automata: Vec<GlobAutomaton> =
        globs.iter().map(|g| GlobAutomaton::new(g, &alphabet)).collect();

    // One mask of live positions per glob.
    type State = Vec<u128>;
    let start: State = automata.iter().map(|a| a.closure(1)).collect();
    let accepting = |s: &State| {
        s.iter().zip(&automata).enumerate().all(|(i, (&live, a))| {
            let accepts = live & a.end != 0;
            if i < n_pos {
                accepts
            } else {
                !accepts
            }
        })
    };
    // A positive glob with no live position can never accept again.
    let dead = |s: &State| s[..n_pos].contains(&0);
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
        for symbol in 0..alphabet.len() {
            if !budget.spend(globs.len()) {
                return Answer::Unknown;
            }
            let next: State =
                state.iter().zip(&automata).map(|(&live, a)| a.step(live, symbol)).collect();
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

/// Whether two globs read from one end require different characters at the same position
/// before either reaches a `*`: then no name matches both.
fn literal_clash<'a>(a: impl Iterator<Item = &'a char>, b: impl Iterator<Item = &'a char>) -> bool {
    for (&x, &y) in a.zip(b) {
        if x == '*' || y == '*' {
            return false;
        }
        if x != '?' && y != '?' && x != y {
            return true;
        }
    }
    false
}

/// Longest glob the automaton search takes: its positions `0..=len` fit one `u128`.
pub const MAX_GLOB_LEN: usize = 127;

/// One glob as a nondeterministic automaton over bit masks: bit `p` is position `p` (before
/// the glob's `p`-th character; bit `len` is the end).
struct GlobAutomaton {
    /// Positions holding `*`.
    stars: u128,
    /// The end position.
    end: u128,
    /// Per alphabet symbol, the positions whose character consumes it (`?` or the character).
    consumes: Vec<u128>,
}

impl GlobAutomaton {
    fn new(glob: &[char], alphabet: &[Option<char>]) -> GlobAutomaton {
        let mask = |pred: &dyn Fn(char) -> bool| {
            glob.iter().enumerate().filter(|(_, &c)| pred(c)).fold(0u128, |m, (p, _)| m | 1 << p)
        };
        let stars = mask(&|c| c == '*');
        let consumes = alphabet
            .iter()
            .map(|symbol| mask(&|c| c == '?' || (c != '*' && Some(c) == *symbol)))
            .collect();
        GlobAutomaton { stars, end: 1 << glob.len(), consumes }
    }

    /// The positions reachable from `live` by letting `*` match nothing.
    fn closure(&self, mut live: u128) -> u128 {
        loop {
            let next = live | (live & self.stars) << 1;
            if next == live {
                return live;
            }
            live = next;
        }
    }

    /// The live positions after reading alphabet symbol `symbol`.
    fn step(&self, live: u128, symbol: usize) -> u128 {
        // A `*` stays; a matching character or `?` advances one position.
        self.closure((live & self.stars) | (live & self.consumes[symbol]) << 1)
    }
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

/// The relation between two satisfiable (or undecided) formulas, spending from `budget`;
/// `Unknown` once it is spent.
pub fn relation(a: &Formula, b: &Formula, budget: &mut Budget) -> Relation {
    budget.start_check();
    if !budget.spend(PAIR_COST) {
        return Relation::Unknown;
    }
    let both = Formula::And(vec![a.clone(), b.clone()]);
    if satisfiable(&both, budget).0 == Answer::Unsat {
        return Relation::Disjoint;
    }
    let a_only = Formula::And(vec![a.clone(), b.clone().not()]);
    let b_only = Formula::And(vec![b.clone(), a.clone().not()]);
    let a_only = satisfiable(&a_only, budget).0 == Answer::Unsat;
    let b_only = satisfiable(&b_only, budget).0 == Answer::Unsat;
    match (a_only, b_only) {
        (true, true) => Relation::Equivalent,
        (true, false) => Relation::FirstImpliesSecond,
        (false, true) => Relation::SecondImpliesFirst,
        (false, false) => Relation::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The functions under test with a fresh invocation budget each.
    fn satisfiable(f: &Formula) -> (Answer, Option<Conflict>) {
        super::satisfiable(f, &mut Budget::default())
    }
    fn relation(a: &Formula, b: &Formula) -> Relation {
        super::relation(a, b, &mut Budget::default())
    }
    fn globs_satisfiable(positive: &[&str], negative: &[&str]) -> Answer {
        super::globs_satisfiable(positive, negative, &mut Budget::default())
    }

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

//! The rules as data: what the user wrote for each rule ([`RuleInfo`]), with its predicate
//! ([`RuleSpec`]), and the rules' stable identity ([`fingerprint`]).

use std::fmt;

use crate::predicate::Predicate;

/// One rule of a router, as the user wrote it.
///
/// ```
/// let rule = caseopt::RuleInfo {
///     index: 0,
///     predicate: "binary",
///     optimizer: "Bop",
///     default: false,
///     name: Some("bop"),
/// };
/// assert_eq!(rule.to_string(), "binary => Bop");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleInfo {
    /// Position among the rules, from 0; also the suffix of the `ruleN()` accessors.
    pub index: usize,
    /// The predicate as written (normalised spacing), `"_"` for the default rule.
    pub predicate: &'static str,
    /// The optimizer's type as written, without its hyperparameters (`"Bop"`, `"my::Lion"`).
    pub optimizer: &'static str,
    /// Whether this is the default rule `_`.
    pub default: bool,
    /// The name given with `... as name`, if any.
    pub name: Option<&'static str>,
}

/// `predicate => Optimizer`, the way errors and the routing table name a rule.
impl fmt::Display for RuleInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} => {}", self.predicate, self.optimizer)
    }
}

/// A rule's description together with its predicate, as the generated code hands it over.
///
/// ```
/// use caseopt::{Predicate, RuleInfo, RuleSpec};
/// let info = RuleInfo { index: 0, predicate: "ndim(1)", optimizer: "Adam", default: false, name: None };
/// let spec = RuleSpec { info, predicate: Predicate::Ndim(1) };
/// assert_eq!(spec.predicate.to_string(), spec.info.predicate);
/// ```
#[derive(Debug, Clone)]
pub struct RuleSpec {
    /// What the user wrote.
    pub info: RuleInfo,
    /// What it means; [`Predicate::Any`] for the default rule.
    pub predicate: Predicate,
}

/// A stable identity of a router's rules: 64-bit FNV-1a over every rule's predicate text,
/// optimizer name and default flag, in order. Independent of hyperparameter values, the
/// process, and the platform, so a checkpoint can tell whether it was written by the same rules.
///
/// ```
/// # use caseopt::RuleInfo;
/// let a = RuleInfo { index: 0, predicate: "binary", optimizer: "Bop", default: false, name: None };
/// let b = RuleInfo { index: 1, predicate: "_", optimizer: "Adam", default: true, name: None };
/// assert_eq!(caseopt::fingerprint(&[a, b]), caseopt::fingerprint(&[a, b]));
/// assert_ne!(caseopt::fingerprint(&[a, b]), caseopt::fingerprint(&[b, a]));
/// ```
pub fn fingerprint(rules: &[RuleInfo]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    };
    for r in rules {
        eat(r.predicate.as_bytes());
        eat(&[0]);
        eat(r.optimizer.as_bytes());
        eat(&[0, u8::from(r.default), 0xff]);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_fnv1a_and_ignores_names() {
        // FNV-1a of the empty input is the offset basis.
        assert_eq!(fingerprint(&[]), 0xcbf2_9ce4_8422_2325);
        let a = RuleInfo { index: 0, predicate: "_", optimizer: "Adam", default: true, name: None };
        let named = RuleInfo { name: Some("adam"), ..a };
        assert_eq!(fingerprint(&[a]), fingerprint(&[named]));
        let other = RuleInfo { optimizer: "AdamW", ..a };
        assert_ne!(fingerprint(&[a]), fingerprint(&[other]));
        // Pinned (computed independently with a few lines of Python) so that a change to the
        // hash, which would orphan checkpoints, is deliberate.
        assert_eq!(fingerprint(&[a]), 0x5372_9c4a_3e09_509f);
    }
}

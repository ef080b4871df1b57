//! The routing algorithm, larq's `CaseOptimizer` semantics: each variable goes to the one
//! non-default rule that claims it, else to the default rule, else nowhere; and the
//! [`RoutingTable`] that records where each variable went.

use std::collections::HashSet;
use std::fmt;

use tch::Kind;

use super::rules::{RuleInfo, RuleSpec};
use crate::error::{Error, Result};
use crate::predicate::dtype_name;
use crate::var::VarInfo;

/// Where one variable went.
///
/// ```
/// # use caseopt::{Predicate, RuleInfo, RuleSpec, VarInfo};
/// let rules = [RuleSpec {
///     info: RuleInfo { index: 0, predicate: "_", optimizer: "Adam", default: true, name: None },
///     predicate: Predicate::Any,
/// }];
/// let vars = [VarInfo::new("w", &[2], tch::Kind::Float, tch::Device::Cpu)];
/// let table = caseopt::RoutingTable::new(&rules, &[], &vars)?;
/// let route = &table.routes()[0];
/// assert_eq!((route.variable.as_str(), route.rule), ("w", Some(0)));
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The variable's full name.
    pub variable: String,
    /// Its shape when the router was built.
    pub shape: Vec<i64>,
    /// Its element type.
    pub kind: Kind,
    /// Its declared precision.
    pub bits: u8,
    /// The position (in the table's rules) of the rule that claimed it; `None` when it is left
    /// untrained. For a router's own table this is the rule's index.
    pub rule: Option<usize>,
}

/// Which rule, and so which optimizer, trains each variable; printable as an aligned table.
///
/// Built by a router's `build`; also constructible on its own to preview a routing
/// ([`RoutingTable::new`]). Variables no rule claims (possible only without a default rule)
/// are listed as untrained and named in [`warnings`](Self::warnings).
///
/// ```
/// use caseopt::{Glob, Predicate, RoutingTable, RuleInfo, RuleSpec, VarInfo};
/// use tch::{Device, Kind};
///
/// let rules = [RuleSpec {
///     info: RuleInfo { index: 0, predicate: "binary", optimizer: "Bop", default: false, name: None },
///     predicate: Predicate::Bits(1),
/// }];
/// let vars = [
///     VarInfo::new("fc.weight", &[4, 8], Kind::Float, Device::Cpu).with_bits(1),
///     VarInfo::new("fc.bias", &[4], Kind::Float, Device::Cpu),
/// ];
/// let table = RoutingTable::new(&rules, &[], &vars)?;
/// assert_eq!(table.untrained(), vec!["fc.bias"]);
/// assert_eq!(table.variables_of(0), vec!["fc.weight"]);
/// print!("{table}");
/// # Ok::<(), caseopt::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RoutingTable {
    rules: Vec<RuleInfo>,
    routes: Vec<Route>,
    warnings: Vec<String>,
    proven_disjoint: Vec<(usize, usize)>,
}

impl RoutingTable {
    /// Routes `vars` through `rules` with larq's semantics, without building optimizers.
    ///
    /// `proven_disjoint` lists rule pairs known never to claim the same variable (the macro's
    /// compile-time proofs); such pairs are not checked against each other. Fails on a variable
    /// claimed by two rules, on a non-default rule that claims nothing and on a variable name
    /// given twice.
    pub fn new(
        rules: &[RuleSpec],
        proven_disjoint: &[(usize, usize)],
        vars: &[VarInfo],
    ) -> Result<Self> {
        let assignment = assign(rules, proven_disjoint, vars)?;
        let routes = vars
            .iter()
            .zip(&assignment)
            .map(|(v, rule)| Route {
                variable: v.name.clone(),
                shape: v.shape.clone(),
                kind: v.kind,
                bits: v.bits,
                rule: *rule,
            })
            .collect::<Vec<_>>();
        let mut warnings = Vec::new();
        let untrained: Vec<&str> =
            routes.iter().filter(|r| r.rule.is_none()).map(|r| r.variable.as_str()).collect();
        if !untrained.is_empty() {
            let names = untrained.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>();
            warnings.push(format!(
                "no default rule `_`: {} variable{} claimed by no rule {} left untrained: {}; \
                 add `_ => Optimizer<...>` as the last rule to train {}",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                if names.len() == 1 { "is" } else { "are" },
                names.join(", "),
                if names.len() == 1 { "it" } else { "them" },
            ));
        }
        Ok(RoutingTable {
            rules: rules.iter().map(|r| r.info).collect(),
            routes,
            warnings,
            proven_disjoint: proven_disjoint.to_vec(),
        })
    }

    /// Routes variables added after the build with the same rules and checks (a name already
    /// routed, or a variable claimed by two rules, is an error naming it); `self` is unchanged
    /// on error. Returns each new variable's rule. A rule that claims none of them is fine: it
    /// claimed something when the router was built.
    pub(crate) fn extend(
        &mut self,
        rules: &[RuleSpec],
        vars: &[VarInfo],
    ) -> Result<Vec<Option<usize>>> {
        if let Some(v) = vars.iter().find(|v| self.route(&v.name).is_some()) {
            return Err(Error::DuplicateVariable { variable: v.name.clone() });
        }
        let (assignment, _) = claims(rules, &self.proven_disjoint, vars)?;
        let untrained: Vec<String> = vars
            .iter()
            .zip(&assignment)
            .filter(|(_, rule)| rule.is_none())
            .map(|(v, _)| format!("`{}`", v.name))
            .collect();
        if !untrained.is_empty() {
            self.warnings.push(format!(
                "no default rule `_`: variables added after the build and claimed by no rule are \
                 left untrained: {}",
                untrained.join(", ")
            ));
        }
        self.routes.extend(vars.iter().zip(&assignment).map(|(v, rule)| Route {
            variable: v.name.clone(),
            shape: v.shape.clone(),
            kind: v.kind,
            bits: v.bits,
            rule: *rule,
        }));
        Ok(assignment)
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[RuleInfo] {
        &self.rules
    }

    /// One route per variable, in the order the variables were given (sorted by name when built
    /// from a `VarStore`).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route of the variable named `variable`.
    pub fn route(&self, variable: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.variable == variable)
    }

    /// The rule that claimed `variable`; `None` when it is untrained or unknown.
    pub fn rule_of(&self, variable: &str) -> Option<&RuleInfo> {
        self.route(variable).and_then(|r| r.rule).and_then(|i| self.rules.get(i))
    }

    /// Names of the variables rule `rule` claimed, in routing order.
    pub fn variables_of(&self, rule: usize) -> Vec<&str> {
        self.routes.iter().filter(|r| r.rule == Some(rule)).map(|r| r.variable.as_str()).collect()
    }

    /// Names of the variables no rule claimed (left untrained).
    pub fn untrained(&self) -> Vec<&str> {
        self.routes.iter().filter(|r| r.rule.is_none()).map(|r| r.variable.as_str()).collect()
    }

    /// Warnings raised while routing (printed once to stderr by `build`).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Rule pairs proven disjoint at compile time, hence not checked against each other.
    pub fn proven_disjoint(&self) -> &[(usize, usize)] {
        &self.proven_disjoint
    }

    /// Rule pairs checked against each other when routing (every pair of non-default rules the
    /// compiler could not prove disjoint).
    pub fn checked_at_build(&self) -> Vec<(usize, usize)> {
        let n = self.rules.len();
        let mut out = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (&self.rules[i], &self.rules[j]);
                if !a.default && !b.default && !is_disjoint(&self.proven_disjoint, i, j) {
                    out.push((i, j));
                }
            }
        }
        out
    }
}

/// An aligned table `variable | shape | dtype | bits | rule | optimizer`, untrained variables
/// marked as such, followed by the warnings.
impl fmt::Display for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = ["variable", "shape", "dtype", "bits", "rule", "optimizer"];
        let rows: Vec<[String; 6]> = self
            .routes
            .iter()
            .map(|r| {
                let (rule, optimizer) = match r.rule.and_then(|i| self.rules.get(i)) {
                    Some(info) => (format!("#{} {}", info.index, info.predicate), info.optimizer),
                    None => ("-".to_string(), "(untrained)"),
                };
                [
                    r.variable.clone(),
                    format!("{:?}", r.shape),
                    dtype_name(r.kind).to_string(),
                    r.bits.to_string(),
                    rule,
                    optimizer.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: &[&str]| -> fmt::Result {
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(cell);
                } else {
                    out.push_str(&format!("{cell:<w$}  "));
                }
            }
            writeln!(f, "{}", out.trim_end())
        };
        line(f, &header)?;
        for row in &rows {
            line(f, &row.each_ref().map(String::as_str))?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

fn is_disjoint(pairs: &[(usize, usize)], i: usize, j: usize) -> bool {
    pairs.iter().any(|&(a, b)| (a, b) == (i, j) || (a, b) == (j, i))
}

/// larq's `CaseOptimizer` routing: each variable goes to the one non-default rule that claims
/// it, else to the default rule, else nowhere. Errors name the variable and the rules.
fn assign(
    rules: &[RuleSpec],
    proven_disjoint: &[(usize, usize)],
    vars: &[VarInfo],
) -> Result<Vec<Option<usize>>> {
    let (out, claimed_any) = claims(rules, proven_disjoint, vars)?;
    // By position: `info.index` is what the user wrote and is not trusted as an index.
    let unclaimed =
        rules.iter().zip(&claimed_any).find(|(r, claimed)| !r.info.default && !**claimed);
    if let Some((rule, _)) = unclaimed {
        return Err(Error::UnclaimedRule { rule: rule.info.to_string() });
    }
    Ok(out)
}

/// Each variable's rule (see [`assign`]) and, per rule, whether it claimed anything; fails on a
/// name given twice and on a variable claimed by two rules.
#[allow(clippy::type_complexity)]
fn claims(
    rules: &[RuleSpec],
    proven_disjoint: &[(usize, usize)],
    vars: &[VarInfo],
) -> Result<(Vec<Option<usize>>, Vec<bool>)> {
    let mut seen = HashSet::with_capacity(vars.len());
    for v in vars {
        if !seen.insert(v.name.as_str()) {
            return Err(Error::DuplicateVariable { variable: v.name.clone() });
        }
    }
    let n = rules.len();
    let mut disjoint = vec![false; n * n];
    for &(a, b) in proven_disjoint {
        if a < n && b < n {
            disjoint[a * n + b] = true;
            disjoint[b * n + a] = true;
        }
    }
    let default = rules.iter().position(|r| r.info.default);
    let mut claimed_any = vec![false; n];
    let mut out = Vec::with_capacity(vars.len());
    let mut matched = Vec::with_capacity(n);
    for v in vars {
        matched.clear();
        for (i, rule) in rules.iter().enumerate() {
            if rule.info.default {
                continue;
            }
            // A rule proven disjoint from one that already matched cannot match: skip it, so
            // proven pairs cost nothing (not even a call to a user predicate).
            if matched.iter().any(|&m: &usize| disjoint[m * n + i]) {
                continue;
            }
            if rule.predicate.matches(v) {
                matched.push(i);
            }
        }
        if matched.len() > 1 {
            return Err(Error::OverlappingRules {
                variable: v.name.clone(),
                rules: matched.iter().map(|&i| rules[i].info.to_string()).collect(),
            });
        }
        let rule = matched.first().copied().or(default);
        if let Some(i) = rule {
            claimed_any[i] = true;
        }
        out.push(rule);
    }
    Ok((out, claimed_any))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predicate::{Glob, Predicate};
    use tch::Device;

    fn rule(index: usize, text: &'static str, predicate: Predicate) -> RuleSpec {
        let default = matches!(predicate, Predicate::Any);
        RuleSpec {
            info: RuleInfo { index, predicate: text, optimizer: "Opt", default, name: None },
            predicate,
        }
    }

    fn var(name: &str, bits: u8, ndim: usize) -> VarInfo {
        VarInfo::new(name, &vec![2; ndim], Kind::Float, Device::Cpu).with_bits(bits)
    }

    #[test]
    fn overlapping_rules_name_the_variable_and_both_rules() {
        let rules = [rule(0, "binary", Predicate::Bits(1)), rule(1, "ndim(2)", Predicate::Ndim(2))];
        let err = RoutingTable::new(&rules, &[], &[var("a", 32, 2), var("b", 1, 2)]).unwrap_err();
        match err {
            Error::OverlappingRules { variable, rules } => {
                assert_eq!(variable, "b");
                assert_eq!(rules, vec!["binary => Opt", "ndim(2) => Opt"]);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn proven_disjoint_pairs_are_not_evaluated() {
        // A predicate that would claim everything: if the proof is honoured it is never asked
        // about a variable the first rule already claimed.
        fn everything(_: &VarInfo) -> bool {
            true
        }
        let rules = [
            rule(0, "binary", Predicate::Bits(1)),
            rule(1, "where(everything)", Predicate::User { text: "everything", f: everything }),
        ];
        let vars = [var("a", 1, 2), var("b", 32, 1)];
        assert!(RoutingTable::new(&rules, &[], &vars).is_err());
        let table = RoutingTable::new(&rules, &[(0, 1)], &vars).unwrap();
        assert_eq!(table.variables_of(0), vec!["a"]);
        assert_eq!(table.variables_of(1), vec!["b"]);
        assert!(table.checked_at_build().is_empty());
    }

    #[test]
    fn unclaimed_rule_and_duplicates_are_errors() {
        let rules = [rule(0, "bits(4)", Predicate::Bits(4)), rule(1, "_", Predicate::Any)];
        let err = RoutingTable::new(&rules, &[], &[var("a", 32, 1)]).unwrap_err();
        assert!(matches!(err, Error::UnclaimedRule { ref rule } if rule == "bits(4) => Opt"));
        let err = RoutingTable::new(&rules[1..], &[], &[var("a", 32, 1), var("a", 1, 1)]);
        assert!(matches!(err, Err(Error::DuplicateVariable { ref variable }) if variable == "a"));
    }

    #[test]
    fn rule_indices_as_written_are_not_trusted_as_positions() {
        let rules = [rule(7, "binary", Predicate::Bits(1))];
        let table = RoutingTable::new(&rules, &[(5, 9)], &[var("a", 1, 1)]).unwrap();
        assert_eq!(table.routes()[0].rule, Some(0));
        assert_eq!(table.rule_of("a").map(|r| r.index), Some(7));
        let err = RoutingTable::new(&rules, &[], &[var("b", 32, 1)]).unwrap_err();
        assert!(matches!(err, Error::UnclaimedRule { .. }), "{err}");
    }

    #[test]
    fn untrained_variables_are_recorded_and_the_table_aligns() {
        let rules = [rule(0, r#"name("*.w")"#, Predicate::Name(Glob::new("*.w")))];
        let table =
            RoutingTable::new(&rules, &[], &[var("layer.w", 1, 2), var("b", 32, 1)]).unwrap();
        assert_eq!(table.untrained(), vec!["b"]);
        assert_eq!(table.warnings().len(), 1);
        assert!(table.warnings()[0].contains("`b`"), "{}", table.warnings()[0]);
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "variable  shape   dtype  bits  rule            optimizer");
        assert_eq!(lines[1], r#"layer.w   [2, 2]  f32    1     #0 name("*.w")  Opt"#);
        assert_eq!(lines[2], "b         [2]     f32    32    -               (untrained)");
        assert!(lines[3].starts_with("warning: no default rule `_`: 1 variable"));
    }
}

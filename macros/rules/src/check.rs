//! Checks that look across rules (and the few that need the built-in optimizers' tables):
//! exclusivity of every pair of rules, unsatisfiable rules, the default rule's place, rule
//! names, duplicate and unknown hyperparameters and literal hyperparameters out of range.
//!
//! Every problem becomes one error spanned at the user's tokens; all are reported together.

use std::collections::HashMap;
use std::ops::Not;

use proc_macro2::TokenStream;
use quote::ToTokens;

use crate::ast::{Atom, Input, Literal, Pred, Rule, RulePredicate};
use crate::builtin::{Field, OptimizerKind, MASTER_WEIGHTS};
use crate::logic::{self, Answer, Budget, Formula, Proposition, Relation};

/// What the checks proved, for the expansion and for tests.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Rule pairs (by rule index) proven disjoint: not checked against each other at build.
    pub disjoint: Vec<(usize, usize)>,
    /// Every pair of non-default, well-formed rules and how they relate.
    pub relations: Vec<(usize, usize, Relation)>,
    /// Rules proven unsatisfiable.
    pub unsatisfiable: Vec<usize>,
    /// Rules whose `as name` is usable (no clash).
    pub named: Vec<usize>,
    /// Work units the exclusivity checks spent (see [`logic::Budget`]).
    pub work: u64,
    /// Whether the work budget left some rule or pair undecided (so checked at build).
    pub budget_ran_out: bool,
    /// Hyperparameters `(rule, position)` left out of the expansion because their error is
    /// reported already (duplicates, a literal of the wrong kind).
    pub skipped_hyperparameters: Vec<(usize, usize)>,
}

/// Methods every generated router has, inherently or through `caseopt::Router`; a rule name
/// must not shadow them (an inherent accessor would win over the trait's method).
pub const ROUTER_METHODS: &[&str] = &[
    "step",
    "zero_grad",
    "backward_step",
    "clip_grad_norm",
    "clip_grad_norm_per_rule",
    "rules",
    "routing_table",
    "fingerprint",
    "step_counts",
    "optimizer",
    "optimizer_mut",
    "variable_store",
    "set_non_finite_policy",
    "non_finite_policy",
    "skipped_steps",
    "binarised_variables",
    "builder",
    "build",
    "build_from",
];

/// Runs every check; returns what was proven and the errors found.
pub fn check(input: &Input) -> (Analysis, Vec<syn::Error>) {
    let mut errors = Vec::new();
    check_default_rule(&input.rules, &mut errors);
    let named = check_rule_names(&input.rules, &mut errors);
    let mut skipped_hyperparameters = Vec::new();
    for rule in &input.rules {
        let skipped = check_hyperparameters(rule, &mut errors);
        skipped_hyperparameters.extend(skipped.into_iter().map(|p| (rule.index, p)));
    }
    let mut analysis = check_exclusivity(&input.rules, &mut errors);
    analysis.named = named;
    analysis.skipped_hyperparameters = skipped_hyperparameters;
    (analysis, errors)
}

fn check_default_rule(rules: &[Rule], errors: &mut Vec<syn::Error>) {
    let mut seen = false;
    for (pos, rule) in rules.iter().enumerate() {
        if let RulePredicate::Default(underscore) = &rule.predicate {
            if seen {
                errors.push(syn::Error::new_spanned(
                    underscore,
                    "a second default rule `_`; keep only one default rule, as the last rule",
                ));
            } else if rules[pos + 1..].iter().any(|r| !r.predicate.is_default()) {
                errors.push(syn::Error::new_spanned(
                    underscore,
                    "the default rule `_` must be the last rule; move it after the other rules",
                ));
            }
            seen = true;
        }
    }
}

/// Checks `as name` names; returns the indices of rules whose name is usable (the expansion
/// gives only those named accessors, so a clash is reported once, by this check).
fn check_rule_names(rules: &[Rule], errors: &mut Vec<syn::Error>) -> Vec<usize> {
    let mut owners: HashMap<String, usize> = HashMap::new();
    for rule in rules {
        owners.insert(format!("rule{}", rule.index), rule.index);
        owners.insert(format!("rule{}_mut", rule.index), rule.index);
    }
    let mut usable = Vec::new();
    for rule in rules {
        let Some(name) = &rule.name else { continue };
        let generated = [name.to_string(), format!("{name}_mut")];
        let clash = generated.iter().find_map(|g| {
            if ROUTER_METHODS.contains(&g.as_str()) {
                return Some(format!("the router's method `{g}()`"));
            }
            let other = *owners.get(g)?;
            let text = rules.iter().find(|r| r.index == other).map(|r| r.predicate.to_string());
            Some(format!("the accessor `{g}()` of rule {other} `{}`", text.unwrap_or_default()))
        });
        match clash {
            Some(clash) => errors.push(syn::Error::new(
                name.span(),
                format!("rule name `{name}` clashes with {clash}; choose another name"),
            )),
            None => {
                for g in generated {
                    owners.insert(g, rule.index);
                }
                usable.push(rule.index);
            }
        }
    }
    usable
}

/// Checks one rule's hyperparameters; returns the positions of those the expansion must leave
/// out because the error is already reported here (so rustc does not report it again).
fn check_hyperparameters(rule: &Rule, errors: &mut Vec<syn::Error>) -> Vec<usize> {
    let spec = &rule.optimizer;
    let mut seen: Vec<String> = Vec::new();
    let mut skipped = Vec::new();
    for (position, param) in spec.hyperparameters.iter().enumerate() {
        let key = param.key.to_string();
        if seen.contains(&key) {
            errors.push(syn::Error::new(
                param.key.span(),
                format!("duplicate hyperparameter `{key}`; remove one of them"),
            ));
            skipped.push(position);
            continue;
        }
        seen.push(key.clone());
        if key == MASTER_WEIGHTS {
            // Not a config field: always left out of the config's struct literal, and a
            // literal, since the expansion decides how the optimizer is built from it.
            skipped.push(position);
            let message = match (spec.builtin, param.value.literal) {
                (None, _) => format!(
                    "`{MASTER_WEIGHTS}` is a key of caseopt's built-in optimizers; `{}` is not one \
                     (implement `Optimizer::set_master_weights` and call it yourself)",
                    compact(&spec.path.to_token_stream())
                ),
                (Some(_), Some(Literal::Bool(_))) => continue,
                (Some(builtin), _) => format!(
                    "`{MASTER_WEIGHTS}` of `{}` is the literal `true` or `false`, got `{}`",
                    builtin.type_name(),
                    compact(&param.value.tokens)
                ),
            };
            errors.push(syn::Error::new_spanned(&param.value.tokens, message));
            continue;
        }
        let Some(builtin) = spec.builtin else { continue };
        // Reported here rather than by rustc, whose "no field" error for a struct literal
        // with `..Default::default()` adds a misleading "all struct fields are already
        // assigned"; a user optimizer's unknown keys are still rustc's to report.
        let Some(field) = builtin.field(&key) else {
            errors.push(syn::Error::new(param.key.span(), unknown_hyperparameter(builtin, &key)));
            skipped.push(position);
            continue;
        };
        let message = match (field, param.value.literal) {
            (Field::Schedule(range) | Field::Float(range), Some(Literal::Number { value, .. }))
                if !range.contains(value) =>
            {
                format!(
                    "`{key}` of `{}` must be {}, got `{}`",
                    builtin.type_name(),
                    range.describe(),
                    compact(&param.value.tokens)
                )
            }
            (Field::Schedule(_) | Field::Float(_), Some(Literal::Bool(_))) => format!(
                "`{key}` of `{}` is a number or a schedule, got `{}`",
                builtin.type_name(),
                compact(&param.value.tokens)
            ),
            (Field::Bool, Some(Literal::Number { .. })) => format!(
                "`{key}` of `{}` is `true` or `false`, got `{}`",
                builtin.type_name(),
                compact(&param.value.tokens)
            ),
            _ => continue,
        };
        errors.push(syn::Error::new_spanned(&param.value.tokens, message));
        skipped.push(position);
    }
    if let Some(builtin) = spec.builtin {
        check_nesterov(builtin, rule, errors);
    }
    skipped
}

/// "unknown hyperparameter `key` for `Opt`; expected one of: ...", the valid keys in the
/// config's order.
fn unknown_hyperparameter(builtin: OptimizerKind, key: &str) -> String {
    let expected: Vec<String> = builtin
        .fields()
        .iter()
        .map(|(k, _)| *k)
        .chain([MASTER_WEIGHTS])
        .map(|k| format!("`{k}`"))
        .collect();
    format!(
        "unknown hyperparameter `{key}` for `{builtin}`; expected one of: {}",
        expected.join(", ")
    )
}

/// SGD's one cross-field rule, when the values are literals: Nesterov momentum needs a
/// momentum above 0 and no dampening (torch raises the same at construction).
fn check_nesterov(builtin: OptimizerKind, rule: &Rule, errors: &mut Vec<syn::Error>) {
    if builtin != OptimizerKind::Sgd {
        return;
    }
    let find = |k: &str| rule.optimizer.hyperparameters.iter().find(|p| p.key == k);
    let Some(nesterov) = find("nesterov") else { return };
    if nesterov.value.literal != Some(Literal::Bool(true)) {
        return;
    }
    let number = |k: &str| match find(k) {
        None => Some(0.0),
        Some(p) => match p.value.literal {
            Some(Literal::Number { value, .. }) => Some(value),
            _ => None,
        },
    };
    if number("momentum").is_some_and(|m| m <= 0.0) {
        errors.push(syn::Error::new(
            nesterov.key.span(),
            "`nesterov: true` needs a `momentum` above 0 (the default is 0); add e.g. `momentum: 0.9`",
        ));
    }
    if number("dampening").is_some_and(|d| d != 0.0) {
        errors.push(syn::Error::new(
            nesterov.key.span(),
            "`nesterov: true` needs `dampening: 0`; remove the dampening",
        ));
    }
}

/// Tokens as one short string without the spaces `to_string` puts between them.
fn compact(tokens: &TokenStream) -> String {
    tokens.to_string().replace(' ', "")
}

/// The formula a predicate means, or `None` if an atom in it failed to parse.
pub fn formula(pred: &Pred) -> Option<Formula> {
    Some(match pred {
        Pred::Atom(a) => Formula::Proposition(match a {
            Atom::Binary => Proposition::Bits(1),
            Atom::Bits(n) => Proposition::Bits(*n),
            Atom::Ndim(n) => Proposition::Ndim(*n),
            Atom::Name(g) => Proposition::Name(g.clone()),
            Atom::Dtype(d) => Proposition::Dtype((*d).to_string()),
            Atom::User { key, .. } => Proposition::User(key.clone()),
            Atom::Invalid => return None,
        }),
        Pred::Not(p) => formula(p)?.not(),
        Pred::Paren(p) => formula(p)?,
        Pred::And(ps) => Formula::And(ps.iter().map(formula).collect::<Option<_>>()?),
        Pred::Or(ps) => Formula::Or(ps.iter().map(formula).collect::<Option<_>>()?),
    })
}

fn check_exclusivity(rules: &[Rule], errors: &mut Vec<syn::Error>) -> Analysis {
    check_exclusivity_within(rules, errors, Budget::default())
}

/// [`check_exclusivity`] with the given budget: once it is spent, what is left undecided is
/// checked when the router is built.
fn check_exclusivity_within(
    rules: &[Rule],
    errors: &mut Vec<syn::Error>,
    mut budget: Budget,
) -> Analysis {
    let mut analysis = Analysis::default();
    // Non-default rules whose predicate is well formed, with their formulas.
    let mut live: Vec<(&Rule, &Pred, Formula)> = Vec::new();
    for rule in rules {
        let RulePredicate::Formula(pred) = &rule.predicate else { continue };
        let Some(f) = formula(pred) else { continue };
        match logic::satisfiable(&f, &mut budget) {
            (Answer::Unsat, conflict) => {
                let reason = conflict.map(|c| format!(": {}", c.describe())).unwrap_or_default();
                errors.push(syn::Error::new_spanned(
                    &rule.predicate_tokens,
                    format!(
                        "rule `{pred}` can never match a variable{reason}; remove the rule or fix its predicate"
                    ),
                ));
                analysis.unsatisfiable.push(rule.index);
            }
            _ => live.push((rule, pred, f)),
        }
    }
    for (i, (a, pa, fa)) in live.iter().enumerate() {
        for (b, pb, fb) in &live[i + 1..] {
            let relation = logic::relation(fa, fb, &mut budget);
            analysis.relations.push((a.index, b.index, relation));
            match relation {
                Relation::Disjoint => analysis.disjoint.push((a.index, b.index)),
                Relation::Unknown => {}
                Relation::Equivalent => errors.push(syn::Error::new_spanned(
                    &b.predicate_tokens,
                    format!(
                        "rule `{pb}` matches exactly the variables of rule `{pa}`, so each of them would be claimed twice; merge the two rules or make them exclusive"
                    ),
                )),
                Relation::FirstImpliesSecond => errors.push(overlap(a, pa, pb)),
                Relation::SecondImpliesFirst => errors.push(overlap(b, pb, pa)),
            }
        }
    }
    check_required_ndim(rules, &live, errors, &mut budget);
    analysis.work = budget.used();
    analysis.budget_ran_out = budget.ran_out();
    analysis
}

/// `f` with negations pushed to the atoms and every `where(...)` literal, of either sign,
/// replaced by false: a variable that satisfies the result satisfies `f` whatever the user
/// functions answer (by induction over the negation normal form).
fn without_user_atoms(f: &Formula, positive: bool) -> Formula {
    match f {
        Formula::Proposition(Proposition::User(_)) => Formula::Or(Vec::new()),
        Formula::Proposition(p) => {
            let atom = Formula::Proposition(p.clone());
            if positive {
                atom
            } else {
                !atom
            }
        }
        Formula::Not(g) => without_user_atoms(g, !positive),
        Formula::And(gs) | Formula::Or(gs) => {
            let parts = gs.iter().map(|g| without_user_atoms(g, positive)).collect();
            match (f, positive) {
                (Formula::And(_), true) | (Formula::Or(_), false) => Formula::And(parts),
                _ => Formula::Or(parts),
            }
        }
    }
}

/// Rules routing to an optimizer that trains variables of one number of dimensions only
/// (Muon: 2-D) must say so: a rule whose predicate is proven to admit a variable of another
/// number of dimensions, whatever its `where(...)` functions answer, is an error. What depends
/// on user functions (or on a spent budget) is left to the build, which refuses the variable by
/// name. The default rule's predicate is the negation of every other rule's.
fn check_required_ndim(
    rules: &[Rule],
    live: &[(&Rule, &Pred, Formula)],
    errors: &mut Vec<syn::Error>,
    budget: &mut Budget,
) {
    for rule in rules {
        let Some(builtin) = rule.optimizer.builtin else { continue };
        let Some(n) = builtin.required_ndim() else { continue };
        let ndim = Formula::Proposition(Proposition::Ndim(n));
        match &rule.predicate {
            RulePredicate::Formula(pred) => {
                let Some((_, _, f)) = live.iter().find(|(r, _, _)| r.index == rule.index) else {
                    continue; // unsatisfiable or malformed: reported already
                };
                let stray = Formula::And(vec![without_user_atoms(f, true), !ndim.clone()]);
                if logic::satisfiable(&stray, budget).0 != Answer::Sat {
                    continue;
                }
                let never = Formula::And(vec![f.clone(), ndim]);
                let message = if logic::satisfiable(&never, budget).0 == Answer::Unsat {
                    format!(
                        "rule `{pred}` routes variables to `{builtin}`, which trains {n}-D variables only, but no {n}-D variable can match it; route these variables to another optimizer"
                    )
                } else {
                    let inner = match pred {
                        Pred::Or(_) => format!("({pred})"),
                        _ => pred.to_string(),
                    };
                    format!(
                        "rule `{pred}` routes variables to `{builtin}`, which trains {n}-D variables only, but its predicate does not imply `ndim({n})`; write `ndim({n}) & {inner}`"
                    )
                };
                errors.push(syn::Error::new_spanned(&rule.predicate_tokens, message));
            }
            RulePredicate::Default(underscore) => {
                let others: Vec<&Rule> =
                    rules.iter().filter(|r| !r.predicate.is_default()).collect();
                let mut claimed = Vec::new();
                for other in others {
                    let RulePredicate::Formula(pred) = &other.predicate else { continue };
                    match formula(pred) {
                        Some(f) => claimed.push(f),
                        None => return, // a malformed rule, reported already
                    }
                }
                let default = Formula::And(claimed.into_iter().map(|f| !f).collect());
                let stray = Formula::And(vec![without_user_atoms(&default, true), !ndim]);
                if logic::satisfiable(&stray, budget).0 == Answer::Sat {
                    errors.push(syn::Error::new_spanned(
                        underscore,
                        format!(
                            "the default rule `_` routes to `{builtin}`, which trains {n}-D variables only, but it claims every variable the other rules leave, which need not be {n}-D; give `{builtin}` a rule `ndim({n}) & ...` and make another optimizer the default, e.g. `ndim({n}) => {builtin}<..>, _ => AdamW<..>`"
                        ),
                    ));
                }
            }
        }
    }
}

/// The error for a rule `narrow` whose every variable the rule with predicate `wide` also
/// claims; spanned at the narrower rule, suggesting to carve it out of the wider one.
fn overlap(narrow_rule: &Rule, narrow: &Pred, wide: &Pred) -> syn::Error {
    let wide_text = match wide {
        Pred::Or(_) => format!("({wide})"),
        _ => wide.to_string(),
    };
    let excluded = match narrow {
        Pred::And(_) | Pred::Or(_) => format!("!({narrow})"),
        _ => format!("!{narrow}"),
    };
    syn::Error::new_spanned(
        narrow_rule.predicate_tokens.to_token_stream(),
        format!(
            "every variable rule `{narrow}` matches is also matched by rule `{wide}`, so it would be claimed twice; make the rules exclusive, e.g. write the wider rule as `{wide_text} & {excluded}`"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn run(src: &str) -> (Analysis, Vec<String>) {
        let input = Input::parse(TokenStream::from_str(src).expect("lexes"));
        assert!(input.errors.is_empty(), "parse errors: {:?}", input.errors);
        let (analysis, errors) = check(&input);
        (analysis, errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_valid_bnn_router_has_no_errors_and_proves_its_pairs() {
        let (analysis, errors) = run(
            r#"binary => Bop, !binary & ndim(4) => Sgd, name("*.bias") & !binary & !ndim(4) => Adam, _ => Adam"#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(analysis.disjoint, vec![(0, 1), (0, 2), (1, 2)]);
    }

    #[test]
    fn undecided_pairs_are_left_to_the_build() {
        let (analysis, errors) =
            run(r#"binary => Bop, ndim(2) => Adam, where(f) => Sgd, _ => Adam"#);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(analysis.disjoint.is_empty());
        assert_eq!(analysis.relations.len(), 3);
        assert!(analysis.relations.iter().all(|r| r.2 == Relation::Unknown));
    }

    #[test]
    fn overlaps_and_contradictions_are_errors() {
        let (_, e) = run("binary => Bop, bits(1) => Adam");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("rule `bits(1)` matches exactly the variables of rule `binary`"),
            "{e:?}"
        );
        let (_, e) = run("binary | ndim(2) => Bop, binary & ndim(4) => Adam");
        assert_eq!(
            e,
            vec!["every variable rule `binary & ndim(4)` matches is also matched by rule `binary | ndim(2)`, so it would be claimed twice; make the rules exclusive, e.g. write the wider rule as `(binary | ndim(2)) & !(binary & ndim(4))`"]
        );
        let (analysis, e) = run(r#"name("*.w") & name("*.b") => Bop, _ => Adam"#);
        assert_eq!(analysis.unsatisfiable, vec![0]);
        assert!(e[0].contains("no variable name matches all of its `name` conditions"), "{e:?}");
    }

    #[test]
    fn default_rule_placement() {
        let (_, e) = run("_ => Adam, binary => Bop");
        assert!(e[0].starts_with("the default rule `_` must be the last rule"));
        let (_, e) = run("binary => Bop, _ => Adam, _ => Sgd");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("a second default rule `_`"));
        let (_, e) = run("_ => Adam, binary => Bop, _ => Sgd");
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn hyperparameter_literals_and_duplicates() {
        let (_, e) = run("binary => Bop<gamma: 0, threshold: -1e-6>, _ => Adam<lr: 1e-3, lr: 1e-2, beta2: 1.0, eps: 0.0>");
        assert_eq!(
            e,
            vec![
                "`gamma` of `Bop` must be in (0, 1], got `0`",
                "`threshold` of `Bop` must be >= 0, got `-1e-6`",
                "duplicate hyperparameter `lr`; remove one of them",
                "`beta2` of `Adam` must be in [0, 1), got `1.0`",
                "`eps` of `Adam` must be > 0, got `0.0`",
            ]
        );
        let (_, e) = run("_ => Adam<amsgrad: 0.5, lr: true, maximize: false>");
        assert_eq!(
            e,
            vec![
                "`amsgrad` of `Adam` is `true` or `false`, got `0.5`",
                "`lr` of `Adam` is a number or a schedule, got `true`",
            ]
        );
        let (_, e) = run("binary => Bop<treshold: 1e-6>, _ => Adam<learning_rate: 0.1, lr: 0.1>");
        assert_eq!(
            e,
            vec![
                "unknown hyperparameter `treshold` for `Bop`; expected one of: `threshold`, `gamma`, `master_weights`",
                "unknown hyperparameter `learning_rate` for `Adam`; expected one of: `lr`, `beta1`, `beta2`, `eps`, `weight_decay`, `amsgrad`, `maximize`, `master_weights`",
            ]
        );
        // User optimizers are checked for duplicates only (rustc reports their unknown keys).
        let (_, e) = run("_ => my::Opt<gamma: 7, gamma: 8>");
        assert_eq!(e, vec!["duplicate hyperparameter `gamma`; remove one of them"]);
        let (_, e) = run("_ => Sgd<lr: 0.1, nesterov: true>");
        assert!(e[0].starts_with("`nesterov: true` needs a `momentum` above 0"), "{e:?}");
        let (_, e) = run("_ => Sgd<lr: 0.1, nesterov: true, momentum: (m)>");
        assert!(e.is_empty(), "{e:?}");
    }

    /// `(name("*a*") | name("*b*")) & (name("*c*") | name("*d*")) & ... & !name("*")`: `k` pairs
    /// multiply out to 2^k conjunctions, each a product automaton of k + 1 globs.
    fn glob_pairs(k: usize) -> String {
        let letters: Vec<char> = ('a'..='z').collect();
        let pairs: Vec<String> = (0..k)
            .map(|i| {
                format!(r#"(name("*{}*") | name("*{}*"))"#, letters[2 * i], letters[2 * i + 1])
            })
            .collect();
        format!(r#"{} & !name("*")"#, pairs.join(" & "))
    }

    #[test]
    fn the_checkers_work_is_bounded() {
        // Took 299 s to check before the invocation budget; now one check's share.
        let src = format!(
            "{} => Bop, binary => Sgd, !binary & ndim(2) => Adam, _ => Adam",
            glob_pairs(12)
        );
        let (analysis, errors) = run(&src);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(analysis.budget_ran_out);
        assert!(analysis.work <= logic::INVOCATION_BUDGET, "{}", analysis.work);
        // The rule is undecided, not judged unsatisfiable; its pairs are left to the build.
        assert!(analysis.unsatisfiable.is_empty());
        assert_eq!(
            analysis.relations,
            vec![(0, 1, Relation::Unknown), (0, 2, Relation::Unknown), (1, 2, Relation::Disjoint)]
        );
        assert_eq!(analysis.disjoint, vec![(1, 2)]);
    }

    #[test]
    fn a_spent_budget_leaves_every_later_pair_to_the_build() {
        let input = Input::parse(
            TokenStream::from_str("binary => Bop, bits(2) => Sgd, bits(3) => Adam, _ => Adam")
                .expect("lexes"),
        );
        let mut errors = Vec::new();
        let analysis = check_exclusivity_within(&input.rules, &mut errors, Budget::new(40, 40));
        assert!(errors.is_empty());
        assert!(analysis.budget_ran_out);
        assert!(analysis.work <= 40, "{}", analysis.work);
        assert_eq!(analysis.relations[0], (0, 1, Relation::Disjoint));
        assert_eq!(analysis.relations[2], (1, 2, Relation::Unknown));
        // With the default budget the same rules are all proven disjoint.
        let (analysis, _) = run("binary => Bop, bits(2) => Sgd, bits(3) => Adam, _ => Adam");
        assert!(!analysis.budget_ran_out);
        assert_eq!(analysis.disjoint, vec![(0, 1), (0, 2), (1, 2)]);
    }

    #[test]
    fn muon_rules_must_imply_two_dimensions() {
        let (_, e) = run("_ => Muon");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("the default rule `_` routes to `Muon`"), "{e:?}");
        let (_, e) = run("binary => Muon, _ => AdamW");
        assert_eq!(
            e,
            vec!["rule `binary` routes variables to `Muon`, which trains 2-D variables only, but its predicate does not imply `ndim(2)`; write `ndim(2) & binary`"]
        );
        let (_, e) = run(r#"name("*.w") | ndim(2) => Muon, _ => AdamW"#);
        assert!(e[0].ends_with(r#"write `ndim(2) & (name("*.w") | ndim(2))`"#), "{e:?}");
        let (_, e) = run("ndim(4) => Muon, _ => AdamW");
        assert!(e[0].contains("no 2-D variable can match it"), "{e:?}");
        // Implied: accepted.
        for ok in [
            "ndim(2) & !binary => Muon<lr: 0.02>, _ => AdamW",
            "ndim(2) => Muon, _ => AdamW",
            "!ndim(2) => AdamW, _ => Muon",
            "binary => Bop, !binary & !ndim(2) => AdamW, _ => Muon",
            // Decided by the user function: refused at build if a variable is not 2-D.
            "where(is_matrix) => Muon, _ => AdamW",
            "ndim(2) | where(f) => Muon, _ => AdamW",
            "!where(f) => AdamW, _ => Muon",
        ] {
            let (_, e) = run(ok);
            assert!(e.is_empty(), "{ok}: {e:?}");
        }
        // A user function does not excuse the part of the predicate that does not use it.
        let (_, e) = run("where(f) | binary => Muon, _ => AdamW");
        assert_eq!(e.len(), 1, "{e:?}");
    }

    #[test]
    fn rule_names_must_not_clash() {
        let (_, e) = run("binary => Bop as step, _ => Adam as rule0");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("the router's method `step()`"));
        assert!(e[1].contains("the accessor `rule0()` of rule 0 `binary`"));
        let (_, e) = run("binary => Bop as a, _ => Adam as a");
        assert!(e[0].contains("the accessor `a()` of rule 0"), "{e:?}");
        let (_, e) = run("binary => Bop as bop, _ => Adam as adam");
        assert!(e.is_empty());
    }
}

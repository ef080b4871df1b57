//! The macro's compile-time verdicts against the runtime's routing.
//!
//! The macro's parser and checker live in the `caseopt-rules` library, which `case_optimizer!`
//! calls too, so the verdicts checked here are exactly the ones the macro acts on. Random rule
//! pairs are printed by the runtime's `Predicate`
//! (whose `Display` is the macro's syntax), parsed and judged by the macro's checker, and the
//! verdict is held against the runtime: whatever the compiler rejects, the build would reject
//! on any variables; whatever it proves disjoint, no variable set ever overlaps.

use std::collections::BTreeSet;
use std::str::FromStr;

use caseopt::{Error, Glob, Predicate, RoutingTable, RuleInfo, RuleSpec, VarInfo};
use caseopt_rules::logic::Relation;
use caseopt_rules::{ast, check, Field, OptimizerKind};
use proptest::prelude::*;
use tch::{Device, Kind};

fn big(v: &VarInfo) -> bool {
    v.numel() > 4
}

fn wide(v: &VarInfo) -> bool {
    v.shape.first().is_some_and(|&d| d >= 2)
}

/// A user predicate and the text a rule names it with.
type UserPredicate = (&'static str, fn(&VarInfo) -> bool);

const USER: &[UserPredicate] = &[("big", big), ("wide", wide)];

fn atom() -> impl Strategy<Value = Predicate> {
    let glob =
        proptest::collection::vec(proptest::sample::select(vec!['a', 'b', '.', '*', '?']), 0..4)
            .prop_map(|cs| Predicate::Name(Glob::new(&cs.into_iter().collect::<String>())));
    prop_oneof![
        proptest::sample::select(vec![1u8, 2, 8]).prop_map(Predicate::Bits),
        (0usize..3).prop_map(Predicate::Ndim),
        glob,
        proptest::sample::select(vec![Kind::Float, Kind::Double, Kind::Half])
            .prop_map(Predicate::Dtype),
        (0..USER.len()).prop_map(|i| Predicate::User { text: USER[i].0, f: USER[i].1 }),
    ]
}

fn predicate() -> impl Strategy<Value = Predicate> {
    atom().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|p| Predicate::Not(Box::new(p))),
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Predicate::And),
            proptest::collection::vec(inner, 2..4).prop_map(Predicate::Or),
        ]
    })
}

fn variable() -> impl Strategy<Value = VarInfo> {
    (
        proptest::collection::vec(proptest::sample::select(vec!['a', 'b', '.', 'x']), 0..5),
        proptest::sample::select(vec![1u8, 2, 8, 32]),
        proptest::collection::vec(1i64..4, 0..3),
        proptest::sample::select(vec![Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16]),
    )
        .prop_map(|(name, bits, shape, kind)| {
            VarInfo::new(name.into_iter().collect::<String>(), &shape, kind, Device::Cpu)
                .with_bits(bits)
        })
}

/// Distinct names, as a router requires.
fn variables() -> impl Strategy<Value = Vec<VarInfo>> {
    proptest::collection::vec(variable(), 0..10).prop_map(|vs| {
        let mut seen = BTreeSet::new();
        vs.into_iter().filter(|v| seen.insert(v.name.clone())).collect()
    })
}

/// Every combination of a few names, widths, shapes and dtypes: the universe the verdicts are
/// also checked on exhaustively.
fn universe() -> Vec<VarInfo> {
    let mut names = vec![String::new()];
    let mut frontier = vec![String::new()];
    for _ in 0..3 {
        let next: Vec<String> =
            frontier.iter().flat_map(|n| ['a', 'b', '.', 'x'].map(|c| format!("{n}{c}"))).collect();
        names.extend(next.iter().cloned());
        frontier = next;
    }
    let mut out = Vec::new();
    for name in &names {
        for bits in [1u8, 2, 8, 32] {
            for shape in [&[][..], &[1], &[3], &[1, 2], &[2, 3], &[2, 1, 3]] {
                for kind in [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16] {
                    out.push(VarInfo::new(name.as_str(), shape, kind, Device::Cpu).with_bits(bits));
                }
            }
        }
    }
    out
}

fn spec(index: usize, text: &str, predicate: Predicate, default: bool) -> RuleSpec {
    let leaked: &'static str = Box::leak(text.to_string().into_boxed_str());
    let optimizer = ["Bop", "Adam", "Sgd"][index];
    RuleSpec {
        info: RuleInfo { index, predicate: leaked, optimizer, default, name: None },
        predicate,
    }
}

/// What the macro says about `a => Bop, b => Adam, _ => Sgd`.
struct Verdict {
    unsatisfiable: Vec<usize>,
    relation: Option<Relation>,
    errors: Vec<String>,
}

fn macro_verdict(a: &Predicate, b: &Predicate) -> Verdict {
    let src = format!("{a} => Bop, {b} => Adam, _ => Sgd");
    let input = ast::Input::parse(proc_macro2::TokenStream::from_str(&src).expect("lexes"));
    assert!(input.errors.is_empty(), "{src}: {:?}", input.errors);
    assert_eq!(input.rules[0].predicate.to_string(), a.to_string(), "round trip of {a}");
    let (analysis, errors) = check::check(&input);
    Verdict {
        unsatisfiable: analysis.unsatisfiable,
        relation: analysis.relations.first().map(|r| r.2),
        errors: errors.iter().map(ToString::to_string).collect(),
    }
}

fn route(
    rules: &[RuleSpec],
    disjoint: &[(usize, usize)],
    vars: &[VarInfo],
) -> Result<Vec<Option<usize>>, Error> {
    Ok(RoutingTable::new(rules, disjoint, vars)?.routes().iter().map(|r| r.rule).collect())
}

fn check_pair(
    a: &Predicate,
    b: &Predicate,
    vars: &[VarInfo],
    universe: &[VarInfo],
) -> Result<(), TestCaseError> {
    let verdict = macro_verdict(a, b);
    let rules = [
        spec(0, &a.to_string(), a.clone(), false),
        spec(1, &b.to_string(), b.clone(), false),
        spec(2, "_", Predicate::Any, true),
    ];
    let both = |v: &VarInfo| a.matches(v) && b.matches(v);
    for &i in &verdict.unsatisfiable {
        let p = if i == 0 { a } else { b };
        prop_assert!(!universe.iter().any(|v| p.matches(v)), "`{p}` judged unsatisfiable");
        // The build rejects such a rule on any variables: it claims nothing.
        let alone = [spec(0, &p.to_string(), p.clone(), false), spec(1, "_", Predicate::Any, true)];
        let unclaimed = matches!(route(&alone, &[], vars), Err(Error::UnclaimedRule { .. }));
        prop_assert!(unclaimed);
    }
    if !verdict.unsatisfiable.is_empty() {
        return Ok(());
    }
    match verdict.relation {
        Some(Relation::Disjoint) => {
            prop_assert!(!universe.iter().any(both), "`{a}` and `{b}` judged disjoint");
            prop_assert!(!vars.iter().any(both));
            // Skipping the check for the proven pair changes nothing.
            let checked = route(&rules, &[], vars);
            let trusted = route(&rules, &[(0, 1)], vars);
            let overlapped = matches!(checked, Err(Error::OverlappingRules { .. }));
            prop_assert!(!overlapped, "`{a}` and `{b}` overlapped at build");
            prop_assert_eq!(format!("{checked:?}"), format!("{trusted:?}"));
            prop_assert!(verdict.errors.is_empty(), "{:?}", verdict.errors);
        }
        Some(
            r
            @ (Relation::Equivalent | Relation::FirstImpliesSecond | Relation::SecondImpliesFirst),
        ) => {
            prop_assert_eq!(verdict.errors.len(), 1, "{:?}", verdict.errors);
            let (narrow, wide) = match r {
                Relation::SecondImpliesFirst => (b, a),
                _ => (a, b),
            };
            prop_assert!(
                universe.iter().all(|v| !narrow.matches(v) || wide.matches(v)),
                "`{narrow}` judged to imply `{wide}`"
            );
            if r == Relation::Equivalent {
                prop_assert!(universe.iter().all(|v| a.matches(v) == b.matches(v)));
            }
            // The compiler's error stands for an error the build gives on any variables.
            let built = route(&rules, &[], vars);
            let rejected =
                matches!(built, Err(Error::OverlappingRules { .. } | Error::UnclaimedRule { .. }));
            prop_assert!(
                rejected,
                "compile error for `{a}`, `{b}`, but the build accepted {vars:?}"
            );
        }
        Some(Relation::Unknown) | None => {
            prop_assert!(verdict.errors.is_empty(), "{:?}", verdict.errors)
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn compile_time_verdicts_never_contradict_the_build(
        a in predicate(),
        b in predicate(),
        vars in variables(),
    ) {
        thread_local!(static UNIVERSE: Vec<VarInfo> = universe());
        UNIVERSE.with(|u| check_pair(&a, &b, &vars, u))?;
    }
}

#[test]
fn every_kind_of_verdict_occurs() {
    // The property above is only as strong as the proofs it sees; each kind of verdict occurs
    // for these hand-picked pairs, and they are consistent too.
    let name = |g: &str| Predicate::Name(Glob::new(g));
    let cases = [
        (Predicate::Bits(1), Predicate::Bits(2), Relation::Disjoint),
        (name("*.w"), name("a*.w"), Relation::SecondImpliesFirst),
        (Predicate::Dtype(Kind::Half), Predicate::Ndim(1), Relation::Unknown),
        (
            Predicate::And(vec![Predicate::Ndim(2), Predicate::User { text: "big", f: big }]),
            Predicate::Ndim(2),
            Relation::FirstImpliesSecond,
        ),
        (
            Predicate::Not(Box::new(Predicate::Or(vec![Predicate::Bits(1), Predicate::Ndim(0)]))),
            Predicate::And(vec![
                Predicate::Not(Box::new(Predicate::Bits(1))),
                Predicate::Not(Box::new(Predicate::Ndim(0))),
            ]),
            Relation::Equivalent,
        ),
    ];
    let universe = universe();
    let mut seen = BTreeSet::new();
    let distinct: Vec<VarInfo> =
        universe.iter().filter(|v| seen.insert(v.name.clone())).cloned().collect();
    for (a, b, expected) in cases {
        assert_eq!(macro_verdict(&a, &b).relation, Some(expected), "{a} vs {b}");
        check_pair(&a, &b, &distinct, &universe).expect("consistent");
    }
}

#[test]
fn random_pairs_reach_every_kind_of_verdict() {
    // Guards the property test against vacuity: its generator must produce proofs of each
    // kind, not only undecided pairs.
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..1500 {
        let a = predicate().new_tree(&mut runner).unwrap().current();
        let b = predicate().new_tree(&mut runner).unwrap().current();
        let v = macro_verdict(&a, &b);
        let kind = if v.unsatisfiable.is_empty() {
            format!("{:?}", v.relation.expect("two live rules"))
        } else {
            "Unsatisfiable".to_string()
        };
        *counts.entry(kind).or_insert(0usize) += 1;
    }
    eprintln!("verdicts over 1500 random pairs: {counts:?}");
    for kind in [
        "Disjoint",
        "Unknown",
        "Unsatisfiable",
        "Equivalent",
        "FirstImpliesSecond",
        "SecondImpliesFirst",
    ] {
        assert!(counts.get(kind).copied().unwrap_or(0) >= 5, "{kind}: {counts:?}");
    }
}

/// The macro's table of built-in optimizers matches the runtime: the same scheduled
/// hyperparameters, and each literal range is exactly what the optimizer accepts.
#[test]
fn the_macros_builtin_table_matches_the_runtime() {
    // The registry of built-ins lists exactly the table's optimizers, in its order.
    let registry: Vec<&str> = caseopt::builtins().iter().map(|b| b.type_name()).collect();
    let table: Vec<&str> = OptimizerKind::ALL.iter().map(|k| k.type_name()).collect();
    assert_eq!(registry, table);
    let build = |name: &str| caseopt::builtin(name).unwrap().build(&serde_json::json!({})).unwrap();
    let probes = [-1.0, 0.0, 1e-9, 0.5, 1.0, 2.0];
    for &b in OptimizerKind::ALL {
        let mut opt = build(b.type_name());
        assert_eq!(opt.name(), b.display_name());
        let scheduled: BTreeSet<&str> = b
            .fields()
            .iter()
            .filter(|(_, f)| matches!(f, Field::Schedule(_)))
            .map(|(k, _)| *k)
            .collect();
        let runtime: BTreeSet<&str> = opt.hyperparameter_names().iter().copied().collect();
        assert_eq!(scheduled, runtime, "{b}");
        for (key, field) in b.fields() {
            let Field::Schedule(range) = field else { continue };
            for v in probes {
                let accepted = opt.set_hyperparameter(key, v.into()).is_ok();
                assert_eq!(accepted, range.contains(v), "{b}.{key} = {v}");
            }
        }
    }
    // Every bool of the table is a field of the runtime's config (a JSON key the registry's
    // constructor knows; a valid value may still fail the config's own checks, as SGD's
    // nesterov without momentum does).
    for &b in OptimizerKind::ALL {
        for (key, field) in b.fields() {
            if *field != Field::Bool {
                continue;
            }
            for v in [false, true] {
                let built =
                    caseopt::builtin(b.type_name()).unwrap().build(&serde_json::json!({ *key: v }));
                if let Err(e) = built {
                    assert!(!e.to_string().contains("unknown field"), "{b}.{key}: {e}");
                }
            }
        }
        let unknown = caseopt::builtin(b.type_name())
            .unwrap()
            .build(&serde_json::json!({"no_such_field": 1}));
        assert!(unknown.err().is_some_and(|e| e.to_string().contains("unknown field")), "{b}");
    }
    // Plain floats (Adagrad's initial accumulator, Muon's eps) are checked when built.
    for &b in OptimizerKind::ALL {
        for (key, field) in b.fields() {
            let Field::Float(range) = field else { continue };
            for v in probes {
                let built =
                    caseopt::builtin(b.type_name()).unwrap().build(&serde_json::json!({ *key: v }));
                assert_eq!(built.is_ok(), range.contains(v), "{b}.{key} = {v}");
            }
        }
    }
}

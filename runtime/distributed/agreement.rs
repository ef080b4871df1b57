//! What the ranks compare before every step, and the verdict when they differ.
//!
//! A step is safe only when every rank is about to do the same thing: the same variables in the
//! same buckets (or Gloo reads past a buffer and aborts the process), the same routing, rules,
//! hyperparameter values, constraints and settings (or the ranks' values drift apart), and a
//! gradient for the same variables. Each rank describes all of that in lines; the ranks trade a
//! 64-bit digest of them (one small all-gather, the first collective of the step) and only when
//! the digests differ trade the lines themselves to name the first difference, the same verdict
//! on every rank.

use crate::error::{DistributedError, Error};
use crate::router::Router;

use super::group::first_difference;

/// What a rank found about one variable's gradient before a step.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum GradientStatus {
    Absent,
    Present,
    /// A gradient the buckets cannot take (its shape, dtype, device or layout differs from its
    /// variable's): why.
    Unfit(String),
}

/// Separates the configuration lines from the gradient lines in what the ranks trade.
const GRADIENTS: &str = "--- gradients";

/// One rank's description of the coming step, as the text the ranks trade when their digests
/// differ: the configuration, one item a line (everything that must be equal everywhere), then
/// each variable's name and gradient status. Built once per step by appending, so that a
/// model of thousands of variables costs copies of cached lines rather than formatting.
#[derive(Debug, Default)]
pub(super) struct Description {
    text: String,
}

impl Description {
    /// A configuration line.
    pub(super) fn line(&mut self, line: &str) {
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(line);
    }

    /// Ends the configuration; the gradients' lines follow.
    pub(super) fn start_gradients(&mut self) {
        self.line(GRADIENTS);
    }

    /// Variable `name`'s gradient status.
    pub(super) fn gradient(&mut self, name: &str, status: &GradientStatus) {
        self.text.push('\n');
        self.text.push_str(name);
        match status {
            GradientStatus::Absent => self.text.push_str(" -"),
            GradientStatus::Present => self.text.push_str(" +"),
            GradientStatus::Unfit(reason) => {
                self.text.push_str(" ! ");
                self.text.push_str(reason);
            }
        }
    }

    /// The whole description.
    pub(super) fn text(&self) -> &str {
        &self.text
    }
}

/// FNV-1a's step taken over 8-byte words (then the tail's bytes), with the length mixed in:
/// 64 bits, the same on every platform, and 8 times fewer multiplications than byte by byte on
/// the ~100 bytes per variable of a description. Only differences between ranks' honest
/// descriptions must show, not adversarial ones.
pub(super) fn digest(text: &str) -> i64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = text.as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        hash = (hash ^ u64::from_le_bytes(w)).wrapping_mul(PRIME);
    }
    for &byte in words.remainder() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
    }
    // Spreads the last words' bits over the whole digest (the multiplication carries only
    // upwards).
    hash ^= hash >> 29;
    hash = hash.wrapping_mul(PRIME);
    (hash ^ (hash >> 32)) as i64
}

/// The router's rules and routing table as lines, kept while the router's fingerprint and
/// number of routes stay the same (a table only grows, when variables join).
#[derive(Debug, Default)]
pub(super) struct RoutingLines {
    key: Option<(u64, usize)>,
    text: String,
}

/// The router's part of the description: rules and routing, every optimizer's step count,
/// execution settings and hyperparameter values at its current step, the constraints and the
/// non-finite policy.
pub(super) fn describe_router<R: Router + ?Sized>(
    router: &R,
    routing: &mut RoutingLines,
    out: &mut Description,
) {
    let routes = router.routing_table().routes();
    let key = (router.fingerprint(), routes.len());
    if routing.key != Some(key) {
        let mut lines = vec![format!(
            "rules {} (fingerprint {:016x})",
            router
                .rules()
                .iter()
                .map(|r| format!("{} => {}", r.predicate, r.optimizer))
                .collect::<Vec<_>>()
                .join(", "),
            router.fingerprint()
        )];
        lines.extend(routes.iter().map(|r| {
            format!(
                "route {} {:?} {:?} {} bits -> rule {:?}",
                r.variable, r.shape, r.kind, r.bits, r.rule
            )
        }));
        routing.text = lines.join("\n");
        routing.key = Some(key);
    }
    out.line(&routing.text);
    for rule in 0..router.rules().len() {
        let Some(opt) = router.optimizer(rule) else { continue };
        let values: Vec<String> = opt
            .hyperparameter_names()
            .iter()
            .map(|name| match opt.hyperparameter(name) {
                // `{:?}` of an f64 is the shortest text that reads back to the same bits.
                Ok(v) => format!("{name} {v:?}"),
                Err(e) => format!("{name} ({e})"),
            })
            .collect();
        out.line(&format!(
            "rule {rule} {} at step {}: {}; {}; constraint {}",
            opt.name(),
            opt.step_count(),
            values.join(", "),
            // The settings besides the hyperparameters that change the results (the backend and
            // the square root round differently); an optimizer of your own says nothing.
            opt.execution().map_or(String::new(), |e| format!(
                "{:?}, sqrt {:?}",
                e.backend(),
                e.sqrt()
            )),
            router.rule_constraint(rule).map_or("none".to_string(), |c| c.to_string()),
        ));
    }
    // Each variable's constraint as its optimizer applies it (its own, else its rule's); the
    // router's own lookup by name scans the rule's variables, quadratic over a whole model.
    // An optimizer of your own that declines constraints reports none here.
    for rule in 0..router.rules().len() {
        let Some(opt) = router.optimizer(rule) else { continue };
        for (index, p) in opt.params().iter().enumerate() {
            if let Some(c) = opt.constraint(index) {
                out.line(&format!("constraint {} {c}", p.info.name));
            }
        }
    }
    out.line(&format!("non-finite policy {:?}", router.non_finite_policy()));
}

/// The router's part of the description, as lines (for [`DataParallel::check_router`]).
///
/// [`DataParallel::check_router`]: super::DataParallel::check_router
pub(super) fn router_lines<R: Router + ?Sized>(router: &R) -> Vec<String> {
    let mut out = Description::default();
    describe_router(router, &mut RoutingLines::default(), &mut out);
    out.text.split('\n').map(str::to_string).collect()
}

/// The verdict when the digests differ, from every rank's [`Description::lines`] (rank 0's
/// first): the first rank whose configuration differs from rank 0's, as
/// [`DistributedError::Mismatch`]; else the first variable whose gradient does not fit on
/// some rank ([`Error::GradientMismatch`], naming the rank) or exists on some ranks only
/// ([`DistributedError::GradientPresence`]). Every rank computes it from the same data, so
/// every rank returns the same error.
pub(super) fn verdict(all: &[String]) -> Error {
    let split = |text: &str| -> (Vec<String>, Vec<String>) {
        let lines: Vec<String> = text.split('\n').map(str::to_string).collect();
        match lines.iter().position(|l| l == GRADIENTS) {
            Some(at) => (lines[..at].to_vec(), lines[at + 1..].to_vec()),
            None => (lines, Vec::new()),
        }
    };
    let parts: Vec<(Vec<String>, Vec<String>)> = all.iter().map(|t| split(t)).collect();
    let reference: Vec<&str> = parts[0].0.iter().map(String::as_str).collect();
    for (rank, (config, _)) in parts.iter().enumerate().skip(1) {
        let theirs: Vec<&str> = config.iter().map(String::as_str).collect();
        if let Some(what) = first_difference("step", &reference, &theirs) {
            return DistributedError::Mismatch { rank, what }.into();
        }
    }
    // The configurations agree, so every rank lists the same variables in the same order.
    let world = parts.len();
    let count = parts[0].1.len();
    for i in 0..count {
        let mut with = 0;
        let mut name = String::new();
        for (rank, (_, gradients)) in parts.iter().enumerate() {
            let line = gradients.get(i).map(String::as_str).unwrap_or("");
            if let Some((variable, reason)) = line.split_once(" ! ") {
                return Error::GradientMismatch {
                    variable: variable.to_string(),
                    reason: format!("on rank {rank}: {reason}"),
                };
            }
            if let Some(variable) = line.strip_suffix(" +") {
                with += 1;
                name = variable.to_string();
            }
        }
        if with != 0 && with != world {
            return DistributedError::GradientPresence { variable: name, with, world_size: world }
                .into();
        }
    }
    DistributedError::Mismatch {
        rank: 0,
        what: "the ranks' descriptions of the step differ, but no line does".into(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn description(lr: &str, gradients: &[GradientStatus]) -> Description {
        let mut d = Description::default();
        d.line("trainable w [2] Float 32 bits");
        d.line(&format!("rule 0 Adam: lr {lr}"));
        d.start_gradients();
        for (i, s) in gradients.iter().enumerate() {
            d.gradient(&format!("v{i}"), s);
        }
        d
    }

    impl Description {
        fn digest(&self) -> i64 {
            digest(self.text())
        }

        fn lines(&self) -> String {
            self.text().to_string()
        }
    }

    #[test]
    fn equal_descriptions_have_equal_digests() {
        let a = description("0.01", &[GradientStatus::Present]);
        let b = description("0.01", &[GradientStatus::Present]);
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), description("0.05", &[GradientStatus::Present]).digest());
        assert_ne!(a.digest(), description("0.01", &[GradientStatus::Absent]).digest());
    }

    #[test]
    fn names_a_configuration_difference_first() {
        let a = description("0.01", &[GradientStatus::Present]);
        let b = description("0.05", &[GradientStatus::Absent]);
        let e = verdict(&[a.lines(), b.lines()]).to_string();
        assert!(e.contains("rank 1 disagrees with rank 0: step #1"), "{e}");
        assert!(e.contains("lr 0.05") && e.contains("lr 0.01"), "{e}");
    }

    #[test]
    fn names_an_unfit_gradient_then_a_missing_one() {
        use GradientStatus::*;
        let ok = description("0.01", &[Present, Present]);
        let unfit = description("0.01", &[Present, Unfit("shape [1] != [4]".into())]);
        match verdict(&[ok.lines(), unfit.lines()]) {
            Error::GradientMismatch { variable, reason } => {
                assert_eq!(
                    (variable.as_str(), reason.as_str()),
                    ("v1", "on rank 1: shape [1] != [4]")
                )
            }
            other => panic!("{other:?}"),
        }
        let missing = description("0.01", &[Absent, Present]);
        match verdict(&[ok.lines(), missing.lines(), ok.lines()]) {
            Error::Distributed(DistributedError::GradientPresence {
                variable,
                with,
                world_size,
            }) => {
                assert_eq!((variable.as_str(), with, world_size), ("v0", 2, 3))
            }
            other => panic!("{other:?}"),
        }
    }
}

// A rule's optimizer must implement caseopt's `Optimizer` and `FromConfig`.
use caseopt::case_optimizer;

#[derive(Default)]
pub struct Momentum {
    pub beta: f64,
}

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => Momentum<beta: 0.9>,
    };
}

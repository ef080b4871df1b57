// Two default rules.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => Adam,
        _ => Sgd,
    };
}

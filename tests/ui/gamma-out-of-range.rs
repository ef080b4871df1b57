// Bop's gamma is a rate in (0, 1].
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop<gamma: 1.5>,
        _ => Adam,
    };
}

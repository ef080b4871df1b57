// A bit width is at least 1.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        bits(0) => Bop,
        _ => Adam,
    };
}

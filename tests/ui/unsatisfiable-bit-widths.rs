// A variable has one bit width.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        bits(1) & bits(2) => Bop,
        _ => Adam,
    };
}

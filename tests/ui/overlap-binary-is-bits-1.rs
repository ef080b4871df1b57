// `binary` is `bits(1)`: the two rules are the same.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        bits(1) => Adam,
        _ => Sgd,
    };
}

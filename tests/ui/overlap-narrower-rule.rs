// Every binary 2-D variable is also binary.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        binary & ndim(2) => Adam,
        _ => Sgd,
    };
}

// The same predicate twice: every variable it claims would go to two optimizers.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        binary => Adam,
        _ => Sgd,
    };
}

// Nesterov momentum with the default momentum of 0.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => Sgd<lr: 0.1, nesterov: true>,
    };
}

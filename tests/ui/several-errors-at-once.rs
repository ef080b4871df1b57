// Every mistake of an invocation is reported in one build.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binar => Bop<gamma: 0>,
        binary & bits(2) => Sgd<lr: 0.1, lr: 0.2>,
        _ => Adam,
        _ => AdamW,
    };
}

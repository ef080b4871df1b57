// Every name `conv*.weight` matches also matches `*.weight`.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        name("*.weight") => Sgd<lr: 0.1>,
        name("conv*.weight") => Adam,
        _ => Adam,
    };
}

// No name ends in both `.weight` and `.bias`.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        name("*.weight") & name("*.bias") => Sgd,
        _ => Adam,
    };
}

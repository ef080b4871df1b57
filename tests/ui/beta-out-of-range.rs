// Adam's betas are in [0, 1).
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => Adam<beta1: 1.0>,
    };
}

// Muon trains 2-D variables only, and the default rule claims whatever is left, of any shape.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => Muon<lr: 0.02>,
    };
}

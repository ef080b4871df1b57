// NAdam's momentum decay below zero: a built-in added after the table was first written is
// checked like the others.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => NAdam<momentum_decay: -0.004>,
    };
}

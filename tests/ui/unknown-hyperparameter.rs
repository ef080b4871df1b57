// A key a built-in optimizer does not have: the macro names the valid ones, at the key.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => Adam<learning_rate: 0.1>,
    };
}

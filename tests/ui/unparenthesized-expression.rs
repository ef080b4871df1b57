// Expressions as values go in parentheses.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => Adam<lr: 0.1 * 2.0>,
    };
}

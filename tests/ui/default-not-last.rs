// The default rule must come last.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        _ => Adam,
        binary => Bop,
    };
}

// `amsgrad` is a bool: rustc reports the value.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => Adam<amsgrad: 0.5>,
    };
}

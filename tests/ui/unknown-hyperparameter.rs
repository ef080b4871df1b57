// A typo in a key: rustc reports it at the typo.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop<treshold: 1e-6>,
        _ => Adam,
    };
}

// A typo in an atom.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binar => Bop,
        _ => Adam,
    };
}

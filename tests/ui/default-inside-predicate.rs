// `_` stands alone; it is not an atom.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary | _ => Bop,
    };
}

// Predicates combine with `&`, not `&&`.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary && ndim(2) => Bop,
        _ => Adam,
    };
}

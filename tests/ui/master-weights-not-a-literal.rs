// `master_weights` decides how the rule's optimizer is built: a literal `true` or `false`.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop<master_weights: true>,
        _ => Adam<master_weights: (1 > 0)>,
    };
}

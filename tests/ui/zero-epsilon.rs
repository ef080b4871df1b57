// eps must be positive.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop,
        _ => Adam<eps: 0.0>,
    };
}

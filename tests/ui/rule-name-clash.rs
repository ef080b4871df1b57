// A rule name may not shadow a router method.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Bop as step,
        _ => Adam,
    };
}

// A key a user optimizer's config does not have: rustc reports it, at the key.
use caseopt::case_optimizer;

mod opt {
    pub type PlainSgd = caseopt::Sgd;
}

fn main() {
    let _ = case_optimizer! {
        binary => opt::PlainSgd<treshold: 1e-6>,
        _ => Adam,
    };
}

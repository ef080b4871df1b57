// The item form declares a concrete type.
use caseopt::case_optimizer;

case_optimizer! {
    pub struct Router<T> {
        binary => Bop,
        _ => Adam,
    }
}

fn main() {}

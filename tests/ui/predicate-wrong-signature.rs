// A user predicate is a `fn(&VarInfo) -> bool`.
use caseopt::case_optimizer;

fn is_embedding(name: &str) -> bool {
    name.starts_with("emb")
}

fn main() {
    let _ = case_optimizer! {
        where(is_embedding) => Sgd,
        _ => Adam,
    };
}

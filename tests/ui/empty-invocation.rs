// A router needs at least one rule.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {};
}

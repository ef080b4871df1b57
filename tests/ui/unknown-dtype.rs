// dtype names are f32, f64, f16, bf16.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        dtype(f8) => Sgd,
        _ => Adam,
    };
}

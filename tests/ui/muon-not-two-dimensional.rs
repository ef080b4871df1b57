// Muon trains 2-D variables only, and `binary` does not imply `ndim(2)` (a conv kernel is 4-D).
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary => Muon,
        _ => AdamW,
    };
}

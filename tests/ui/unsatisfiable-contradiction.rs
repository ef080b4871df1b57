// `binary & !binary` holds for no variable.
use caseopt::case_optimizer;

fn main() {
    let _ = case_optimizer! {
        binary & !binary => Bop,
        _ => Adam,
    };
}

//! The benchmark parameter sets of docs/design.md, shared by `bench_step` and
//! `bench_distributed`: their variables, and a `VarStore` holding them with a gradient each.

use caseopt::PathExt;
use tch::{nn, Device, Kind, Tensor};

/// One variable of a benchmark set: name, shape, and whether it is binary.
pub struct Spec {
    pub name: String,
    pub shape: Vec<i64>,
    pub binary: bool,
}

impl Spec {
    pub fn numel(&self) -> f64 {
        self.shape.iter().product::<i64>() as f64
    }
}

/// docs/design.md's BinaryNet for CIFAR-10: 18 tensors, 14,025,866 parameters, 14,008,320 binary.
fn binarynet() -> Vec<Spec> {
    let mut out = Vec::new();
    let convs = [(3, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)];
    for (i, (cin, cout)) in convs.into_iter().enumerate() {
        out.push(Spec {
            name: format!("conv{i}.weight"),
            shape: vec![cout, cin, 3, 3],
            binary: i > 0,
        });
        out.push(Spec { name: format!("bn_conv{i}.beta"), shape: vec![cout], binary: false });
    }
    for (i, (fin, fout)) in [(8192, 1024), (1024, 1024), (1024, 10)].into_iter().enumerate() {
        out.push(Spec { name: format!("dense{i}.weight"), shape: vec![fout, fin], binary: i < 2 });
        out.push(Spec { name: format!("bn_dense{i}.beta"), shape: vec![fout], binary: false });
    }
    out
}

/// docs/design.md's many-small: 2000 tensors of 256, binary when the index is even.
fn many_small() -> Vec<Spec> {
    (0..2000)
        .map(|i| Spec { name: format!("p{i}"), shape: vec![256], binary: i % 2 == 0 })
        .collect()
}

pub fn set_named(name: &str) -> Option<Vec<Spec>> {
    match name {
        "binarynet" => Some(binarynet()),
        "many-small" => Some(many_small()),
        _ => None,
    }
}

/// Parameters of one set in a fresh VarStore, binary ones set to +-1 (and declared 1-bit when
/// `mark_binary`), with N(0, 1) * 1e-3 gradients in `.grad()` (through one backward pass of
/// `sum(p * g)`).
///
/// tch's own optimizers must get an unmarked store: caseopt keeps the bit count in tch's
/// per-variable group number, and libtorch's optimizer creates one parameter group per group
/// number up to the largest (about 1.7e9 of them for a marked variable).
pub fn make_store(specs: &[Spec], device: Device, mark_binary: bool) -> nn::VarStore {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let mut loss = Tensor::zeros([], (Kind::Float, device));
    for s in specs {
        // tch names "conv0.weight" as the variable "weight" under the path "conv0".
        let (path, leaf) = match s.name.rsplit_once('.') {
            Some((prefix, leaf)) => (&root / prefix, leaf),
            None => (root.clone(), s.name.as_str()),
        };
        let path = if s.binary && mark_binary { path.binary() } else { path };
        let init = Tensor::randn(s.shape.as_slice(), (Kind::Float, device));
        // +-1 (`sign` would leave an exact 0, which the router reports as non-binary).
        let init =
            if s.binary { init.ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0 } else { init * 0.1 };
        let p = path.var_copy(leaf, &init);
        let g = Tensor::randn(s.shape.as_slice(), (Kind::Float, device)) * 1e-3;
        loss += (&p * &g).sum(Kind::Float);
    }
    loss.backward();
    vs
}

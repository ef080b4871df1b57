//! Saving: a router's state (and optionally its model's variables) gathered into the metadata
//! and the tensors of one file, written atomically.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::Path;

use safetensors::tensor::Dtype;
use tch::{nn, Tensor};

use super::atomic::write_atomically;
use super::container::{write_safetensors, Blob};
use super::format::{
    save_schedule, state_key, Meta, SavedFloat, SavedModelVar, SavedOptimizer, SavedRoute,
    SavedScaler, SavedTensor, SavedVariable, FORMAT, FORMAT_VERSION, METADATA_CRC_KEY,
    METADATA_KEY, MODEL_PREFIX,
};
use crate::amp::GradScaler;
use crate::error::{CheckpointError, Error, Result};
use crate::optim::Optimizer;
use crate::predicate::dtype_name;
use crate::router::Router;

/// Copies a tensor (any device, any strides) to contiguous CPU bytes.
fn blob_of(tensor: &Tensor) -> Result<(Blob, SavedTensor)> {
    let kind = tensor.f_kind()?;
    let dtype = Dtype::try_from(kind)?;
    let size = tensor.size();
    let numel = tensor.numel();
    let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
    // at_copy_data moves the tensor to the CPU and makes it contiguous first when needed.
    tensor.f_copy_data_u8(&mut bytes, numel)?;
    let saved = SavedTensor {
        dtype: dtype_name(kind).to_string(),
        shape: size.clone(),
        crc32: crc32fast::hash(&bytes),
    };
    let shape = size
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| unencodable(format!("negative dimension in shape {size:?}")))?;
    Ok((Blob { dtype, shape, bytes }, saved))
}

/// Every named variable of `vs` (shallow handles). `VarStore::variables` unwraps the store's
/// lock and would panic if a thread had panicked while holding it; the handles stay valid.
pub(super) fn named_variables(vs: &nn::VarStore) -> HashMap<String, Tensor> {
    let vars = vs.variables_.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    vars.named_variables.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
}

fn optimizer_of<R: Router + ?Sized>(router: &R, rule: usize) -> Result<&dyn Optimizer> {
    router.optimizer(rule).ok_or_else(|| {
        Error::Checkpoint(CheckpointError::OptimizerMismatch {
            rule,
            reason: "the router has no optimizer for it".into(),
        })
    })
}

/// Every routed variable still has the device, dtype and shape it was routed with, as the
/// router's `step` requires ([`Param::check_unchanged`](crate::Param::check_unchanged), the
/// same check): a checkpoint of a changed variable could not be loaded, by this router or any
/// other.
fn check_unchanged<R: Router + ?Sized>(router: &R) -> Result<()> {
    for rule in 0..router.rules().len() {
        for param in optimizer_of(router, rule)?.params() {
            param.check_unchanged()?;
        }
    }
    Ok(())
}

/// An f32 as the metadata stores it: its text and its 8 hex digits.
pub(super) fn save_f32(v: f32) -> SavedFloat {
    SavedFloat { value: format!("{v:?}"), bits: format!("{:08x}", v.to_bits()) }
}

/// An f64 as the metadata stores it: its text and its 16 hex digits.
pub(super) fn save_f64(v: f64) -> SavedFloat {
    SavedFloat { value: format!("{v:?}"), bits: format!("{:016x}", v.to_bits()) }
}

/// The scaler's state as the metadata stores it; refused in the middle of a step.
fn save_scaler(scaler: &GradScaler) -> Result<SavedScaler> {
    scaler.check_between_steps("save_scaled")?;
    let state = scaler.state()?;
    Ok(SavedScaler {
        enabled: scaler.is_enabled(),
        scale: save_f32(state.scale),
        growth_tracker: i64::from(state.growth_tracker),
        growth_factor: save_f64(state.growth_factor),
        backoff_factor: save_f64(state.backoff_factor),
        growth_interval: u64::from(state.growth_interval),
    })
}

pub(super) fn save<R: Router + ?Sized>(
    path: &Path,
    router: &R,
    vs: Option<&nn::VarStore>,
    scaler: Option<&GradScaler>,
) -> Result<()> {
    let scaler = scaler.map(save_scaler).transpose()?;
    check_unchanged(router)?;
    let rules: Vec<String> = router.rules().iter().map(ToString::to_string).collect();
    // Variables added to the VarStore since the router last routed are recorded as the next
    // step will route them (no state yet): a router built afresh over the same model routes
    // them at its build, and must find them in the file.
    let unrouted = router.unrouted_variables()?;
    let routes = router
        .routing_table()
        .routes()
        .iter()
        .chain(&unrouted)
        .map(|r| SavedRoute {
            variable: r.variable.clone(),
            shape: r.shape.clone(),
            dtype: dtype_name(r.kind).to_string(),
            bits: r.bits,
            rule: r.rule,
        })
        .collect();
    let mut blobs: BTreeMap<String, Blob> = BTreeMap::new();
    let mut tensors: BTreeMap<String, SavedTensor> = BTreeMap::new();
    let mut add = |key: String, tensor: &Tensor| -> Result<()> {
        let (blob, saved) = blob_of(tensor)?;
        if blobs.insert(key.clone(), blob).is_some() {
            return Err(unencodable(format!("two tensors would be stored as `{key}`")));
        }
        tensors.insert(key, saved);
        Ok(())
    };
    let mut optimizers = Vec::with_capacity(rules.len());
    for rule in 0..rules.len() {
        let opt = optimizer_of(router, rule)?;
        let mut hyperparameters = BTreeMap::new();
        for &name in opt.hyperparameter_names() {
            hyperparameters.insert(name.to_string(), save_schedule(opt.schedule(name)?));
        }
        let mut variables = Vec::with_capacity(opt.params().len());
        for (index, param) in opt.params().iter().enumerate() {
            let mut states = Vec::new();
            for (state, tensor) in opt.state(index) {
                // Keys are never parsed back, but a `/` in a state name could make two keys
                // equal (`a` + `b/m` and `a/b` + `m`).
                if state.contains('/') {
                    return Err(Error::Checkpoint(CheckpointError::BadState {
                        rule,
                        variable: param.info.name.clone(),
                        state: state.to_string(),
                        reason: format!("{} names a state with `/`", opt.name()),
                    }));
                }
                add(state_key(rule, &param.info.name, state), &tensor)?;
                states.push(state.to_string());
            }
            variables.push(SavedVariable { name: param.info.name.clone(), states });
        }
        for route in unrouted.iter().filter(|r| r.rule == Some(rule)) {
            variables.push(SavedVariable { name: route.variable.clone(), states: Vec::new() });
        }
        optimizers.push(SavedOptimizer {
            rule,
            optimizer: opt.name().to_string(),
            step_count: opt.step_count(),
            hyperparameters,
            variables,
        });
    }
    let model = match vs {
        None => None,
        Some(vs) => {
            let mut vars: Vec<(String, Tensor)> = named_variables(vs).into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = Vec::with_capacity(vars.len());
            for (name, tensor) in vars {
                add(format!("{MODEL_PREFIX}{name}"), &tensor)?;
                out.push(SavedModelVar {
                    shape: tensor.size(),
                    dtype: dtype_name(tensor.kind()).to_string(),
                    name,
                });
            }
            Some(out)
        }
    };
    let meta = Meta {
        format: FORMAT.to_string(),
        version: FORMAT_VERSION,
        fingerprint: format!("{:016x}", router.fingerprint()),
        rules,
        routes,
        optimizers,
        model,
        tensors,
        scaler,
    };
    let json =
        serde_json::to_string(&meta).map_err(|e| unencodable(format!("the metadata: {e}")))?;
    let crc = crc32fast::hash(json.as_bytes()).to_string();
    let metadata = BTreeMap::from([(METADATA_KEY, json), (METADATA_CRC_KEY, crc)]);
    write_atomically(path, |file| {
        let mut out = BufWriter::new(file);
        write_safetensors(&mut out, &blobs, &metadata)?;
        out.flush()
    })
}

fn unencodable(reason: String) -> Error {
    Error::Checkpoint(CheckpointError::Unencodable(reason))
}

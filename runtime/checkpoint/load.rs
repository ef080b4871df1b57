//! Loading: read and check the file, plan every change against the router (and the model),
//! then apply the plan. Nothing changes until the plan is whole.

use std::path::Path;

use tch::nn;

use super::apply::apply;
use super::parse::{bad, parse, read_file};
use super::plan::{plan, PlanError};
use crate::error::Result;
use crate::router::Router;

/// Loads `path` into `router` (and the model `vs`, when given): validate, plan, apply.
pub(super) fn load<R: Router + ?Sized>(
    path: &Path,
    router: &mut R,
    vs: Option<&nn::VarStore>,
) -> Result<()> {
    // Variables added to the VarStore since the router last routed are routed first, as its
    // next step would (the file lists them when it was saved after they were added).
    router.route_new_variables()?;
    let bytes = read_file(path)?;
    let parsed = parse(&bytes).map_err(|p| bad(path, p))?;
    let plan = plan(&parsed, router, vs).map_err(|e| match e {
        PlanError::Problem(p) => bad(path, p),
        PlanError::Torch(e) => e,
    })?;
    // The file's bytes are no longer needed: free them before the state is replaced.
    drop(parsed);
    drop(bytes);
    apply(router, plan).map_err(|p| bad(path, p))
}

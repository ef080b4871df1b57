//! What [`GradScaler`](crate::GradScaler) needs of a router beyond the public [`Router`]
//! trait: its identity, its variables routed before their gradients are unscaled, the
//! gradients the step will use, and a step that does not search again for what the scaler has
//! just ruled out.

use tch::Tensor;

use super::build::route_new_variables;
use super::nonfinite::NonFinitePolicy;
use super::parts::{OptimizerInspector, RouterParts};
use super::Router;
use crate::error::Result;
use crate::optim::Optimizer;

/// The router's id, unique within the process for the router's lifetime.
pub(crate) fn router_id<R: RouterParts>(router: &R) -> u64 {
    router.core().ownership.router_id()
}

/// Every gradient the router's next step uses, in rule order, with its variable's name:
/// variables added to the `VarStore` since the last step are routed first (with the step's
/// checks), so that none is stepped with a gradient the scaler did not see; frozen variables
/// and variables without a gradient are left out, as the step leaves them out.
pub(crate) fn step_gradients<R: RouterParts>(router: &mut R) -> Result<Vec<(String, Tensor)>> {
    route_new_variables(router)?;
    struct Collect(Vec<(String, Tensor)>);
    impl OptimizerInspector for Collect {
        fn inspect<O: Optimizer>(&mut self, _: usize, optimizer: &O) -> Result<()> {
            for p in optimizer.params() {
                if !p.tensor.requires_grad() {
                    continue;
                }
                if let Some(g) = p.grad() {
                    self.0.push((p.info.name.clone(), g));
                }
            }
            Ok(())
        }
    }
    let mut collect = Collect(Vec::new());
    router.for_each_optimizer(&mut collect)?;
    Ok(collect.0)
}

/// The router's step on gradients the scaler found finite: the router's own search for NaN and
/// infinity would read them all again (and, off the fused kernels' path, the host once more) to
/// reach the same verdict, so the step runs under [`NonFinitePolicy::Proceed`]; the policy is
/// restored whatever the step returns.
pub(crate) fn step_finite<R: RouterParts>(router: &mut R) -> Result<()> {
    let policy = router.core().non_finite;
    router.core_mut().non_finite = NonFinitePolicy::Proceed;
    let stepped = Router::step(router);
    router.core_mut().non_finite = policy;
    stepped
}

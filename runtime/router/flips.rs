//! The flip ratios of a router's binary optimizers, found behind any optimizer type by its
//! type identity (as Bop's staging is), so the public [`Optimizer`] trait carries nothing for
//! them.

use std::any::Any;

use super::parts::{OptimizerInspector, RouterParts};
use crate::error::Result;
use crate::optim::{Bop, Bop2ndOrder, FlipRatios, Optimizer};

/// See [`Router::flip_ratios`](crate::Router::flip_ratios).
pub(super) fn flip_ratios<R: RouterParts>(router: &R) -> Result<Option<FlipRatios>> {
    let mut collect = Collect(None);
    router.for_each_optimizer(&mut collect)?;
    Ok(collect.0)
}

/// Every Bop's and Bop2ndOrder's ratios, merged; `None` until one of them has stepped.
struct Collect(Option<FlipRatios>);

impl OptimizerInspector for Collect {
    fn inspect<O: Optimizer>(&mut self, _: usize, optimizer: &O) -> Result<()> {
        let any = optimizer as &dyn Any;
        let found = match (any.downcast_ref::<Bop>(), any.downcast_ref::<Bop2ndOrder>()) {
            (Some(bop), _) => bop.flip_ratios()?,
            (_, Some(bop)) => bop.flip_ratios()?,
            _ => None,
        };
        if let Some(found) = found {
            self.0.get_or_insert_with(FlipRatios::empty).absorb(found);
        }
        Ok(())
    }
}

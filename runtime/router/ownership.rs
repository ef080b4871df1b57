//! A variable belongs to one router at a time. Two routers over one `VarStore` would each
//! update every shared variable, so a training step would step it twice (with two optimizer
//! states) and nothing would say so. Building a second router over a variable another live
//! router trains is therefore an error naming it; dropping the first router releases its
//! variables.
//!
//! Variables are known by their `TensorImpl` (through the C++ shim, `caseopt_tensor_impl`): the
//! identity every handle of the same variable shares (tch's handles differ per
//! `shallow_clone`) and that survives `set_data`, which `VarStore::half`, `float` and
//! `set_device`-like changes use to give the variable new storage. The data address did not:
//! after `vs.half(); vs.float()` a second router took the variable for another one and one
//! step moved it twice. A registered variable's router holds a handle to it, so its
//! `TensorImpl` cannot be freed and its address reused while registered. Empty variables have
//! no data to update twice and are not registered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::var::Param;

/// The variable's identity: its `TensorImpl` (see the module documentation).
fn identity(t: &tch::Tensor) -> usize {
    crate::kernels::aten::tensor_impl(t)
}

/// Which live router trains each registered variable, by [`identity`]: (router, name).
static OWNERS: Mutex<Option<HashMap<usize, (u64, String)>>> = Mutex::new(None);

/// Router ids, unique within the process.
static NEXT_ROUTER: AtomicU64 = AtomicU64::new(0);

fn owners() -> MutexGuard<'static, Option<HashMap<usize, (u64, String)>>> {
    // The map stays consistent even if a thread panicked while holding the lock: every
    // change is one insertion or removal.
    OWNERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The variables one router has claimed; released when dropped.
#[derive(Debug)]
pub(crate) struct Ownership {
    router: u64,
    addresses: Vec<usize>,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership { router: NEXT_ROUTER.fetch_add(1, Ordering::Relaxed), addresses: Vec::new() }
    }
}

impl Ownership {
    /// This router's id, unique within the process (a `GradScaler` tells routers apart by it).
    pub(crate) fn router_id(&self) -> u64 {
        self.router
    }

    /// Claims `params` for this router, all or none: fails naming the first variable another
    /// live router trains, having claimed nothing.
    pub(crate) fn claim<'p>(&mut self, params: impl IntoIterator<Item = &'p Param>) -> Result<()> {
        let mut guard = owners();
        let map = guard.get_or_insert_with(HashMap::new);
        let mut new = Vec::new();
        for p in params {
            if p.tensor.numel() == 0 {
                continue;
            }
            let address = identity(&p.tensor);
            match map.get(&address) {
                Some((owner, _)) if *owner == self.router => {}
                Some((_, other)) => {
                    return Err(Error::VariableInAnotherRouter {
                        variable: p.info.name.clone(),
                        other: other.clone(),
                    })
                }
                None => new.push((address, p.info.name.clone())),
            }
        }
        for (address, name) in new {
            map.insert(address, (self.router, name));
            self.addresses.push(address);
        }
        Ok(())
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        let mut guard = owners();
        if let Some(map) = guard.as_mut() {
            for address in &self.addresses {
                if map.get(address).is_some_and(|(owner, _)| *owner == self.router) {
                    map.remove(address);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::Tensor;

    use super::*;
    use crate::var::VarInfo;

    fn param(name: &str, t: &Tensor) -> Param {
        Param::new(VarInfo::of(name, t), t.shallow_clone())
    }

    #[test]
    fn a_variable_is_claimed_by_one_owner_until_it_is_dropped() {
        let (a, b) =
            (Tensor::ones([3], tch::kind::FLOAT_CPU), Tensor::ones([2], tch::kind::FLOAT_CPU));
        let mut first = Ownership::default();
        first.claim([&param("a", &a)]).unwrap();
        // Claiming again (routing more variables later) is fine for the same owner.
        first.claim([&param("a", &a), &param("b", &b)]).unwrap();
        let mut second = Ownership::default();
        let err = second.claim([&param("b2", &b.shallow_clone())]).unwrap_err();
        assert!(
            matches!(&err, Error::VariableInAnotherRouter { variable, other }
            if variable == "b2" && other == "b"),
            "{err}"
        );
        // All or none: `c` was not claimed by the refused call.
        let c = Tensor::ones([1], tch::kind::FLOAT_CPU);
        assert!(second.claim([&param("c", &c), &param("a", &a)]).is_err());
        drop(first);
        second.claim([&param("a", &a), &param("b", &b), &param("c", &c)]).unwrap();
        // The identity survives new storage (`set_data`, as `VarStore::half` and `float` do),
        // and is not a data address another variable could come to hold.
        let mut d = Tensor::ones([4], tch::kind::FLOAT_CPU);
        let mut third = Ownership::default();
        third.claim([&param("d", &d)]).unwrap();
        let before = d.data_ptr();
        // Kept alive, so that the new storage cannot reuse the old address.
        let _old_storage = d.detach();
        d.set_data(&d.to_kind(tch::Kind::Half));
        d.set_data(&d.to_kind(tch::Kind::Float));
        assert_ne!(d.data_ptr(), before, "set_data gave the variable new storage");
        let err = Ownership::default().claim([&param("d2", &d.shallow_clone())]).unwrap_err();
        assert!(matches!(err, Error::VariableInAnotherRouter { .. }), "{err}");
        // Empty variables are not registered.
        let empty = Tensor::ones([0], tch::kind::FLOAT_CPU);
        Ownership::default().claim([&param("e", &empty)]).unwrap();
        Ownership::default().claim([&param("e", &empty)]).unwrap();
    }
}

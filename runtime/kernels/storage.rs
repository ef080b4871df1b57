//! Exchanging two storages' memory (the C++ side is `shim/storage.cpp`): how a staged step's
//! new state becomes the state at commit ([`stage`](super::stage)) without a byte copied.

use std::ffi::c_void;

use tch::Tensor;

extern "C" {
    fn caseopt_swap_storages(a: *const *const c_void, b: *const *const c_void, n: usize) -> i32;
}

/// Exchanges the memory of the storages of each pair's two tensors (of equal byte size, on
/// the CPU): every tensor viewing one storage then sees what the other held. Fails, having
/// changed nothing, when a pair does not qualify or libtorch raised.
pub(crate) fn swap_storages(pairs: &[(&Tensor, &Tensor)]) -> Result<(), ()> {
    let a: Vec<*const c_void> = pairs.iter().map(|(x, _)| x.as_ptr() as *const c_void).collect();
    let b: Vec<*const c_void> = pairs.iter().map(|(_, y)| y.as_ptr() as *const c_void).collect();
    // SAFETY: every pointer is the `at::Tensor*` of a live tch tensor borrowed for the call;
    // the C++ side checks every pair before it changes any, catches libtorch's exceptions, and
    // only exchanges the two storages' allocations (both stay owned by a storage throughout).
    let status = unsafe { caseopt_swap_storages(a.as_ptr(), b.as_ptr(), pairs.len()) };
    if status == 0 {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swapped_storages_show_through_every_view() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
        let b = Tensor::from_slice(&[5.0f32, 6.0, 7.0, 8.0]);
        let view = a.narrow(0, 1, 2);
        let alias = a.alias();
        swap_storages(&[(&a, &b)]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), [5.0, 6.0, 7.0, 8.0]);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(Vec::<f32>::try_from(&view).unwrap(), [6.0, 7.0]);
        assert_eq!(Vec::<f32>::try_from(&alias).unwrap(), [5.0, 6.0, 7.0, 8.0]);
        // A pair that does not qualify (sizes differ) changes nothing, even after a good pair.
        let c = Tensor::from_slice(&[9.0f32]);
        assert!(swap_storages(&[(&a, &b), (&a, &c)]).is_err());
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), [5.0, 6.0, 7.0, 8.0]);
        // Nor does a tensor paired with itself, or an undefined one.
        assert!(swap_storages(&[(&a, &a)]).is_err());
        assert!(swap_storages(&[(&a, &Tensor::new())]).is_err());
        assert_eq!(Vec::<f32>::try_from(&c).unwrap(), [9.0]);
    }
}

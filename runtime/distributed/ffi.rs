//! The C interface of `shim/c10d.cpp`, wrapped in safe functions: the only unsafe code of the
//! distributed module.
//!
//! The shim catches every C++ exception and returns a status with c10d's message, so nothing
//! unwinds across the boundary; the wrappers turn the status into a [`DistributedError`].

use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;

use tch::Tensor;

use crate::error::DistributedError;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn caseopt_c10d_connect(
        host: *const c_char,
        port: u16,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        serve_store: i32,
        interface: *const c_char,
        device_host: *const c_char,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_capacity: usize,
    ) -> i32;
    fn caseopt_c10d_free(group: *mut c_void);
    fn caseopt_c10d_all_reduce_sum(
        group: *mut c_void,
        tensors: *const *const c_void,
        n: usize,
        err: *mut c_char,
        err_capacity: usize,
    ) -> i32;
    fn caseopt_c10d_broadcast(
        group: *mut c_void,
        tensors: *const *const c_void,
        n: usize,
        root: i32,
        err: *mut c_char,
        err_capacity: usize,
    ) -> i32;
    fn caseopt_c10d_pack(
        flat: *const c_void,
        grads: *const *const c_void,
        offsets: *const i64,
        lengths: *const i64,
        n: usize,
        err: *mut c_char,
        err_capacity: usize,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn caseopt_c10d_unpack(
        flat: *const c_void,
        grads: *const *const c_void,
        offsets: *const i64,
        lengths: *const i64,
        n: usize,
        divisor: f64,
        err: *mut c_char,
        err_capacity: usize,
    ) -> i32;
    fn caseopt_c10d_all_gather(
        group: *mut c_void,
        input: *const c_void,
        output: *const c_void,
        err: *mut c_char,
        err_capacity: usize,
    ) -> i32;
}

/// Room for c10d's message (they can be long: Gloo's include the peer's address and a hint).
const MESSAGE_CAPACITY: usize = 2048;

/// Statuses of `shim/c10d.cpp` (its `Status`).
const TIMEOUT: i32 = 1;
const PEER_LOST: i32 = 2;

/// A joined c10d group (a TCPStore and a `ProcessGroupGloo`), freed on drop.
#[derive(Debug)]
pub(super) struct RawGroup {
    handle: *mut c_void,
    timeout: Duration,
}

// SAFETY: c10d's process groups and stores are used from whichever thread holds them (torch's
// DDP calls them from its autograd threads); a `RawGroup` is owned by one value and only lent
// out through `&self`/`&mut self`, never shared between threads at once (it is not `Sync`).
unsafe impl Send for RawGroup {}

/// Where and how to join (see `Rendezvous`).
pub(super) struct ConnectArgs<'a> {
    pub host: &'a str,
    pub port: u16,
    pub rank: usize,
    pub world_size: usize,
    pub timeout: Duration,
    pub serve_store: bool,
    pub interface: Option<&'a str>,
    pub device_host: Option<&'a str>,
}

fn c_string(what: &str, value: &str) -> Result<CString, DistributedError> {
    CString::new(value).map_err(|_| {
        DistributedError::InvalidRendezvous(format!("{what} {value:?} contains a NUL byte"))
    })
}

fn error_for(
    status: i32,
    operation: &'static str,
    timeout: Duration,
    buffer: &[u8],
) -> DistributedError {
    let message = CStr::from_bytes_until_nul(buffer)
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_default();
    match status {
        TIMEOUT => DistributedError::Timeout {
            operation,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            message,
        },
        PEER_LOST => DistributedError::PeerLost { operation, message },
        _ => DistributedError::Failed { operation, message },
    }
}

impl RawGroup {
    /// Joins the group; blocks until every rank has (or the timeout).
    pub(super) fn connect(args: &ConnectArgs<'_>) -> Result<Self, DistributedError> {
        let host = c_string("address", args.host)?;
        let interface = c_string("interface", args.interface.unwrap_or(""))?;
        let device_host = c_string("address", args.device_host.unwrap_or(""))?;
        let to_i32 = |what: &str, v: usize| {
            i32::try_from(v).map_err(|_| {
                DistributedError::InvalidRendezvous(format!("{what} {v} is too large"))
            })
        };
        let rank = to_i32("rank", args.rank)?;
        let size = to_i32("world size", args.world_size)?;
        let timeout_ms = i64::try_from(args.timeout.as_millis()).unwrap_or(i64::MAX);
        let mut handle = std::ptr::null_mut();
        let mut buffer = vec![0u8; MESSAGE_CAPACITY];
        // SAFETY: every pointer is valid for the call (NUL-terminated strings, the out slot, a
        // buffer of the stated capacity); the shim catches all C++ exceptions.
        let status = unsafe {
            caseopt_c10d_connect(
                host.as_ptr(),
                args.port,
                rank,
                size,
                timeout_ms,
                i32::from(args.serve_store),
                interface.as_ptr(),
                device_host.as_ptr(),
                &mut handle,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        if status != 0 || handle.is_null() {
            return Err(error_for(status, "rendezvous", args.timeout, &buffer));
        }
        Ok(RawGroup { handle, timeout: args.timeout })
    }

    /// Sums each tensor across the group, in place. The tensors must be dense, contiguous CPU
    /// tensors (the caller checks).
    pub(super) fn all_reduce_sum(&self, tensors: &[&Tensor]) -> Result<(), DistributedError> {
        let pointers = handles(tensors.iter().copied().map(Some));
        let mut buffer = vec![0u8; MESSAGE_CAPACITY];
        // SAFETY: `handle` is a live group; `pointers` holds `at::Tensor*` handles that outlive
        // the call (borrowed from `tensors`); the buffer has the stated capacity.
        let status = unsafe {
            caseopt_c10d_all_reduce_sum(
                self.handle,
                pointers.as_ptr(),
                pointers.len(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        self.check(status, "all-reduce", &buffer)
    }

    /// Overwrites each tensor with rank `root`'s.
    pub(super) fn broadcast(
        &self,
        tensors: &[&Tensor],
        root: usize,
    ) -> Result<(), DistributedError> {
        let pointers = handles(tensors.iter().copied().map(Some));
        let root = i32::try_from(root).map_err(|_| {
            DistributedError::InvalidRendezvous(format!("root rank {root} is too large"))
        })?;
        let mut buffer = vec![0u8; MESSAGE_CAPACITY];
        // SAFETY: as in `all_reduce_sum`.
        let status = unsafe {
            caseopt_c10d_broadcast(
                self.handle,
                pointers.as_ptr(),
                pointers.len(),
                root,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        self.check(status, "broadcast", &buffer)
    }

    /// Fills `output` (flat, world size times `input`'s length) with every rank's `input`.
    pub(super) fn all_gather(
        &self,
        input: &Tensor,
        output: &Tensor,
    ) -> Result<(), DistributedError> {
        let mut buffer = vec![0u8; MESSAGE_CAPACITY];
        // SAFETY: both handles are live tensors borrowed for the call; the buffer has the
        // stated capacity.
        let status = unsafe {
            caseopt_c10d_all_gather(
                self.handle,
                input.as_ptr() as *const c_void,
                output.as_ptr() as *const c_void,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        self.check(status, "all-gather", &buffer)
    }

    /// The timeout the group was joined with (it bounds every collective too).
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn check(
        &self,
        status: i32,
        operation: &'static str,
        buffer: &[u8],
    ) -> Result<(), DistributedError> {
        match status {
            0 => Ok(()),
            _ => Err(error_for(status, operation, self.timeout, buffer)),
        }
    }
}

/// One bucket's members for [`pack`] and [`unpack`]: each tensor (`None`: no gradient) with its
/// offset and length in the flat buffer.
pub(super) struct Members<'a> {
    pub tensors: Vec<Option<&'a Tensor>>,
    pub offsets: Vec<i64>,
    pub lengths: Vec<i64>,
}

/// The `at::Tensor*` handles the shim takes (null for `None`).
fn handles<'a>(tensors: impl Iterator<Item = Option<&'a Tensor>>) -> Vec<*const c_void> {
    tensors.map(|t| t.map_or(std::ptr::null(), |t| t.as_ptr() as *const c_void)).collect()
}

fn member_pointers(members: &Members<'_>) -> Vec<*const c_void> {
    handles(members.tensors.iter().copied())
}

/// Copies the members into `flat` (a dense CPU tensor of their dtype, long enough; absent ones
/// become zeros), in one call.
pub(super) fn pack(flat: &Tensor, members: &Members<'_>) -> Result<(), DistributedError> {
    let pointers = member_pointers(members);
    let mut buffer = vec![0u8; MESSAGE_CAPACITY];
    // SAFETY: `flat` and every non-null pointer are live tensor handles borrowed for the call;
    // the three arrays have `pointers.len()` entries; the shim checks nothing else is needed
    // (it falls back to ATen's copy for tensors that are not dense CPU ones of `flat`'s dtype)
    // and the caller planned offsets and lengths within `flat`.
    let status = unsafe {
        caseopt_c10d_pack(
            flat.as_ptr() as *const c_void,
            pointers.as_ptr(),
            members.offsets.as_ptr(),
            members.lengths.as_ptr(),
            pointers.len(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    match status {
        0 => Ok(()),
        _ => Err(error_for(status, "packing a bucket", Duration::ZERO, &buffer)),
    }
}

/// Copies `flat`'s regions back into the members, each element divided by `divisor`.
pub(super) fn unpack(
    flat: &Tensor,
    members: &Members<'_>,
    divisor: f64,
) -> Result<(), DistributedError> {
    let pointers = member_pointers(members);
    let mut buffer = vec![0u8; MESSAGE_CAPACITY];
    // SAFETY: as in `pack`.
    let status = unsafe {
        caseopt_c10d_unpack(
            flat.as_ptr() as *const c_void,
            pointers.as_ptr(),
            members.offsets.as_ptr(),
            members.lengths.as_ptr(),
            pointers.len(),
            divisor,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    match status {
        0 => Ok(()),
        _ => Err(error_for(status, "unpacking a bucket", Duration::ZERO, &buffer)),
    }
}

impl Drop for RawGroup {
    fn drop(&mut self) {
        // SAFETY: `handle` came from `caseopt_c10d_connect` and is freed once, here.
        unsafe { caseopt_c10d_free(self.handle) }
    }
}

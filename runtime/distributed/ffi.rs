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
        budget_ms: i64,
        serve_store: i32,
        interface: *const c_char,
        device_host: *const c_char,
        prefix: *const c_char,
        torch_compatible: i32,
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
const UNREACHABLE: i32 = 4;
const INVALID: i32 = 5;

/// A joined c10d group (a TCPStore and a `ProcessGroupGloo`), freed on drop.
#[derive(Debug)]
pub(super) struct RawGroup {
    handle: *mut c_void,
    timeout: Duration,
    world_size: i32,
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
    /// What is left of `timeout` for the rest of the rendezvous.
    pub budget: Duration,
    pub serve_store: bool,
    pub interface: Option<&'a str>,
    pub device_host: Option<&'a str>,
    /// Where this attempt's keys go in the store (ignored with `torch_compatible`).
    pub prefix: &'a str,
    /// torch.distributed's keys for its default group instead (see `Rendezvous`).
    pub torch_compatible: bool,
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
        UNREACHABLE => DistributedError::Unreachable { operation, message },
        INVALID => DistributedError::InvalidRendezvous(message),
        _ => DistributedError::Failed { operation, message },
    }
}

impl RawGroup {
    /// Joins the group; blocks until every rank has (or the timeout).
    pub(super) fn connect(args: &ConnectArgs<'_>) -> Result<Self, DistributedError> {
        let host = c_string("address", args.host)?;
        let interface = c_string("interface", args.interface.unwrap_or(""))?;
        let device_host = c_string("address", args.device_host.unwrap_or(""))?;
        let prefix = c_string("store prefix", args.prefix)?;
        let to_i32 = |what: &str, v: usize| {
            i32::try_from(v).map_err(|_| {
                DistributedError::InvalidRendezvous(format!("{what} {v} is too large"))
            })
        };
        let rank = to_i32("rank", args.rank)?;
        let size = to_i32("world size", args.world_size)?;
        // `Rendezvous` bounds the timeout well below this; the check keeps the shim's deadline
        // arithmetic from overflowing whatever the caller passes.
        let timeout_ms = i64::try_from(args.timeout.as_millis())
            .ok()
            .filter(|&ms| (1..=i64::from(i32::MAX)).contains(&ms))
            .ok_or_else(|| {
                DistributedError::InvalidRendezvous(format!(
                    "a timeout of {:?} (1 ms to {} ms)",
                    args.timeout,
                    i32::MAX
                ))
            })?;
        let budget_ms =
            i64::try_from(args.budget.as_millis()).unwrap_or(timeout_ms).clamp(1, timeout_ms);
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
                budget_ms,
                i32::from(args.serve_store),
                interface.as_ptr(),
                device_host.as_ptr(),
                prefix.as_ptr(),
                i32::from(args.torch_compatible),
                &mut handle,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        if status != 0 || handle.is_null() {
            return Err(error_for(status, "rendezvous", args.timeout, &buffer));
        }
        Ok(RawGroup { handle, timeout: args.timeout, world_size: size })
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
        let world = i64::from(self.world_size);
        let fits = [input, output].iter().all(|t| dense_cpu(t))
            && input.kind() == output.kind()
            && output.numel() as i64 == input.numel() as i64 * world;
        if !fits {
            return Err(refused(
                "all-gather",
                format!(
                    "output {:?} {:?} for {world} inputs {:?} {:?}",
                    output.size(),
                    output.kind(),
                    input.size(),
                    input.kind()
                ),
            ));
        }
        let mut buffer = vec![0u8; MESSAGE_CAPACITY];
        // SAFETY: both handles are live, dense CPU tensors of one dtype borrowed for the call,
        // `output` holding `world` times `input`'s elements (checked above); the buffer has the
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

/// A defined, dense (strided), contiguous CPU tensor: what the shim may address as one run of
/// `numel` elements from `data_ptr`.
fn dense_cpu(t: &Tensor) -> bool {
    t.defined() && t.device() == tch::Device::Cpu && !t.is_sparse() && t.is_contiguous()
}

fn refused(operation: &'static str, message: String) -> DistributedError {
    DistributedError::Failed { operation, message: format!("refused before the copy: {message}") }
}

/// The handles of a bucket's members, after checking everything the shim's copies rely on:
/// `flat` is a dense CPU tensor, the three lists have one entry per member, every region lies
/// inside `flat`, and every member present is a defined CPU tensor of exactly its region's
/// number of elements. The shim copies `length` elements with `memcpy` (and writes them back),
/// so a smaller tensor there would be read and written out of bounds.
fn member_pointers(
    operation: &'static str,
    flat: &Tensor,
    members: &Members<'_>,
) -> Result<Vec<*const c_void>, DistributedError> {
    if !dense_cpu(flat) || flat.dim() != 1 {
        return Err(refused(operation, "the bucket is not a flat dense CPU tensor".into()));
    }
    let n = members.tensors.len();
    if members.offsets.len() != n || members.lengths.len() != n {
        return Err(refused(operation, "members, offsets and lengths differ in number".into()));
    }
    let capacity = flat.numel() as i64;
    for (i, (t, (&offset, &length))) in
        members.tensors.iter().zip(members.offsets.iter().zip(&members.lengths)).enumerate()
    {
        if offset < 0 || length < 0 || offset.checked_add(length).is_none_or(|end| end > capacity) {
            return Err(refused(
                operation,
                format!("member #{i} at {offset}..+{length} outside a bucket of {capacity}"),
            ));
        }
        if let Some(t) = t {
            if !t.defined() || t.device() != tch::Device::Cpu || t.is_sparse() {
                return Err(refused(
                    operation,
                    format!("member #{i} is not a defined dense CPU tensor"),
                ));
            }
            if t.numel() as i64 != length {
                return Err(refused(
                    operation,
                    format!("member #{i} has {} elements, its region {length}", t.numel()),
                ));
            }
        }
    }
    Ok(handles(members.tensors.iter().copied()))
}

/// Copies the members into `flat` (a dense CPU tensor of their dtype, long enough; absent ones
/// become zeros), in one call.
pub(super) fn pack(flat: &Tensor, members: &Members<'_>) -> Result<(), DistributedError> {
    let pointers = member_pointers("packing a bucket", flat, members)?;
    let mut buffer = vec![0u8; MESSAGE_CAPACITY];
    // SAFETY: `flat` and every non-null pointer are live tensor handles borrowed for the call;
    // `member_pointers` checked that the three arrays have `pointers.len()` entries, that every
    // region lies inside `flat` (a dense CPU tensor) and that every member has exactly its
    // region's number of elements; the shim falls back to ATen's copy for members that are not
    // contiguous or not of `flat`'s dtype.
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
    let pointers = member_pointers("unpacking a bucket", flat, members)?;
    if !flat.is_floating_point() {
        return Err(refused("unpacking a bucket", format!("a {:?} bucket", flat.kind())));
    }
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

//! Where a rank finds its peers: torchrun's environment or explicit settings.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::DistributedError;

use super::group::ProcessGroup;

/// How long a rendezvous, and then every collective, may take before it is an error (torch's
/// own default for Gloo is 30 minutes; a training step that waits 5 minutes on a peer has lost
/// it).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The longest timeout a group accepts: 2^31 - 1 ms (24.8 days), the most milliseconds a C
/// `int` holds, which is what the socket waits under c10d and Gloo take. Longer ones are
/// refused by [`Rendezvous::with_timeout`] rather than passed on to wrap around (a timeout of
/// 10^14 ms let a healthy all-reduce hang; `Duration::MAX` failed at once with a false
/// timeout).
pub const MAX_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// The settings a rank joins its group with: the rendezvous address (rank 0's TCPStore, as
/// `MASTER_ADDR`/`MASTER_PORT`), this rank and the world size, and a timeout that bounds the
/// rendezvous and every collective after it.
///
/// ```
/// use caseopt::distributed::Rendezvous;
/// use std::time::Duration;
///
/// let r = Rendezvous::new("127.0.0.1", 29500, 1, 2)?.with_timeout(Duration::from_secs(30))?;
/// assert_eq!((r.rank(), r.world_size()), (1, 2));
/// assert!(Rendezvous::new("127.0.0.1", 29500, 2, 2).is_err()); // rank outside the world
/// # Ok::<(), caseopt::DistributedError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    master_addr: String,
    master_port: u16,
    rank: usize,
    world_size: usize,
    local_rank: usize,
    timeout: Duration,
    serve_store: bool,
    interface: Option<String>,
    attempt: u64,
    torch_compatible: bool,
}

impl Rendezvous {
    /// Rank `rank` of `world_size`, meeting at `master_addr:master_port` (rank 0 serves the
    /// store there), with [`DEFAULT_TIMEOUT`].
    pub fn new(
        master_addr: impl Into<String>,
        master_port: u16,
        rank: usize,
        world_size: usize,
    ) -> Result<Self, DistributedError> {
        let master_addr = master_addr.into();
        if world_size == 0 {
            return Err(DistributedError::InvalidRendezvous("a world size of 0".into()));
        }
        if rank >= world_size {
            return Err(DistributedError::InvalidRendezvous(format!(
                "rank {rank} is outside a world of {world_size}"
            )));
        }
        if master_addr.is_empty() {
            return Err(DistributedError::InvalidRendezvous("an empty master address".into()));
        }
        Ok(Rendezvous {
            master_addr,
            master_port,
            rank,
            world_size,
            local_rank: rank,
            timeout: DEFAULT_TIMEOUT,
            serve_store: true,
            interface: None,
            attempt: 0,
            torch_compatible: false,
        })
    }

    /// From torchrun's environment: `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE` (all
    /// required), `LOCAL_RANK` (default: `RANK`), `TORCHELASTIC_USE_AGENT_STORE` (`True` when
    /// torchrun's agent serves the store, so rank 0 does not), `TORCHELASTIC_RESTART_COUNT`
    /// (torchrun's attempt, 0 for the first: each attempt's keys go under their own prefix in
    /// the store, see [`with_attempt`](Self::with_attempt)) and `GLOO_SOCKET_IFNAME` (the
    /// network interface Gloo uses, as in torch).
    ///
    /// ```no_run
    /// let group = caseopt::distributed::Rendezvous::from_env()?.connect()?;
    /// println!("rank {} of {}", group.rank(), group.world_size());
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    pub fn from_env() -> Result<Self, DistributedError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) with the variables read through `lookup`.
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, DistributedError> {
        let required = |variable: &'static str| {
            lookup(variable).ok_or(DistributedError::Environment {
                variable,
                reason: "is not set (launch with torchrun, or set it)".into(),
            })
        };
        fn number<T: std::str::FromStr>(
            variable: &'static str,
            value: &str,
        ) -> Result<T, DistributedError> {
            value.trim().parse().map_err(|_| DistributedError::Environment {
                variable,
                reason: format!("{value:?} is not a valid number here"),
            })
        }
        let addr = required("MASTER_ADDR")?;
        let port: u16 = number("MASTER_PORT", &required("MASTER_PORT")?)?;
        let rank: usize = number("RANK", &required("RANK")?)?;
        let world: usize = number("WORLD_SIZE", &required("WORLD_SIZE")?)?;
        let mut r = Rendezvous::new(addr, port, rank, world)?;
        if let Some(local) = lookup("LOCAL_RANK") {
            r.local_rank = number("LOCAL_RANK", &local)?;
        }
        if let Some(agent) = lookup("TORCHELASTIC_USE_AGENT_STORE") {
            r.serve_store = !agent.trim().eq_ignore_ascii_case("true");
        }
        if let Some(attempt) = lookup("TORCHELASTIC_RESTART_COUNT") {
            r.attempt = number("TORCHELASTIC_RESTART_COUNT", &attempt)?;
        }
        r.interface = lookup("GLOO_SOCKET_IFNAME").filter(|i| !i.is_empty());
        Ok(r)
    }

    /// The same settings with another timeout, from 1 ms to [`MAX_TIMEOUT`]; anything else is
    /// [`DistributedError::InvalidRendezvous`]. The rendezvous as a whole fails within it (each
    /// of its waits gets what is left), and so does every collective after it.
    ///
    /// ```
    /// use caseopt::distributed::{Rendezvous, MAX_TIMEOUT};
    /// use std::time::Duration;
    ///
    /// let r = Rendezvous::new("127.0.0.1", 29500, 0, 2)?;
    /// assert!(r.clone().with_timeout(MAX_TIMEOUT).is_ok());
    /// assert!(r.clone().with_timeout(Duration::MAX).is_err());
    /// assert!(r.with_timeout(Duration::ZERO).is_err());
    /// # Ok::<(), caseopt::DistributedError>(())
    /// ```
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, DistributedError> {
        if timeout < Duration::from_millis(1) || timeout > MAX_TIMEOUT {
            return Err(DistributedError::InvalidRendezvous(format!(
                "a timeout of {timeout:?} (from 1 ms to {MAX_TIMEOUT:?})"
            )));
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// The same settings for attempt `attempt` of a job that restarts (torchrun's
    /// `TORCHELASTIC_RESTART_COUNT`, which [`from_env`](Self::from_env) reads): the attempt's
    /// keys go under `caseopt/attempt-N/` in the store, so that a restarted attempt never reads
    /// the addresses a dead one left in a store that outlives it (torchrun's agent store).
    /// Every rank of an attempt must use the same number.
    ///
    /// ```
    /// use caseopt::distributed::Rendezvous;
    /// let r = Rendezvous::new("127.0.0.1", 29500, 0, 2)?.with_attempt(1);
    /// assert_eq!(r.attempt(), 1);
    /// # Ok::<(), caseopt::DistributedError>(())
    /// ```
    pub fn with_attempt(mut self, attempt: u64) -> Self {
        self.attempt = attempt;
        self
    }

    /// The same settings, meeting ranks of `torch.distributed` instead of caseopt ones: the
    /// group is the default group that
    /// `torch.distributed.init_process_group("gloo", init_method="env://")` creates in the other
    /// ranks (Python processes, or caseopt ones with this same setting), with torch's store
    /// keys (`default_pg`, then the group name `0`, then the device `cpu`) and the group's
    /// sequence number set through the store as torch sets it. It must be the first group the
    /// Python processes create. caseopt's own check of the ranks' claims and world sizes is
    /// skipped (torch's ranks do not take part in it), and so is the per-attempt prefix (torch
    /// uses none). Collectives then meet torch's: e.g. a `dist.all_reduce(t)` in Python and
    /// [`ProcessGroup::all_reduce_sum`] here, on tensors of the same size and dtype.
    ///
    /// ```no_run
    /// use caseopt::distributed::Rendezvous;
    /// use tch::Tensor;
    ///
    /// // torchrun's variables, with Python ranks that called init_process_group("gloo")
    /// let group = Rendezvous::from_env()?.torch_compatible(true).connect()?;
    /// let t = Tensor::from_slice(&[1.0f32, 2.0]);
    /// group.all_reduce_sum(&[t.shallow_clone()])?; // meets dist.all_reduce(t) in Python
    /// # Ok::<(), caseopt::Error>(())
    /// ```
    pub fn torch_compatible(mut self, on: bool) -> Self {
        self.torch_compatible = on;
        self
    }

    /// The attempt number (see [`with_attempt`](Self::with_attempt)).
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// Whether the group is joined with torch.distributed's keys (see
    /// [`torch_compatible`](Self::torch_compatible)).
    pub fn is_torch_compatible(&self) -> bool {
        self.torch_compatible
    }

    /// The same settings with Gloo on the network interface `name` (e.g. `eth0`).
    pub fn with_interface(mut self, name: impl Into<String>) -> Self {
        self.interface = Some(name.into()).filter(|n: &String| !n.is_empty());
        self
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// This rank's index on its machine (`LOCAL_RANK`; for choosing a GPU).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// The rendezvous and collective timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The rendezvous address.
    pub fn master_addr(&self) -> &str {
        &self.master_addr
    }

    /// The rendezvous port.
    pub fn master_port(&self) -> u16 {
        self.master_port
    }

    /// Whether the address is this machine's loopback (then Gloo binds to loopback too).
    fn is_loopback(&self) -> bool {
        self.master_addr == "localhost"
            || self.master_addr.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Joins the group: blocks until every rank has joined, or fails within the timeout with
    /// [`DistributedError::Timeout`]. A rank claimed by two processes, or ranks started with
    /// different world sizes, fail at once with [`DistributedError::InvalidRendezvous`] on the
    /// ranks that see it (the others then time out, within the timeout).
    pub fn connect(&self) -> Result<ProcessGroup, DistributedError> {
        // On loopback Gloo binds to 127.0.0.1; otherwise to the interface asked for, or to the
        // address this machine's hostname resolves to (c10d's default).
        let started = Instant::now();
        if !(self.serve_store && self.rank == 0) {
            self.wait_for_store(started + self.timeout)?;
        }
        let budget = self.timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
        let device_host = self.is_loopback().then_some("127.0.0.1");
        let prefix = format!("caseopt/attempt-{}", self.attempt);
        let args = super::ffi::ConnectArgs {
            host: &self.master_addr,
            port: self.master_port,
            rank: self.rank,
            world_size: self.world_size,
            timeout: self.timeout,
            budget,
            serve_store: self.serve_store,
            interface: self.interface.as_deref(),
            device_host,
            prefix: &prefix,
            torch_compatible: self.torch_compatible,
        };
        let raw = super::ffi::RawGroup::connect(&args)?;
        Ok(ProcessGroup::new(raw, self.rank, self.world_size))
    }
}

impl Rendezvous {
    /// Waits until something accepts connections at the store's address, trying every 50 ms,
    /// or fails with [`DistributedError::Timeout`] at `deadline`. c10d's own client retries
    /// with a growing back-off and checks its deadline only between tries, so a store that
    /// comes up late, or went away, made the rendezvous last more than twice its timeout.
    fn wait_for_store(&self, deadline: Instant) -> Result<(), DistributedError> {
        let Ok(addresses) = (self.master_addr.as_str(), self.master_port).to_socket_addrs() else {
            // An address that does not resolve: c10d reports it in its words.
            return Ok(());
        };
        let addresses: Vec<SocketAddr> = addresses.collect();
        loop {
            for address in &addresses {
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt = left.min(Duration::from_millis(500)).max(Duration::from_millis(1));
                if TcpStream::connect_timeout(address, attempt).is_ok() {
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DistributedError::Timeout {
                    operation: "rendezvous",
                    timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
                    message: format!(
                        "no store answered at {}:{}",
                        self.master_addr, self.master_port
                    ),
                });
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    const TORCHRUN: [(&str, &str); 5] = [
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29400"),
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
    ];

    #[test]
    fn reads_torchrun_environment() {
        let r = Rendezvous::from_lookup(lookup(&TORCHRUN)).unwrap();
        assert_eq!((r.rank(), r.world_size(), r.local_rank()), (3, 8, 1));
        assert_eq!((r.master_addr(), r.master_port()), ("10.0.0.1", 29400));
        assert!(r.serve_store && !r.is_loopback());
        assert_eq!(r.timeout(), DEFAULT_TIMEOUT);
    }

    #[test]
    fn agent_store_and_interface() {
        let mut vars = TORCHRUN.to_vec();
        vars.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        vars.push(("GLOO_SOCKET_IFNAME", "eth1"));
        let r = Rendezvous::from_lookup(lookup(&vars)).unwrap();
        assert!(!r.serve_store);
        assert_eq!(r.interface.as_deref(), Some("eth1"));
    }

    #[test]
    fn names_the_missing_or_bad_variable() {
        let missing = Rendezvous::from_lookup(lookup(&TORCHRUN[..3])).unwrap_err();
        assert!(matches!(missing, DistributedError::Environment { variable: "WORLD_SIZE", .. }));
        let mut vars = TORCHRUN.to_vec();
        vars[1] = ("MASTER_PORT", "70000");
        let bad = Rendezvous::from_lookup(lookup(&vars)).unwrap_err();
        assert!(matches!(bad, DistributedError::Environment { variable: "MASTER_PORT", .. }));
        vars[1] = ("MASTER_PORT", "29400");
        vars[2] = ("RANK", "8");
        let outside = Rendezvous::from_lookup(lookup(&vars)).unwrap_err();
        assert!(outside.to_string().contains("rank 8 is outside a world of 8"), "{outside}");
    }

    #[test]
    fn restart_count_is_the_attempt() {
        let r = Rendezvous::from_lookup(lookup(&TORCHRUN)).unwrap();
        assert_eq!(r.attempt(), 0);
        let mut vars = TORCHRUN.to_vec();
        vars.push(("TORCHELASTIC_RESTART_COUNT", "2"));
        assert_eq!(Rendezvous::from_lookup(lookup(&vars)).unwrap().attempt(), 2);
        vars.pop();
        vars.push(("TORCHELASTIC_RESTART_COUNT", "x"));
        let bad = Rendezvous::from_lookup(lookup(&vars)).unwrap_err();
        assert!(matches!(
            bad,
            DistributedError::Environment { variable: "TORCHELASTIC_RESTART_COUNT", .. }
        ));
    }

    #[test]
    fn timeouts_are_bounded() {
        let r = Rendezvous::new("127.0.0.1", 1, 0, 1).unwrap();
        assert_eq!(r.clone().with_timeout(MAX_TIMEOUT).unwrap().timeout(), MAX_TIMEOUT);
        for bad in [
            Duration::MAX,
            MAX_TIMEOUT + Duration::from_millis(1),
            Duration::from_millis(100_000_000_000_000),
        ] {
            let e = r.clone().with_timeout(bad).unwrap_err();
            assert!(matches!(e, DistributedError::InvalidRendezvous(_)), "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn rejects_degenerate_settings() {
        assert!(Rendezvous::new("127.0.0.1", 1, 0, 0).is_err());
        assert!(Rendezvous::new("", 1, 0, 1).is_err());
        let r = Rendezvous::new("localhost", 1, 0, 1).unwrap();
        assert!(r.is_loopback());
        assert!(r.clone().with_timeout(Duration::ZERO).is_err());
        assert!(Rendezvous::new("::1", 1, 0, 1).unwrap().is_loopback());
    }
}

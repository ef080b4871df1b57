//! `--world-size N`: the main job data-parallel on N local processes, or as one of the ranks a
//! launcher such as torchrun started (then its `WORLD_SIZE`, `RANK`, `MASTER_ADDR` and
//! `MASTER_PORT` say so).
//!
//! Every rank loads the whole data set, draws the same epoch order (same seed) and trains on its
//! slice of every global batch (rows `rank * b / N ..` of a batch of `b`); `caseopt`'s
//! `DataParallel` averages the gradients, so every rank makes the same step. Only rank 0
//! prints, evaluates, plots, and writes metrics and checkpoints.

use std::process::{Command, Stdio};

use caseopt::Router;
use tch::{nn, Tensor};

type BoxError = Box<dyn std::error::Error>;

/// A rank's data-parallel machinery: caseopt's `DataParallel` over the launcher's group (in a
/// build without the `distributed` feature there is none, and no rank is ever started).
#[cfg(feature = "distributed")]
pub struct Parallel(caseopt::distributed::DataParallel);

/// A rank's data-parallel machinery; uninhabited: this build has no `distributed` feature.
#[cfg(not(feature = "distributed"))]
pub enum Parallel {}

#[cfg(feature = "distributed")]
impl Parallel {
    /// Joins the group the launcher's variables describe, takes rank 0's variables and checks
    /// that every rank routes them alike.
    pub fn join(vs: &nn::VarStore, router: &dyn Router) -> Result<Parallel, BoxError> {
        let group = caseopt::distributed::Rendezvous::from_env()?.connect()?;
        let dp = caseopt::distributed::DataParallel::new(group, vs)?;
        dp.check_router(router)?;
        Ok(Parallel(dp))
    }

    /// Backward, the gradients averaged over the ranks, then the router's step.
    pub fn backward_step(&mut self, router: &mut dyn Router, loss: &Tensor) -> caseopt::Result<()> {
        self.0.backward_step(router, loss)
    }

    /// Every variable (batch-norm statistics included) as rank 0 has it.
    pub fn broadcast_variables(&self) -> caseopt::Result<()> {
        self.0.broadcast_variables()
    }

    /// `values` summed over the ranks.
    pub fn sum(&self, values: [f64; 3]) -> Result<[f64; 3], BoxError> {
        let t = Tensor::from_slice(&values);
        self.0.group().all_reduce_sum(&[t.shallow_clone()])?;
        let v = Vec::<f64>::try_from(&t)?;
        Ok([v[0], v[1], v[2]])
    }
}

#[cfg(not(feature = "distributed"))]
impl Parallel {
    /// Always an error: this build has no `distributed` feature.
    pub fn join(_: &nn::VarStore, _: &dyn Router) -> Result<Parallel, BoxError> {
        Err(NO_FEATURE.into())
    }

    /// Unreachable (no value exists).
    pub fn backward_step(&mut self, _: &mut dyn Router, _: &Tensor) -> caseopt::Result<()> {
        match *self {}
    }

    /// Unreachable (no value exists).
    pub fn broadcast_variables(&self) -> caseopt::Result<()> {
        match *self {}
    }

    /// Unreachable (no value exists).
    pub fn sum(&self, _: [f64; 3]) -> Result<[f64; 3], BoxError> {
        match *self {}
    }
}

/// Why `--world-size` cannot work in this build.
#[cfg(not(feature = "distributed"))]
const NO_FEATURE: &str =
    "--world-size needs caseopt's `distributed` feature (on by default), which this build lacks";

/// What this process is in a run.
pub enum Role {
    /// One process: no `--world-size`, or 1.
    Single,
    /// Starts this many local ranks and waits for them.
    #[cfg_attr(not(feature = "distributed"), allow(dead_code))]
    Launcher(usize),
    /// One rank of a data-parallel run (rank, world size).
    Rank(usize, usize),
}

/// The role from `--world-size` and the environment: a launcher's variables make a rank; else
/// `--world-size N > 1` starts N.
pub fn role(world_size: u32) -> Result<Role, BoxError> {
    let var = |name: &str| std::env::var(name).ok();
    if let (Some(world), Some(rank)) = (var("WORLD_SIZE"), var("RANK")) {
        let world: usize =
            world.parse().map_err(|_| format!("WORLD_SIZE={world} is not a number"))?;
        let rank: usize = rank.parse().map_err(|_| format!("RANK={rank} is not a number"))?;
        if world_size > 1 && world != world_size as usize {
            return Err(format!(
                "--world-size {world_size} but the launcher's WORLD_SIZE is {world}"
            )
            .into());
        }
        return Ok(if world > 1 { Role::Rank(rank, world) } else { Role::Single });
    }
    Ok(match world_size {
        0 | 1 => Role::Single,
        #[cfg(not(feature = "distributed"))]
        _ => return Err(NO_FEATURE.into()),
        #[cfg(feature = "distributed")]
        n => Role::Launcher(n as usize),
    })
}

/// Starts `world` ranks of this program with the same arguments on a free loopback port and
/// waits for them; rank 0's output is shown, the others' errors too.
pub fn launch(world: usize) -> Result<(), BoxError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?;
    println!("starting {world} ranks on 127.0.0.1:{port}");
    let mut children = Vec::with_capacity(world);
    for rank in 0..world {
        let child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .stdout(if rank == 0 { Stdio::inherit() } else { Stdio::null() })
            .spawn()?;
        children.push(child);
    }
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        if !child.wait()?.success() {
            failed.push(rank.to_string());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("rank(s) {} failed (see their errors above)", failed.join(", ")).into())
    }
}

/// Rank `rank`'s rows of a global batch of `world` slices (the first ranks take one more row
/// when the batch does not divide evenly).
pub fn slice(x: &Tensor, rank: usize, world: usize) -> Result<Tensor, tch::TchError> {
    let n = x.size()[0];
    let (w, r) = (world as i64, rank as i64);
    let start = r * (n / w) + r.min(n % w);
    let len = n / w + i64::from(r < n % w);
    x.f_narrow(0, start, len)
}

#[cfg(test)]
mod tests {
    use super::slice;
    use tch::Tensor;

    #[test]
    fn slices_cover_the_batch_once() {
        for (n, world) in [(64, 2), (65, 2), (7, 3), (5, 5)] {
            let x = Tensor::arange(n, (tch::Kind::Int64, tch::Device::Cpu));
            let parts: Vec<i64> = (0..world)
                .flat_map(|r| Vec::<i64>::try_from(slice(&x, r, world).unwrap()).unwrap())
                .collect();
            assert_eq!(parts, (0..n).collect::<Vec<_>>(), "{n} over {world}");
        }
    }
}

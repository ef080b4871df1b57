//! `--world-size N`: the main job data-parallel on N local processes, or as one of the ranks a
//! launcher such as torchrun started (then its `WORLD_SIZE`, `RANK`, `MASTER_ADDR` and
//! `MASTER_PORT` say so).
//!
//! Every rank loads the whole data set, draws the same epoch order (same seed) and trains on its
//! slice of every global batch (rows `rank * b / N ..` of a batch of `b`); `caseopt`'s
//! `DataParallel` averages the gradients, so every rank makes the same step. Only rank 0
//! prints, evaluates, plots, and writes metrics and checkpoints.

use std::process::{Command, Stdio};

use tch::Tensor;

type BoxError = Box<dyn std::error::Error>;

/// What this process is in a run.
pub enum Role {
    /// One process: no `--world-size`, or 1.
    Single,
    /// Starts this many local ranks and waits for them.
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

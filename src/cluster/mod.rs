//! The ranks of a data-parallel job: one process per device, started by `mpirun` as torchrun
//! starts them, summing their gradients with one all-reduce per step.
//!
//! A process is a rank of an MPI job only when the crate is built with the `mpi` feature *and*
//! an MPI launcher started it (it sets `OMPI_COMM_WORLD_SIZE`, `PMI_SIZE` or `PMIX_RANK`).
//! Otherwise it is the only rank ([`Cluster::solo`]) and every collective is the identity, so
//! the default build, and an `mpi` build run without `mpirun`, train exactly as before.
//!
//! Every collective of an MPI job first checks that all ranks reached it (each rank reports to
//! rank 0, which answers when all have), under a timeout: a rank that died or hangs makes the
//! others end with an error naming it, instead of waiting forever. The timeout is
//! `UAL_MPI_TIMEOUT` seconds ([`DEFAULT_TIMEOUT_S`] unset); it must outlast the longest work
//! one rank does alone between two collectives (rank 0 writing a checkpoint).

#[cfg(feature = "mpi")]
mod mpi;
pub mod shard;

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::Result;

/// Seconds a rank waits at a collective for the others before ending the job.
pub const DEFAULT_TIMEOUT_S: f64 = 600.0;

/// This process's place in the job, and the collectives between the ranks.
pub struct Cluster {
    rank: usize,
    size: usize,
    local_rank: usize,
    transport: Transport,
    exchanges: Mutex<Exchanges>,
}

/// The gradient exchanges so far, for `ual bench step`: what the data parallelism costs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Exchanges {
    /// Exchanges made.
    pub count: u64,
    /// Bytes each one sent from this rank, summed.
    pub bytes: u64,
    /// Seconds they took, device read-back and upload included, and the wait for the slowest
    /// rank.
    pub seconds: f64,
    /// The part of `seconds` spent waiting for the other ranks to arrive.
    pub waiting: f64,
}

enum Transport {
    Solo,
    #[cfg(feature = "mpi")]
    Mpi(mpi::Mpi),
}

static WORLD: OnceLock<Cluster> = OnceLock::new();

/// Joins the MPI job that started this process, if any; call it first thing in `main` and keep
/// the guard until the end, when it leaves the job (`MPI_Finalize`).
pub fn init() -> Result<Guard> {
    #[cfg(feature = "mpi")]
    if mpi::launched() {
        let cluster = mpi::Mpi::join(timeout()?)?;
        let _ = WORLD.set(cluster);
        return Ok(Guard { joined: true });
    }
    let _ = WORLD.set(Cluster::solo());
    Ok(Guard { joined: false })
}

/// The job this process belongs to: the one [`init`] joined, else this process alone.
pub fn world() -> &'static Cluster {
    WORLD.get_or_init(Cluster::solo)
}

/// Leaves the MPI job when dropped.
pub struct Guard {
    joined: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "mpi")]
        if self.joined {
            mpi::finalize();
        }
        let _ = self.joined;
    }
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn timeout() -> Result<Duration> {
    let Ok(text) = std::env::var("UAL_MPI_TIMEOUT") else {
        return Ok(Duration::from_secs_f64(DEFAULT_TIMEOUT_S));
    };
    match text.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
        _ => anyhow::bail!("UAL_MPI_TIMEOUT={text:?}: expected a positive number of seconds"),
    }
}

impl Cluster {
    /// A job of one rank: every collective is the identity.
    pub fn solo() -> Self {
        Self::new(0, 1, 0, Transport::Solo)
    }

    fn new(rank: usize, size: usize, local_rank: usize, transport: Transport) -> Self {
        Self {
            rank,
            size,
            local_rank,
            transport,
            exchanges: Mutex::new(Exchanges::default()),
        }
    }

    /// Counts one gradient exchange of `bytes` that took `seconds`, `waiting` of them for the
    /// other ranks.
    pub fn record_exchange(&self, bytes: u64, seconds: f64, waiting: f64) {
        if let Ok(mut e) = self.exchanges.lock() {
            e.count += 1;
            e.bytes += bytes;
            e.seconds += seconds;
            e.waiting += waiting;
        }
    }

    /// Seconds this rank has waited at collectives for the others, so far.
    pub fn waited(&self) -> f64 {
        match &self.transport {
            Transport::Solo => 0.0,
            #[cfg(feature = "mpi")]
            Transport::Mpi(m) => m.waited(),
        }
    }

    /// The gradient exchanges so far.
    pub fn exchanges(&self) -> Exchanges {
        self.exchanges.lock().map(|e| *e).unwrap_or_default()
    }

    /// This process's rank, 0 to `size - 1`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many ranks the job has.
    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's rank among those on its machine: the device it takes (`devices = "auto"`).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Whether this is rank 0, the one that writes the run's files and reports.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Whether the job has more than one rank.
    pub fn is_parallel(&self) -> bool {
        self.size > 1
    }

    /// Replaces `values` with their element-wise sum over the ranks. `what` names the
    /// collective in the error a dead rank causes.
    pub fn sum_f32(&self, values: &mut [f32], what: &str) {
        match &self.transport {
            // One rank's values are their own sum.
            Transport::Solo => {
                let _ = (values, what);
            }
            #[cfg(feature = "mpi")]
            Transport::Mpi(m) => m.sum_f32(values, what),
        }
    }

    /// [`Cluster::sum_f32`] in f64: counts and sums that must add exactly.
    pub fn sum_f64(&self, values: &mut [f64], what: &str) {
        match &self.transport {
            Transport::Solo => {
                let _ = (values, what);
            }
            #[cfg(feature = "mpi")]
            Transport::Mpi(m) => m.sum_f64(values, what),
        }
    }

    /// Every rank's `bytes`, in rank order, on rank 0; an empty list on the others.
    pub fn gather(&self, bytes: Vec<u8>, what: &str) -> Vec<Vec<u8>> {
        match &self.transport {
            Transport::Solo => {
                let _ = what;
                vec![bytes]
            }
            #[cfg(feature = "mpi")]
            Transport::Mpi(m) => m.gather(&bytes, what),
        }
    }

    /// Rank 0's `bytes`, on every rank (the others' are replaced).
    pub fn broadcast(&self, bytes: &mut Vec<u8>, what: &str) {
        match &self.transport {
            Transport::Solo => {
                let _ = (bytes, what);
            }
            #[cfg(feature = "mpi")]
            Transport::Mpi(m) => m.broadcast(bytes, what),
        }
    }

    /// Waits until every rank is here, so that what rank 0 did before (a checkpoint written)
    /// is done when any rank goes on.
    pub fn barrier(&self, what: &str) {
        self.sum_f64(&mut [0.0], what);
    }

    /// Agrees on a result that each rank computed for itself: `Ok` on every rank only when no
    /// rank failed, otherwise the same error (naming the first rank that failed) on all of them.
    /// Keeps the ranks in step when one of them meets bad input the others did not see.
    pub fn agree<T>(&self, result: Result<T>, what: &str) -> Result<T> {
        if !self.is_parallel() {
            return result;
        }
        let mine = match &result {
            Ok(_) => Vec::new(),
            Err(e) => format!("{e:#}").into_bytes(),
        };
        let mut first = Vec::new();
        for (rank, message) in self.gather(mine, what).into_iter().enumerate() {
            if !message.is_empty() && first.is_empty() {
                first = format!("rank {rank}: {}", String::from_utf8_lossy(&message)).into_bytes();
            }
        }
        self.broadcast(&mut first, what);
        match first.is_empty() {
            true => result,
            false => Err(anyhow::anyhow!("{}", String::from_utf8_lossy(&first))),
        }
    }

    /// Runs `work` on this rank's slice of `items` ([`shard::slice`]) and returns every
    /// rank's results, in input order, on every rank: how the evaluations share their lines.
    /// An error on any rank is the error of all.
    pub fn share_work<T, R>(
        &self,
        items: &[T],
        what: &str,
        mut work: impl FnMut(usize, &T) -> Result<R>,
    ) -> Result<Vec<R>>
    where
        R: serde::Serialize + serde::de::DeserializeOwned,
    {
        let mine = shard::slice(items.len(), self.rank, self.size);
        let local: Result<Vec<R>> = mine.map(|i| work(i, &items[i])).collect();
        let local = self.agree(local, what)?;
        if !self.is_parallel() {
            return Ok(local);
        }
        let mut all = Vec::with_capacity(items.len());
        for part in self.gather(serde_json::to_vec(&local)?, what) {
            all.extend(serde_json::from_slice::<Vec<R>>(&part)?);
        }
        let mut bytes = serde_json::to_vec(&all)?;
        self.broadcast(&mut bytes, what);
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Prefixes a message with this rank in a job of several, so that a user reading the
    /// interleaved output of `mpirun` knows whose it is.
    pub fn label(&self, message: &str) -> String {
        match self.is_parallel() {
            true => format!("rank {}: {message}", self.rank),
            false => message.to_string(),
        }
    }

    /// Ends this process after an error in a job of several ranks, without waiting for the
    /// others in `MPI_Finalize` (a dead rank would keep it there): `mpirun` then ends the rest.
    pub fn exit_after_error(&self, code: i32) {
        if self.is_parallel() {
            // SAFETY: `_exit` only ends the process; stderr is unbuffered, so nothing is lost.
            unsafe { libc::_exit(code) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_solo_job_is_the_identity() {
        let c = Cluster::solo();
        let mut v = [1.5f32, -2.0];
        c.sum_f32(&mut v, "test");
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(c.gather(b"x".to_vec(), "test"), vec![b"x".to_vec()]);
        let mut b = b"root".to_vec();
        c.broadcast(&mut b, "test");
        assert_eq!(b, b"root");
        assert!(c.is_root() && !c.is_parallel());
        assert_eq!(c.label("m"), "m");
        assert!(c.agree(Err::<(), _>(anyhow::anyhow!("bad")), "t").is_err());
    }
}

//! The MPI transport (rsmpi), built with the `mpi` feature.
//!
//! MPI is called from the main thread only (`MPI_THREAD_FUNNELED`). Before each collective the
//! ranks check in with rank 0 by point-to-point messages that both sides poll under the
//! timeout; only once every rank has arrived does the collective itself run, so a dead or hung
//! rank is named instead of leaving the others blocked in it. An MPI error on the way (a peer's
//! socket closed) goes to [`on_mpi_error`], which ends the process with one line.

use std::os::raw::{c_char, c_int};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, PartitionMut};
use mpi::environment::{Threading, Universe};
use mpi::ffi;
use mpi::point_to_point::Message;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{Cluster, Transport};

/// The MPI environment, finalised when [`finalize`] drops it.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);
/// This process's rank, for the error handler.
static RANK: AtomicUsize = AtomicUsize::new(0);

/// Elements per MPI call: counts are C ints, so large buffers go in pieces.
const CHUNK: usize = 1 << 28;
/// Elements per all-reduce call: 64 MiB of f32.
const REDUCE_PIECE: usize = 1 << 24;
/// Tags cycle below 32,767, the least `MPI_TAG_UB` the standard allows.
const TAGS: u64 = 32_000;

/// Whether an MPI launcher (`mpirun`, `mpiexec`, `srun`) started this process.
pub(super) fn launched() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Leaves the MPI job (`MPI_Finalize`).
pub(super) fn finalize() {
    if let Ok(mut universe) = UNIVERSE.lock() {
        universe.take();
    }
}

pub(super) struct Mpi {
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Collectives so far: every rank calls the same ones in the same order, so this numbers
    /// the check-in messages of each.
    sequence: AtomicU64,
    /// Nanoseconds spent in [`Mpi::arrive`], waiting for the others.
    waited_ns: AtomicU64,
}

impl Mpi {
    /// Initialises MPI and reads this process's place in the job.
    pub(super) fn join(timeout: Duration) -> Result<Cluster> {
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| anyhow!("MPI was initialised already"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        RANK.store(rank, Ordering::Relaxed);
        install_error_handler(&world);
        // The ranks that share this machine's memory, numbered among themselves (MPI-3).
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        *UNIVERSE.lock().map_err(|_| anyhow!("MPI state poisoned"))? = Some(universe);
        let transport = Transport::Mpi(Mpi {
            rank,
            size,
            timeout,
            sequence: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
        });
        Ok(Cluster::new(rank, size, local_rank, transport))
    }

    pub(super) fn sum_f32(&self, values: &mut [f32], what: &str) {
        self.arrive(what);
        sum_in_pieces(values);
    }

    pub(super) fn sum_f64(&self, values: &mut [f64], what: &str) {
        self.arrive(what);
        sum_in_pieces(values);
    }

    pub(super) fn gather(&self, bytes: &[u8], what: &str) -> Vec<Vec<u8>> {
        self.arrive(what);
        let world = SimpleCommunicator::world();
        let root = world.process_at_rank(0);
        let len = bytes.len() as u64;
        if self.rank != 0 {
            root.gather_into(&len);
            let mut rounds = 0u64;
            root.broadcast_into(&mut rounds);
            for round in 0..rounds as usize {
                root.gather_varcount_into(&bytes[piece(bytes.len(), round)]);
            }
            return Vec::new();
        }
        let mut lens = vec![0u64; self.size];
        root.gather_into_root(&len, &mut lens[..]);
        let mut parts: Vec<Vec<u8>> = lens
            .iter()
            .map(|&n| Vec::with_capacity(n as usize))
            .collect();
        let mut rounds = lens
            .iter()
            .map(|&n| (n as usize).div_ceil(CHUNK))
            .max()
            .unwrap_or(0) as u64;
        // Every rank learns how many rounds there are before any round (ranks with shorter
        // parts send empty pieces in the last ones).
        root.broadcast_into(&mut rounds);
        for round in 0..rounds as usize {
            let counts: Vec<c_int> = lens
                .iter()
                .map(|&n| piece(n as usize, round).len() as c_int)
                .collect();
            let displs: Vec<c_int> = counts
                .iter()
                .scan(0, |at, &c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect();
            let mut received = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
            {
                let mut partition = PartitionMut::new(&mut received[..], &counts[..], &displs[..]);
                let send = &bytes[piece(bytes.len(), round)];
                root.gather_varcount_into_root(send, &mut partition);
            }
            for (part, (&d, &c)) in parts.iter_mut().zip(displs.iter().zip(&counts)) {
                part.extend_from_slice(&received[d as usize..(d + c) as usize]);
            }
        }
        parts
    }

    pub(super) fn broadcast(&self, bytes: &mut Vec<u8>, what: &str) {
        self.arrive(what);
        let world = SimpleCommunicator::world();
        let root = world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for chunk in bytes.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
    }

    pub(super) fn waited(&self) -> f64 {
        self.waited_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Returns once every rank has reached this collective; ends the job with an error naming
    /// the missing ranks if they do not within the timeout.
    fn arrive(&self, what: &str) {
        if self.size == 1 {
            return;
        }
        let started = Instant::now();
        self.check_in(what);
        let waited = started.elapsed().as_nanos() as u64;
        self.waited_ns.fetch_add(waited, Ordering::Relaxed);
    }

    fn check_in(&self, what: &str) {
        let world = SimpleCommunicator::world();
        let tag = (self.sequence.fetch_add(1, Ordering::Relaxed) % TAGS) as i32 + 1;
        let deadline = Instant::now() + self.timeout;
        let seconds = self.timeout.as_secs_f64();
        if self.rank == 0 {
            let mut arrived = vec![false; self.size];
            arrived[0] = true;
            while arrived.iter().any(|a| !a) {
                match world.any_process().immediate_matched_probe_with_tag(tag) {
                    Some((message, status)) => {
                        receive(message);
                        arrived[status.source_rank() as usize] = true;
                    }
                    None => wait_a_little(deadline, || {
                        let missing: Vec<String> = (0..self.size)
                            .filter(|&r| !arrived[r])
                            .map(|r| r.to_string())
                            .collect();
                        format!(
                            "rank {} did not reach {what} within {seconds} s: it died or hangs (UAL_MPI_TIMEOUT sets the wait)",
                            missing.join(", rank ")
                        )
                    }),
                }
            }
            for r in 1..self.size {
                world.process_at_rank(r as i32).send_with_tag(&1u8, tag);
            }
        } else {
            let root = world.process_at_rank(0);
            root.send_with_tag(&1u8, tag);
            loop {
                match root.immediate_matched_probe_with_tag(tag) {
                    Some((message, _)) => {
                        receive(message);
                        break;
                    }
                    None => wait_a_little(deadline, || {
                        format!(
                            "rank 0 did not start {what} within {seconds} s: rank 0, or a rank it waits for, died or hangs (UAL_MPI_TIMEOUT sets the wait)"
                        )
                    }),
                }
            }
        }
    }
}

/// Sums `values` over the ranks in pieces of [`REDUCE_PIECE`] elements, each copied to a send
/// buffer first (`MPI_IN_PLACE` is not portable through rsmpi), so the extra host memory is
/// one piece, not a second copy of a full fine-tune's gradients.
fn sum_in_pieces<T: Equivalence + Copy + Default>(values: &mut [T]) {
    let world = SimpleCommunicator::world();
    let mut send = vec![T::default(); values.len().min(REDUCE_PIECE)];
    for chunk in values.chunks_mut(REDUCE_PIECE) {
        let send = &mut send[..chunk.len()];
        send.copy_from_slice(chunk);
        world.all_reduce_into(&send[..], chunk, SystemOperation::sum());
    }
}

/// The `round`-th piece of a part of `len` bytes sent in pieces of [`CHUNK`].
fn piece(len: usize, round: usize) -> std::ops::Range<usize> {
    let start = (round * CHUNK).min(len);
    start..(start + CHUNK).min(len)
}

fn receive(message: Message) {
    let mut byte = 0u8;
    message.matched_receive_into(&mut byte);
}

/// Sleeps briefly while polling; past the deadline, ends the job with `why()`.
fn wait_a_little(deadline: Instant, why: impl FnOnce() -> String) {
    if Instant::now() > deadline {
        fail(&why());
    }
    std::thread::sleep(Duration::from_micros(50));
}

/// Ends this process with `error: rank R: message` and status 1. `mpirun` sees a rank exit
/// without `MPI_Finalize` and ends the others.
fn fail(message: &str) -> ! {
    eprintln!("error: rank {}: {message}", RANK.load(Ordering::Relaxed));
    // SAFETY: `_exit` only ends the process; stderr is unbuffered, so the line is out.
    unsafe { libc::_exit(1) }
}

/// Replaces MPI's abort-the-job default with [`on_mpi_error`], which says which rank saw what.
fn install_error_handler(world: &SimpleCommunicator) {
    type Handler = unsafe extern "C" fn(*mut ffi::MPI_Comm, *mut c_int);
    let handler: Handler = on_mpi_error;
    // SAFETY: MPI calls the handler with the communicator and the error code and reads no
    // variadic arguments back; a function that declares only those two is called correctly on
    // the C ABIs MPI runs on (the variadic part is empty).
    unsafe {
        let function: ffi::MPI_Comm_errhandler_function = Some(std::mem::transmute::<
            Handler,
            unsafe extern "C" fn(*mut ffi::MPI_Comm, *mut c_int, ...),
        >(handler));
        let mut errhandler = std::mem::MaybeUninit::uninit();
        ffi::MPI_Comm_create_errhandler(function, errhandler.as_mut_ptr());
        ffi::MPI_Comm_set_errhandler(world.as_raw(), errhandler.assume_init());
    }
}

unsafe extern "C" fn on_mpi_error(_comm: *mut ffi::MPI_Comm, code: *mut c_int) {
    let mut text = [0 as c_char; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: MPI passes a valid error code; the buffer has MPI_MAX_ERROR_STRING bytes.
    let message = unsafe {
        ffi::MPI_Error_string(*code, text.as_mut_ptr(), &mut len);
        std::ffi::CStr::from_ptr(text.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    fail(&format!(
        "MPI failed: {message} (another rank died or the network between them broke)"
    ));
}

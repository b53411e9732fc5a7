//! Data-parallel training across processes (docs/DESIGN.md §19): the ranks
//! of a [`ProcessGroup`] each compute the gradients of their share of a
//! step's micro-batches, and one all-reduce per step sums them.
//!
//! Exactness. A step's gradient is the sum of its M micro-batches'
//! gradients taken as one fixed pairwise tree over the micro-batches:
//! `sum(lo, hi) = sum(lo, mid) + sum(mid, hi)` with `mid = lo + (hi − lo)/2`
//! ([`pairwise_tree_sum`]). With N ranks (N a power of two dividing M),
//! rank r takes micro-batches [r·M/N, (r+1)·M/N), which is a node of that
//! tree; [`tree_all_reduce_sum`] then adds the ranks' nodes pairwise in the
//! tree's own order (rank 0 + 1, 2 + 3, then pairs of pairs). Float
//! addition is commutative, so both partners of a pair compute the same
//! bits, and every rank ends with exactly the sum one process computes
//! alone: the bits depend on M, never on N.
//!
//! Layout and communication. The all-reduce is recursive halving
//! (reduce-scatter) then recursive doubling (all-gather) over pairwise
//! exchanges, partners at distance 1, 2, 4, …: each rank sends and receives
//! 2·(N − 1)/N of the vector, as a ring all-reduce does, in 2·log2 N rounds.
//! A [`ProcessGroup`] provides only the pairwise exchange, so the algorithm
//! (and its bits) is the same over MPI ([`MpiGroup`], feature `mpi`),
//! threads ([`ThreadGroup`], for tests) or one process ([`SingleProcess`]).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

use crate::error::{invalid, Result};

/// The ranks of a data-parallel run, as each one sees them: its own rank,
/// how many there are, and an exchange of f32 values with one partner.
pub trait ProcessGroup {
    /// This process's rank, in 0..ranks().
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn ranks(&self) -> usize;
    /// Sends `send` to `partner` and receives `recv.len()` values from it
    /// (the partner calls `exchange` with this rank at the same time, its
    /// `send` as long as this `recv`). An error if the partner is gone.
    fn exchange(&self, partner: usize, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// A short name for messages ("MPI", "threads", "one process").
    fn transport(&self) -> &'static str;
}

/// The group of a run on one process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl ProcessGroup for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn ranks(&self) -> usize {
        1
    }
    fn exchange(&self, partner: usize, _send: &[f32], _recv: &mut [f32]) -> Result<()> {
        Err(invalid(
            "SingleProcess::exchange",
            format!("one process has no partner rank {partner}"),
        ))
    }
    fn transport(&self) -> &'static str {
        "one process"
    }
}

/// Ranks on threads of one process, joined by channels: the in-process
/// stand-in for MPI that tests run data-parallel training on.
pub struct ThreadGroup {
    rank: usize,
    /// to_rank[p]: this rank's messages to rank p
    to_rank: Vec<Sender<Vec<f32>>>,
    /// from_rank[p]: rank p's messages to this rank
    from_rank: Vec<Mutex<Receiver<Vec<f32>>>>,
}

impl ThreadGroup {
    /// The `ranks` members of a new group, member r being rank r; hand each
    /// to its own thread. A member dropped (its thread returned or
    /// panicked) makes its partners' exchanges fail instead of hang.
    pub fn new(ranks: usize) -> Vec<ThreadGroup> {
        // channels[from][to]
        let mut senders: Vec<Vec<Option<Sender<Vec<f32>>>>> = Vec::new();
        let mut receivers: Vec<Vec<Option<Receiver<Vec<f32>>>>> = (0..ranks)
            .map(|_| (0..ranks).map(|_| None).collect())
            .collect();
        for from in 0..ranks {
            let mut row = Vec::new();
            for receivers_of in receivers.iter_mut() {
                let (tx, rx) = channel();
                row.push(Some(tx));
                receivers_of[from] = Some(rx);
            }
            senders.push(row);
        }
        (0..ranks)
            .map(|rank| ThreadGroup {
                rank,
                to_rank: senders[rank]
                    .iter_mut()
                    .map(|s| s.take().unwrap())
                    .collect(),
                from_rank: receivers[rank]
                    .iter_mut()
                    .map(|r| Mutex::new(r.take().unwrap()))
                    .collect(),
            })
            .collect()
    }
}

impl ProcessGroup for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn ranks(&self) -> usize {
        self.to_rank.len()
    }
    fn exchange(&self, partner: usize, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let gone = || {
            invalid(
                "ThreadGroup::exchange",
                format!("rank {partner} left the group (its thread stopped)"),
            )
        };
        if partner >= self.ranks() || partner == self.rank {
            return Err(invalid(
                "ThreadGroup::exchange",
                format!("rank {} cannot exchange with rank {partner}", self.rank),
            ));
        }
        self.to_rank[partner]
            .send(send.to_vec())
            .map_err(|_| gone())?;
        let got = self.from_rank[partner]
            .lock()
            .expect("one thread per member")
            .recv()
            .map_err(|_| gone())?;
        if got.len() != recv.len() {
            return Err(invalid(
                "ThreadGroup::exchange",
                format!(
                    "rank {partner} sent {} values, rank {} expected {}",
                    got.len(),
                    self.rank,
                    recv.len()
                ),
            ));
        }
        recv.copy_from_slice(&got);
        Ok(())
    }
    fn transport(&self) -> &'static str {
        "threads"
    }
}

/// An error unless the group's size is a power of two (the pairwise tree
/// across ranks needs one).
pub fn check_group_size(group: &dyn ProcessGroup) -> Result<()> {
    let n = group.ranks();
    if !n.is_power_of_two() {
        return Err(invalid(
            "data-parallel training",
            format!(
                "{n} ranks: the number of ranks must be a power of two (1, 2, 4, …), so that \
                 each rank's share of a step is one node of the fixed summation tree"
            ),
        ));
    }
    Ok(())
}

/// The reference: `parts` summed as the fixed pairwise tree
/// `sum(lo, hi) = sum(lo, mid) + sum(mid, hi)`, `mid = lo + (hi − lo)/2`,
/// element by element. Every part must have the same length; an empty list
/// sums to an empty vector.
pub fn pairwise_tree_sum(parts: &[Vec<f32>]) -> Vec<f32> {
    match parts.len() {
        0 => Vec::new(),
        1 => parts[0].clone(),
        n => {
            let mut left = pairwise_tree_sum(&parts[..n / 2]);
            let right = pairwise_tree_sum(&parts[n / 2..]);
            left.iter_mut().zip(&right).for_each(|(a, b)| *a += b);
            left
        }
    }
}

/// The share of `items` rank `rank` of `ranks` takes: the contiguous range
/// [rank·items/ranks, (rank+1)·items/ranks).
pub fn share(items: usize, rank: usize, ranks: usize) -> std::ops::Range<usize> {
    rank * items / ranks..(rank + 1) * items / ranks
}

/// Sums `values` over the group's ranks in place, as the pairwise tree over
/// ranks (0 + 1, 2 + 3, (0+1) + (2+3), …): every rank ends with the same
/// bits, equal to [`pairwise_tree_sum`] of the ranks' vectors. Recursive
/// halving then doubling; each rank sends 2·(N − 1)/N of the vector.
pub fn tree_all_reduce_sum(group: &dyn ProcessGroup, values: &mut [f32]) -> Result<()> {
    check_group_size(group)?;
    let (rank, ranks) = (group.rank(), group.ranks());
    // Reduce-scatter: at distance d, partners share the segment [lo, hi);
    // the one without bit d keeps the low half, the other the high half,
    // and each adds the partner's copy of the half it keeps.
    let mut rounds = Vec::new();
    let (mut lo, mut hi) = (0, values.len());
    let mut recv = Vec::new();
    let mut distance = 1;
    while distance < ranks {
        let partner = rank ^ distance;
        let mid = lo + (hi - lo) / 2;
        let keeps_low = rank & distance == 0;
        let (keep, give) = if keeps_low {
            (lo..mid, mid..hi)
        } else {
            (mid..hi, lo..mid)
        };
        recv.resize(keep.len(), 0.0);
        group.exchange(partner, &values[give], &mut recv)?;
        values[keep.clone()]
            .iter_mut()
            .zip(&recv)
            .for_each(|(v, r)| *v += r);
        rounds.push((
            partner,
            keep.clone(),
            if keeps_low { mid..hi } else { lo..mid },
        ));
        (lo, hi) = (keep.start, keep.end);
        distance <<= 1;
    }
    // All-gather: the same rounds backwards, each rank sending the half it
    // summed and receiving the partner's.
    for (partner, keep, give) in rounds.into_iter().rev() {
        recv.resize(give.len(), 0.0);
        group.exchange(partner, &values[keep], &mut recv)?;
        values[give].copy_from_slice(&recv);
    }
    Ok(())
}

/// Checks that every rank holds the same 64-bit `fingerprint` of `what`
/// (the settings, the weights): an error naming the first rank that
/// differs from rank 0. Ranks that compute different bits (another binary,
/// a CPU with other vector instructions) would otherwise drift apart
/// silently.
pub fn check_same_on_every_rank(
    group: &dyn ProcessGroup,
    what: &str,
    fingerprint: u64,
) -> Result<()> {
    let ranks = group.ranks();
    if ranks == 1 {
        return Ok(());
    }
    // Four 16-bit pieces per rank, each exact in f32; the other ranks'
    // slots are zero, so the sum is every rank's pieces side by side.
    let mut slots = vec![0.0f32; 4 * ranks];
    for (i, slot) in slots[4 * group.rank()..4 * group.rank() + 4]
        .iter_mut()
        .enumerate()
    {
        *slot = ((fingerprint >> (16 * i)) & 0xffff) as f32;
    }
    tree_all_reduce_sum(group, &mut slots)?;
    let of = |r: usize| -> u64 {
        (0..4).fold(0, |acc, i| acc | ((slots[4 * r + i] as u64) << (16 * i)))
    };
    for r in 1..ranks {
        if of(r) != of(0) {
            return Err(invalid(
                "data-parallel training",
                format!(
                    "rank {r}'s {what} differ from rank 0's (fingerprint {:016x} against \
                     {:016x}): every rank must run the same binary with the same settings on \
                     CPUs that compute the same bits",
                    of(r),
                    of(0)
                ),
            ));
        }
    }
    Ok(())
}

/// 64-bit FNV-1a of a byte stream.
pub fn fnv1a_64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    // the 64-bit variant's offset basis and prime
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// [`fnv1a_64`] over the little-endian bits of f32 tensors, in order.
pub fn fingerprint_f32<'a>(tensors: impl IntoIterator<Item = &'a [f32]>) -> u64 {
    fnv1a_64(
        tensors
            .into_iter()
            .flat_map(|t| t.iter().flat_map(|v| v.to_bits().to_le_bytes())),
    )
}

#[cfg(feature = "mpi")]
pub use mpi_group::MpiGroup;

#[cfg(feature = "mpi")]
mod mpi_group {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use mpi::point_to_point::send_receive_into;
    use mpi::topology::{Communicator, SimpleCommunicator};

    use super::ProcessGroup;
    use crate::error::Result;

    /// The ranks of an MPI communicator (rsmpi): `mpirun -np N` or Slurm's
    /// `srun` start them. Each exchange is one `MPI_Sendrecv`. Only the
    /// thread that initialised MPI may use it.
    ///
    /// A rank that dies makes the launcher stop the others (MPI's default
    /// error handler and mpirun's job control). A rank that hangs instead
    /// (stopped, or its network silent) is caught by the timeout: a rank
    /// that has waited longer than that in one exchange prints which
    /// partner it waited for and exits, and the launcher stops the rest.
    pub struct MpiGroup {
        world: SimpleCommunicator,
        /// (since when, for which partner) this rank waits in an exchange
        waiting: Arc<Mutex<Option<(Instant, usize)>>>,
    }

    impl MpiGroup {
        /// The group of `world` (from `mpi::initialize()`; the caller keeps
        /// the `Universe`, which finalises MPI when dropped). An exchange
        /// that waits longer than `timeout` ends the process with an error.
        pub fn new(world: SimpleCommunicator, timeout: Duration) -> Self {
            let waiting: Arc<Mutex<Option<(Instant, usize)>>> = Arc::new(Mutex::new(None));
            let watched = Arc::clone(&waiting);
            let rank = world.rank();
            let poll = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            // A watchdog, not an MPI call: exiting is safe from any thread.
            std::thread::spawn(move || loop {
                std::thread::sleep(poll);
                let since = *watched.lock().expect("the watchdog's lock");
                if let Some((since, partner)) = since {
                    if since.elapsed() > timeout {
                        eprintln!(
                            "error: rank {rank}: waited {:.0} s for rank {partner} in the \
                             gradient all-reduce (--rank-timeout {}): it is hung or gone; \
                             stopping. Resume from the last checkpoint with --resume",
                            since.elapsed().as_secs_f64(),
                            timeout.as_secs_f64()
                        );
                        std::process::exit(3);
                    }
                }
            });
            Self { world, waiting }
        }
    }

    impl ProcessGroup for MpiGroup {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn ranks(&self) -> usize {
            self.world.size() as usize
        }
        fn exchange(&self, partner: usize, send: &[f32], recv: &mut [f32]) -> Result<()> {
            let peer = self.world.process_at_rank(partner as i32);
            *self.waiting.lock().expect("the watchdog's lock") = Some((Instant::now(), partner));
            // MPI's default error handler aborts the job on a failed
            // exchange (a rank that died), so no error returns here.
            send_receive_into(send, &peer, recv, &peer);
            *self.waiting.lock().expect("the watchdog's lock") = None;
            Ok(())
        }
        fn transport(&self) -> &'static str {
            "MPI"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random_vector(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.normal() as f32 * 1e3).collect()
    }

    #[test]
    fn the_all_reduce_gives_every_rank_the_bits_of_the_pairwise_tree() {
        let mut rng = Rng::new(7);
        for ranks in [1, 2, 4, 8] {
            for len in [0, 1, 3, 7, 8, 1001] {
                let parts: Vec<Vec<f32>> =
                    (0..ranks).map(|_| random_vector(&mut rng, len)).collect();
                let expected = pairwise_tree_sum(&parts);
                let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let handles: Vec<_> = ThreadGroup::new(ranks)
                        .into_iter()
                        .zip(parts.clone())
                        .map(|(group, mut v)| {
                            s.spawn(move || {
                                tree_all_reduce_sum(&group, &mut v).unwrap();
                                v
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                for (r, got) in results.iter().enumerate() {
                    let same = got.len() == expected.len()
                        && got
                            .iter()
                            .zip(&expected)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{ranks} ranks, length {len}: rank {r} differs from the tree"
                    );
                }
            }
        }
    }

    #[test]
    fn the_pairwise_tree_is_not_the_left_fold() {
        // The test above can tell the tree from a sequential sum: these
        // parts round differently in the two orders.
        let parts = vec![vec![1.0f32], vec![1e8], vec![-1e8], vec![1.0]];
        let fold = parts.iter().fold(0.0f32, |a, p| a + p[0]);
        assert_ne!(pairwise_tree_sum(&parts)[0], fold);
    }

    #[test]
    fn three_ranks_are_refused_with_the_reason() {
        let groups = ThreadGroup::new(3);
        let e = tree_all_reduce_sum(&groups[0], &mut [1.0]).unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
    }

    #[test]
    fn a_rank_that_left_makes_its_partner_fail_instead_of_hang() {
        let mut groups = ThreadGroup::new(2);
        drop(groups.pop());
        let e = tree_all_reduce_sum(&groups[0], &mut [1.0, 2.0]).unwrap_err();
        assert!(e.to_string().contains("rank 1 left"), "{e}");
    }

    #[test]
    fn ranks_with_different_fingerprints_are_named() {
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadGroup::new(4)
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let fp = if g.rank() == 2 {
                            0xdead_beef_0000_0001
                        } else {
                            0x1234_5678_9abc_def0
                        };
                        check_same_on_every_rank(&g, "weights", fp)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("rank 2's weights differ"), "{e}");
        }
        let ok: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadGroup::new(2)
                .into_iter()
                .map(|g| s.spawn(move || check_same_on_every_rank(&g, "weights", u64::MAX)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ok.iter().all(|r| r.is_ok()));
    }
}

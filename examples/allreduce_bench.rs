//! The cost of the fixed-order all-reduce (docs/DESIGN.md §19.3) against
//! MPI's own `MPI_Allreduce` (whose summation order is the library's
//! choice), on gradient-sized vectors:
//!
//!   cargo build --release --features mpi --example allreduce_bench
//!   mpirun -np 2 target/release/examples/allreduce_bench [MILLIONS_OF_F32 ...]
//!
//! Rank 0 prints, per size, the median of 9 rounds of each and their ratio,
//! and whether every rank's result equals the pairwise tree of the inputs.

use std::time::Instant;

use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::topology::Communicator;
use selective::rng::Rng;
use selective::train::distributed::pairwise_tree_sum;
use selective::train::{tree_all_reduce_sum, MpiGroup, ProcessGroup};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let group = MpiGroup::new(universe.world(), std::time::Duration::from_secs(600));
    let (rank, ranks) = (group.rank(), group.ranks());
    let sizes: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("sizes in millions of f32"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1.82, 20.5, 129.1]
    } else {
        sizes
    };
    if rank == 0 {
        println!("{ranks} ranks; times are medians of 9 rounds");
        println!(
            "| values | bytes | tree all-reduce | MPI_Allreduce | ratio | tree result exact |"
        );
        println!("|---|---|---|---|---|---|");
    }
    for millions in sizes {
        let len = (millions * 1e6) as usize;
        // every rank makes every rank's input, to check the result
        let inputs: Vec<Vec<f32>> = (0..ranks)
            .map(|r| {
                let mut rng = Rng::new(r as u64 + 1);
                (0..len).map(|_| rng.normal() as f32).collect()
            })
            .collect();
        let expected = pairwise_tree_sum(&inputs);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut exact = true;
        for _ in 0..9 {
            let mut v = inputs[rank].clone();
            world.barrier();
            let t = Instant::now();
            tree_all_reduce_sum(&group, &mut v).expect("the all-reduce");
            ours.push(t.elapsed().as_secs_f64());
            exact &= v
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            let mut out = vec![0.0f32; len];
            world.barrier();
            let t = Instant::now();
            world.all_reduce_into(&inputs[rank][..], &mut out[..], SystemOperation::sum());
            theirs.push(t.elapsed().as_secs_f64());
        }
        let (ours, theirs) = (median(ours), median(theirs));
        let mut all_exact = [exact as i32; 1];
        let mut min_exact = [0i32; 1];
        world.all_reduce_into(&all_exact[..], &mut min_exact[..], SystemOperation::min());
        all_exact[0] = min_exact[0];
        if rank == 0 {
            println!(
                "| {:.2} M | {:.0} MB | {:.1} ms | {:.1} ms | {:.2} | {} |",
                millions,
                len as f64 * 4.0 / 1e6,
                ours * 1e3,
                theirs * 1e3,
                ours / theirs,
                if all_exact[0] == 1 { "yes" } else { "NO" }
            );
        }
    }
}

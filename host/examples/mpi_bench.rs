//! A checkpoint over the MPI process group, timed (feature `mpi`): rank 0 sends `large`'s 16 float32
//! tensors to every other rank, which receive in place (touched buffers) or fresh, a few times.
//!
//! ```text
//! cargo build --release -p pgt-host --features mpi --example mpi_bench
//! mpirun -n 2 target/release/examples/mpi_bench [GiB, default 1] [reps, default 5] [fresh|inplace]
//! ```
//!
//! Prints one JSON line per receiving rank: median seconds from a barrier to `recv_checkpoint`
//! returned, and GB/s. Compare with `pgt bench --scenario large-inplace` (TCP).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgt_host::pg::{MpiProcessGroup, ProcessGroup};
use pgt_host::synthetic;
use pgt_host::transport::{Transport, TransportOptions};

const T: Duration = Duration::from_secs(120);
const GO: u64 = 1 << 40;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let gib: f64 = args.get(1).map_or(Ok(1.0), |s| s.parse()).context("GiB")?;
    let reps: usize = args.get(2).map_or(Ok(5), |s| s.parse()).context("reps")?;
    anyhow::ensure!(reps >= 1, "reps must be at least 1");
    let in_place = args.get(3).is_none_or(|s| s != "fresh");
    let pg = MpiProcessGroup::init()?;
    let (rank, size) = (pg.rank(), pg.size());
    let shape = synthetic::large((gib * (1u64 << 30) as f64) as u64, 16);
    let bytes = synthetic::total_bytes(&shape);
    let transport = Transport::new(&pg, TransportOptions::default());
    let dsts: Vec<u32> = (1..size).collect();
    let source = if rank == 0 {
        Some(synthetic::materialize(&shape)?)
    } else {
        None
    };
    let mut target = if rank > 0 && in_place {
        Some(synthetic::materialize_blank(&shape)?)
    } else {
        None
    };
    let mut times = Vec::new();
    for _ in 0..reps {
        // Start together: every receiver is ready before rank 0 sends.
        if rank == 0 {
            for &d in &dsts {
                pg.recv_into(d, GO, &mut [], T)?;
            }
            transport.send_checkpoint(&dsts, source.as_ref().expect("source"))?;
        } else {
            pg.send(0, GO, &[], T)?;
            let start = Instant::now();
            match target.as_mut() {
                Some(t) => {
                    transport.recv_checkpoint_into(0, t)?;
                    times.push(start.elapsed().as_secs_f64());
                }
                None => {
                    let sd = transport.recv_checkpoint(0)?;
                    times.push(start.elapsed().as_secs_f64());
                    synthetic::verify(&sd, &shape)?;
                }
            }
        }
    }
    if let Some(t) = &target {
        synthetic::verify(t, &shape)?;
    }
    if rank > 0 {
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{{\"rank\":{rank},\"bytes\":{bytes},\"in_place\":{in_place},\"seconds\":{median:.4},\"gbps\":{:.3},\"runs\":{times:?},\"thread_multiple\":{}}}",
            bytes as f64 / median / 1e9,
            pg.is_thread_multiple()
        );
    }
    Ok(())
}

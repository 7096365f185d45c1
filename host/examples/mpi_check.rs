//! Checks [`MpiProcessGroup`] and a `Transport` over it, as one rank of an MPI job (feature `mpi`):
//!
//! ```text
//! cargo build -p pgt-host --features mpi --example mpi_check
//! mpirun -n 3 target/debug/examples/mpi_check
//! ```
//!
//! Every rank runs the same checks (at least 3 ranks): messages out of tag order (the stash), a
//! zero-length message, the largest tag, payloads cut into pieces and received across parts that
//! straddle them, length mismatches that consume nothing, a receive timeout, receives timing out
//! part way through their messages (the peer stays usable), and checkpoints of
//! every leaf kind from rank 0 to all others in both fan-outs. Each rank prints one line; the exit
//! status is non-zero if any check failed on that rank.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use pgt_core::schema::{FanOut, PlanParams};
use pgt_host::pg::{MpiProcessGroup, PgError, ProcessGroup};
use pgt_host::synthetic;
use pgt_host::transport::{Transport, TransportOptions};

const T: Duration = Duration::from_secs(60);
/// Small pieces, so that payloads are cut (and pieces straddle the receiver's parts).
const PIECE: usize = 4096 + 13;

fn main() {
    let pg = match MpiProcessGroup::init() {
        Ok(pg) => pg.with_max_piece(PIECE),
        Err(e) => {
            eprintln!("mpi_check: {e}");
            std::process::exit(2);
        }
    };
    let rank = pg.rank();
    if std::env::args().nth(1).as_deref() == Some("stalled-receiver") {
        stalled_receiver(&pg);
    }
    match run(&pg) {
        Ok(lost) => println!(
            "rank {rank}/{}: ok (thread multiple: {}; messages lost to mid-message timeouts: {lost})",
            pg.size(),
            pg.is_thread_multiple()
        ),
        Err(e) => {
            println!("rank {rank}: FAILED: {e:#}");
            drop(pg);
            std::process::exit(1);
        }
    }
}

/// `mpi_check stalled-receiver`: rank 1 never receives; rank 0's 4 MiB send (too big to go out
/// eagerly) cannot complete, so after its 1 s timeout (+1 s) MPI still owns the bytes and the job must
/// end by `MPI_Abort` — not hang, not return.
fn stalled_receiver(pg: &MpiProcessGroup) -> ! {
    if pg.rank() == 0 {
        let big = pattern(4 << 20, 0);
        let result = pg.send(1, 99, &[&big], Duration::from_secs(1));
        println!("rank 0: the stalled send returned {result:?} instead of ending the job");
        std::process::exit(1);
    }
    std::thread::sleep(Duration::from_secs(60));
    println!("rank {}: still here after 60 s", pg.rank());
    std::process::exit(1);
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Receives of the 100,000-byte message `tag` from rank 0 into too little room fail with the named
/// error and leave it queued (the caller then receives it properly).
fn mismatches_consume_nothing(pg: &MpiProcessGroup, tag: u64) -> Result<()> {
    let mut short = vec![0u8; 10];
    match pg.recv_into(0, tag, &mut [&mut short], T) {
        Err(PgError::LengthMismatch { got: 100_000, .. }) => {}
        other => bail!("a 10-byte receive of a 100,000-byte message gave {other:?}"),
    }
    match pg.recv_vec(0, tag, 10, T) {
        Err(PgError::TooLarge { got: 100_000, .. }) => Ok(()),
        other => bail!("recv_vec(max 10) of a 100,000-byte message gave {other:?}"),
    }
}

/// Every rank tells rank 0 it got here, and rank 0 answers each once all have.
fn barrier(pg: &MpiProcessGroup, tag: u64) -> Result<()> {
    if pg.rank() == 0 {
        for r in 1..pg.size() {
            pg.recv_into(r, tag, &mut [], T)?;
        }
        for r in 1..pg.size() {
            pg.send(r, tag, &[], T)?;
        }
    } else {
        pg.send(0, tag, &[], T)?;
        pg.recv_into(0, tag, &mut [], T)?;
    }
    Ok(())
}

/// Rank 0 sends rank 2 messages of many pieces while rank 2 receives them with 1 ms timeouts: a
/// receive either gets its message whole or times out (before it, or part way: then the message is
/// lost, and the next receive drops its remaining pieces); never is the peer poisoned, and a last
/// message with a long timeout arrives intact. Then a message set aside in the stash by receives
/// that time out part way through it arrives whole. Returns how many messages were lost part way.
fn receives_that_time_out_mid_message(pg: &MpiProcessGroup) -> Result<u32> {
    const MESSAGES: u64 = 16;
    const LEN: usize = 1 << 20; // 256 pieces of PIECE bytes
    let mut lost = 0;
    match pg.rank() {
        0 => {
            for i in 0..MESSAGES {
                pg.send(2, 60 + i, &[&pattern(LEN, i as u8)], T)?;
            }
            pg.send(2, 60 + MESSAGES, &[b"after them"], T)?;
            // Set aside part by part while rank 2 waits for the message after it.
            pg.send(2, 90, &[&pattern(LEN, 90)], T)?;
            pg.send(2, 91, &[b"behind it"], T)?;
        }
        2 => {
            for i in 0..MESSAGES {
                loop {
                    match pg.recv_vec(0, 60 + i, LEN, Duration::from_millis(1)) {
                        Ok(got) => {
                            ensure!(got == pattern(LEN, i as u8), "message {i} arrived wrong");
                            break;
                        }
                        Err(PgError::TimeoutMidMessage { received, len, .. }) => {
                            ensure!(received > 0 && received < len, "{received} of {len}");
                            lost += 1;
                            break;
                        }
                        Err(PgError::Timeout { .. }) => {}
                        Err(e) => bail!("message {i}: {e}"),
                    }
                }
            }
            let last = pg.recv_vec(0, 60 + MESSAGES, 100, T)?;
            ensure!(last == b"after them", "the last message: {last:?}");
            let behind = loop {
                match pg.recv_vec(0, 91, 100, Duration::from_millis(1)) {
                    Ok(got) => break got,
                    Err(PgError::Timeout { .. }) => {}
                    Err(e) => bail!("the message behind a stashed one: {e}"),
                }
            };
            ensure!(behind == b"behind it", "behind: {behind:?}");
            let stashed = pg.recv_vec(0, 90, LEN, T)?;
            ensure!(
                stashed == pattern(LEN, 90),
                "the stashed message arrived wrong"
            );
        }
        _ => {}
    }
    Ok(lost)
}

fn run(pg: &MpiProcessGroup) -> Result<u32> {
    let (rank, size) = (pg.rank(), pg.size());
    ensure!(size >= 3, "run with at least 3 ranks (mpirun -n 3)");
    let big = pattern(100_000, rank as u8);

    // Messages: rank 0 sends four to every other rank, which takes them in another order.
    if rank == 0 {
        let big = pattern(100_000, 0);
        for dst in 1..size {
            pg.send(dst, 10, &[b"first"], T)?;
            pg.send(dst, 11, &[&big[..50_000], &big[50_000..]], T)?;
            pg.send(dst, 12, &[], T)?;
            pg.send(dst, u64::MAX, &[b"largest tag"], T)?;
        }
    } else {
        let last = pg
            .recv_vec(0, u64::MAX, 100, T)
            .context("the largest tag")?;
        ensure!(last == b"largest tag", "largest tag: got {last:?}");
        pg.recv_into(0, 12, &mut [], T).context("zero-length")?;
        mismatches_consume_nothing(pg, 11).context("stashed")?;
        // Parts that do not line up with the sender's parts or pieces.
        let (mut a, mut b, mut c) = (vec![0u8; 33_333], vec![0u8; 7], vec![0u8; 66_660]);
        pg.recv_into(0, 11, &mut [&mut a, &mut b, &mut c], T)
            .context("the cut payload")?;
        let got: Vec<u8> = [a, b, c].concat();
        ensure!(got == pattern(100_000, 0), "the cut payload arrived wrong");
        let first = pg
            .recv_vec(0, 10, 100, T)
            .context("the stashed first message")?;
        ensure!(first == b"first", "first: got {first:?}");
    }

    // The same checks on a message first in line (not set aside in the stash): mismatched lengths
    // consume nothing, and parts that straddle the sender's pieces go through the temporary path.
    barrier(pg, 24)?;
    if rank == 0 {
        for dst in 1..size {
            pg.send(dst, 25, &[&pattern(100_000, 25)], T)?;
        }
    } else {
        mismatches_consume_nothing(pg, 25).context("first in line")?;
        let (mut a, mut b, mut c) = (vec![0u8; 5_000], vec![0u8; 3], vec![0u8; 94_997]);
        pg.recv_into(0, 25, &mut [&mut a, &mut b, &mut c], T)
            .context("first in line, into straddling parts")?;
        ensure!(
            [a, b, c].concat() == pattern(100_000, 25),
            "first in line: the straddling receive arrived wrong"
        );
    }

    // Both directions at once between every pair (sends and receives on two threads).
    std::thread::scope(|s| -> Result<()> {
        let sender = s.spawn(|| -> Result<()> {
            for peer in (0..size).filter(|&p| p != rank) {
                pg.send(peer, 20, &[&big], T)?;
            }
            Ok(())
        });
        for peer in (0..size).filter(|&p| p != rank) {
            let got = pg.recv_vec(peer, 20, big.len(), T)?;
            ensure!(got == pattern(100_000, peer as u8), "exchange with {peer}");
        }
        sender.join().expect("sender thread")
    })
    .context("the all-pairs exchange")?;

    // A receive nobody sends to times out, within its timeout plus a second.
    if rank == 1 {
        let start = Instant::now();
        match pg.recv_vec(2, 777, 10, Duration::from_millis(300)) {
            Err(e) if e.is_timeout() => {}
            other => bail!("a receive nobody sends to gave {other:?}"),
        }
        let took = start.elapsed();
        ensure!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(1300),
            "the 300 ms timeout took {took:?}"
        );
    }
    barrier(pg, 30)?;
    let lost = receives_that_time_out_mid_message(pg).context("receives timing out mid-message")?;
    barrier(pg, 31)?;

    // Checkpoints of every leaf kind, both fan-outs, small buckets and chunks.
    let shape = synthetic::mixed(3 << 20);
    for fanout in [FanOut::Chain, FanOut::Direct] {
        let options = TransportOptions {
            timeout: T,
            plan: PlanParams {
                fanout,
                bucket_size: 32 << 10,
                chunk_size: 256 << 10,
            },
            ..TransportOptions::default()
        };
        let transport = Transport::new(pg, options);
        if rank == 0 {
            let sd = synthetic::materialize(&shape)?;
            let dsts: Vec<u32> = (1..size).collect();
            transport
                .send_checkpoint(&dsts, &sd)
                .with_context(|| format!("sending, {fanout:?}"))?;
        } else {
            let sd = transport
                .recv_checkpoint(0)
                .with_context(|| format!("receiving, {fanout:?}"))?;
            let bytes = synthetic::verify(&sd, &shape)?;
            ensure!(
                bytes == synthetic::total_bytes(&shape),
                "{fanout:?}: {bytes} bytes verified"
            );
        }
        barrier(pg, 40)?;
    }
    Ok(lost)
}

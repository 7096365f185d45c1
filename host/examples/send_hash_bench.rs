//! What hashing a message costs its sender, by where the hash runs relative to the send (issue 11,
//! item 3: "digests ≤ 5 % of a large transfer's CPU").
//!
//! `cargo run --release -p pgt-host --example send_hash_bench -- [GiB] [reps]` (default 1 GiB, 5
//! reps). A touched source of that size is written over one loopback TCP connection to a reader
//! thread (into a reused 8 MiB buffer), by `write` calls of `grain` bytes; the writing thread's CPU
//! time (`CLOCK_THREAD_CPUTIME_ID`) is the figure. Cases, round-robin so that drift hits them alike,
//! each after evicting the source from the caches (a 256 MiB pass over another buffer):
//! - `send 4M`: no hash (pgt with `--no-digests`);
//! - `hash+send 4M`: XXH3 of each 4 MiB right before its write (pgt's sender);
//! - `send+hash 4M`: … right after its write;
//! - `send 1M` / `hash+send 1M`: 1 MiB writes, without and with the hash before (L2 of 2 MiB);
//! - `hash+send 256K` / `send+hash 256K`: the same with 256 KiB writes (hashed bytes in L2);
//! - `hash+send 256K more`: 256 KiB writes hashed before, `MSG_MORE` on all but the last of each
//!   4 MiB (the kernel holds partial segments back until the 4 MiB is written);
//! - `bounce 1M` / `bounce 256K`: each piece copied into a reused buffer of that size, hashed and
//!   written from there (the kernel's copy and the hash read from L2; the one read from memory is
//!   the user-space copy);
//! - `hash cold` / `hash hot`: XXH3 alone, over the evicted source and over one 256 KiB piece again
//!   and again: what a hash costs at memory speed and at cache speed.
//!
//! Prints one line per case: median CPU seconds per GiB and GB/s of the writing thread.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

/// CPU time of the calling thread.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn xxh3(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = twox_hash::XxHash3_64::new();
    h.write(bytes);
    h.finish()
}

fn evict(scratch: &mut [u8], round: u8) {
    for page in scratch.chunks_mut(4096) {
        page[0] = round;
    }
    let sum: u64 = scratch.iter().step_by(64).map(|&b| u64::from(b)).sum();
    std::hint::black_box(sum);
}

#[derive(Clone, Copy)]
enum Hash {
    None,
    Before,
    After,
    /// Before, each 4 MiB written as `grain` pieces with `MSG_MORE` on all but its last.
    BeforeMore,
    /// Each piece copied into a reused buffer of `grain` bytes (which stays in L2), hashed there and
    /// written from there: one read from memory, by the copy.
    Bounce,
}

/// One `send` with `MSG_MORE` (more of the message follows: do not push a partial segment).
fn write_all_more(w: &TcpStream, mut piece: &[u8]) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(w);
    while !piece.is_empty() {
        let n = sock.send_with_flags(piece, libc::MSG_MORE)?;
        piece = &piece[n..];
    }
    Ok(())
}

/// Writes `source` in `grain` writes to a reader thread; returns the writer's CPU seconds.
fn send(source: &[u8], grain: usize, hash: Hash) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let total = source.len();
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 8 << 20];
        let mut got = 0;
        while got < total {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(())
    });
    let mut w = TcpStream::connect(addr)?;
    let mut digest = 0u64;
    let cpu = thread_cpu_seconds();
    let per_message = (4 << 20) / grain;
    let mut bounce = vec![0u8; grain];
    for (i, piece) in source.chunks(grain).enumerate() {
        if let Hash::Bounce = hash {
            let hot = &mut bounce[..piece.len()];
            hot.copy_from_slice(piece);
            digest ^= xxh3(hot);
            w.write_all(hot)?;
            continue;
        }
        if let Hash::Before | Hash::BeforeMore = hash {
            digest ^= xxh3(piece);
        }
        if matches!(hash, Hash::BeforeMore) && (i + 1) % per_message != 0 {
            write_all_more(&w, piece)?;
        } else {
            w.write_all(piece)?;
        }
        if let Hash::After = hash {
            digest ^= xxh3(piece);
        }
    }
    let cpu = thread_cpu_seconds() - cpu;
    std::hint::black_box(digest);
    drop(w);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(cpu)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let gib: f64 = args.next().map_or(Ok(1.0), |a| a.parse())?;
    let reps: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let len = (gib * (1u64 << 30) as f64) as usize;
    let source: Vec<u8> = (0..len).map(|i| (i * 31 + i / 4096) as u8).collect();
    let mut scratch = vec![0u8; 256 << 20];
    const M4: usize = 4 << 20;
    const K256: usize = 256 << 10;
    const M1: usize = 1 << 20;
    let cases: [(&str, usize, Hash); 10] = [
        ("send 4M", M4, Hash::None),
        ("hash+send 4M", M4, Hash::Before),
        ("send+hash 4M", M4, Hash::After),
        ("send 1M", M1, Hash::None),
        ("hash+send 1M", M1, Hash::Before),
        ("hash+send 256K", K256, Hash::Before),
        ("send+hash 256K", K256, Hash::After),
        ("hash+send 256K more", K256, Hash::BeforeMore),
        ("bounce 1M", M1, Hash::Bounce),
        ("bounce 256K", K256, Hash::Bounce),
    ];
    let mut samples = vec![Vec::new(); cases.len() + 2];
    for rep in 0..reps {
        for (i, &(_, grain, hash)) in cases.iter().enumerate() {
            evict(&mut scratch, rep as u8);
            samples[i].push(send(&source, grain, hash)?);
        }
        evict(&mut scratch, rep as u8);
        let cpu = thread_cpu_seconds();
        let d: u64 = source.chunks(K256).map(xxh3).fold(0, |a, b| a ^ b);
        samples[cases.len()].push(thread_cpu_seconds() - cpu);
        let hot = &source[..K256];
        let t = Instant::now();
        let d2: u64 = (0..len / K256)
            .map(|_| xxh3(std::hint::black_box(hot)))
            .fold(0, |a, b| a ^ b);
        samples[cases.len() + 1].push(t.elapsed().as_secs_f64());
        std::hint::black_box((d, d2));
    }
    let names = cases.iter().map(|c| c.0).chain(["hash cold", "hash hot"]);
    let per_gib = (1u64 << 30) as f64 / len as f64;
    for (name, mut s) in names.zip(samples) {
        s.sort_by(f64::total_cmp);
        let median = s[s.len() / 2];
        println!(
            "{name:20} {:.3} CPU·s/GiB  {:5.1} GB/s  (runs: {})",
            median * per_gib,
            len as f64 / median / 1e9,
            s.iter()
                .map(|x| format!("{:.3}", x * per_gib))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

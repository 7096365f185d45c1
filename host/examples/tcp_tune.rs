//! Loopback throughput of the TCP process group for a few socket buffer sizes and per-syscall
//! chunk (write/read) sizes, next to plain single-stream TCP. Used to pick `TcpTuning::default()`.
//!
//! ```text
//! cargo run --release -p pgt-host --example tcp_tune [MiB per message, default 256] [reps, default 4] [rounds, default 3]
//! ```
//!
//! Each configuration forms a 2-rank group over 127.0.0.1 and moves `reps` messages of the given
//! size from rank 0 (`send`, two parts) to rank 1 (`recv_into` a touched buffer), timed at the
//! receiver from the start of each receive. The whole table is measured `rounds` times,
//! interleaved (the machine is shared and noisy); each cell shows the median GB/s (1e9 bytes/s)
//! of its `reps * rounds` samples.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use pgt_host::pg::{raw_loopback_gbps, ProcessGroup, TcpOptions, TcpProcessGroup, TcpTuning};

const T: Duration = Duration::from_secs(120);

fn group(tuning: &TcpTuning) -> Vec<TcpProcessGroup> {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hs: Vec<_> = (0..2)
        .map(|rank| {
            let tuning = tuning.clone();
            std::thread::spawn(move || {
                TcpProcessGroup::connect_with(
                    TcpOptions {
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        rank,
                        world_size: 2,
                        token: b"tune".to_vec(),
                        timeout: Duration::from_secs(10),
                        listen_host: None,
                    },
                    tuning,
                )
                .unwrap()
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure(tuning: &TcpTuning, src: &[u8], dst: &mut [u8], reps: usize) -> Vec<f64> {
    let g = group(tuning);
    let mut samples = Vec::new();
    std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let (a, b) = src.split_at(src.len() / 2);
            for tag in 0..reps as u64 {
                g[0].send(1, tag, &[a, b], T).unwrap();
            }
        });
        for tag in 0..reps as u64 {
            let t0 = Instant::now();
            g[1].recv_into(0, tag, &mut [&mut *dst], T).unwrap();
            samples.push(dst.len() as f64 / t0.elapsed().as_secs_f64() / 1e9);
        }
        sender.join().unwrap();
    });
    samples
}

/// Round-trip time of 64-byte messages (send + recv_into on both sides), median of `n`.
fn ping_pong_us(n: usize) -> f64 {
    let g = group(&TcpTuning::default());
    let mut rtts = Vec::with_capacity(n);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut b = [0u8; 64];
            for i in 0..n as u64 {
                g[1].recv_into(0, i, &mut [&mut b], T).unwrap();
                g[1].send(0, i, &[&b], T).unwrap();
            }
        });
        let mut b = [7u8; 64];
        for i in 0..n as u64 {
            let t0 = Instant::now();
            g[0].send(1, i, &[&b], T).unwrap();
            g[0].recv_into(1, i, &mut [&mut b], T).unwrap();
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    });
    median(&mut rtts)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut arg = |default: usize| args.next().map_or(default, |a| a.parse().expect("number"));
    let (mib, reps, rounds) = (arg(256), arg(4), arg(3));
    let len = mib << 20;
    let src: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    let mut dst = vec![1u8; len];

    let bufs: [Option<usize>; 4] = [None, Some(256 << 10), Some(1 << 20), Some(4 << 20)];
    let chunks = [256usize << 10, 1 << 20, 4 << 20, 16 << 20];
    let d = TcpTuning::default();
    let mut raw = Vec::new();
    let mut deflt = Vec::new();
    let mut cells = vec![Vec::new(); bufs.len() * chunks.len()];
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for _ in 0..reps {
            raw.push(raw_loopback_gbps(len as u64).unwrap());
        }
        for (i, b) in bufs.iter().enumerate() {
            for (j, c) in chunks.iter().enumerate() {
                let tuning = TcpTuning {
                    send_buffer: *b,
                    recv_buffer: *b,
                    chunk_size: *c,
                    ..TcpTuning::default()
                };
                cells[i * chunks.len() + j].extend(measure(&tuning, &src, &mut dst, reps));
            }
        }
        deflt.extend(measure(&d, &src, &mut dst, reps));
    }

    let raw = median(&mut raw);
    println!(
        "{mib} MiB messages, median of {} samples per cell, GB/s",
        reps * rounds
    );
    println!("plain loopback TCP (8 MiB writes, default buffers): {raw:.2}");
    print!("{:>16}", "SO_*BUF \\ chunk");
    for c in chunks {
        print!("{:>9}", format!("{}K", c >> 10));
    }
    println!();
    for (i, b) in bufs.iter().enumerate() {
        let name = b.map_or("auto".to_string(), |b| format!("{}K", b >> 10));
        print!("{name:>16}");
        for j in 0..chunks.len() {
            print!("{:>9.2}", median(&mut cells[i * chunks.len() + j]));
        }
        println!();
    }
    let g = median(&mut deflt);
    println!(
        "default ({:?}/{:?}, {}K chunks): {g:.2} = {:.0}% of plain TCP",
        d.send_buffer,
        d.recv_buffer,
        d.chunk_size >> 10,
        100.0 * g / raw
    );
    println!(
        "64-byte ping-pong round trip (default tuning): {:.1} µs median",
        ping_pong_us(20_000)
    );
}

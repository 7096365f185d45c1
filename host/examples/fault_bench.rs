//! Page-fault cost of receiving into fresh memory, and what `pgt_host::memory` does about it.
//!
//! `cargo run --release -p pgt-host --example fault_bench -- [GiB] [reps] [filter]` (default 1 GiB,
//! 3 reps, every case; `filter` keeps the cases whose name contains it, plus (a) and (g i)).
//!
//! Every case runs `reps` times, round-robin (so drift on a noisy machine hits all cases alike); the
//! table shows the median. Memset cases write the whole target once; `populate` cases only map it;
//! `tcp` cases receive the target over one loopback TCP connection from a sender thread writing
//! from a touched 8 MiB buffer, in 16 MiB messages (pgt's default chunk size), timed from the
//! receiver's allocation to the last byte. "rss+" is the receiver's resident-set growth at the end
//! of the case (target still alive).

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pgt_host::memory::{Buffer, Pages, PrefaultMethod, PrefaultOptions, Prefaulter};

/// pgt's default chunk size: the receiver claims and reads one message at a time.
const MESSAGE: usize = 16 << 20;
/// The sender's (touched) source buffer.
const SOURCE: usize = 8 << 20;

struct Outcome {
    time: Duration,
    note: String,
}

impl From<Duration> for Outcome {
    fn from(time: Duration) -> Outcome {
        Outcome {
            time,
            note: String::new(),
        }
    }
}

type Case<'a> = (&'static str, Box<dyn FnMut() -> Outcome + 'a>);

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn memset_fresh(mut make: impl FnMut() -> Buffer) -> Outcome {
    let t = Instant::now();
    let mut b = make();
    b.fill(1);
    let time = t.elapsed();
    black_box(&b);
    time.into()
}

/// One `madvise(MADV_POPULATE_WRITE)` over a fresh buffer's whole length.
fn populate_once(n: usize, pages: Pages) -> Outcome {
    let t = Instant::now();
    let mut b = Buffer::zeroed_with(n, pages);
    let ptr = b.as_mut_ptr();
    // SAFETY: the buffer's own mapping (page aligned, length rounded up to pages); POPULATE_WRITE
    // doesn't change contents.
    let len = n.next_multiple_of(pgt_host::memory::page_size());
    let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
    let time = t.elapsed();
    let note = if r == 0 {
        String::new()
    } else {
        format!("failed: {}", std::io::Error::last_os_error())
    };
    black_box(&b);
    Outcome { time, note }
}

/// `mmap(MAP_POPULATE)`: the kernel faults everything in before returning.
fn map_populate(n: usize) -> Outcome {
    let t = Instant::now();
    // SAFETY: a new private anonymous mapping; unmapped below, never accessed.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    let time = t.elapsed();
    assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: the mapping made above, exactly.
    unsafe { libc::munmap(p, n) };
    time.into()
}

/// The background prefaulter alone, from allocation until it is done.
fn prefault_only(n: usize, pages: Pages, method: PrefaultMethod) -> Outcome {
    let t = Instant::now();
    let opts = PrefaultOptions {
        method: Some(method),
        ..Default::default()
    };
    let pf = Prefaulter::with_options(vec![Buffer::zeroed_with(n, pages)], opts);
    while !pf.is_done() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let time = t.elapsed();
    let note = if pf.method() == method {
        String::new()
    } else {
        format!("ran {:?}", pf.method())
    };
    drop(pf.finish());
    Outcome { time, note }
}

/// Where the receiver puts the bytes.
enum Target<'a> {
    Touched(&'a mut Buffer),
    Fresh(Pages),
    Prefaulted(Pages, PrefaultMethod),
}

fn tcp(n: usize, target: Target<'_>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sender = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let src = vec![0x5au8; SOURCE];
        let mut go = [0u8; 1];
        s.read_exact(&mut go).expect("go");
        let mut left = n;
        while left > 0 {
            let k = left.min(SOURCE);
            s.write_all(&src[..k]).expect("send");
            left -= k;
        }
    });
    let (mut s, _) = listener.accept().expect("accept");
    s.set_nodelay(true).expect("nodelay");
    let rss0 = rss_bytes();
    let t = Instant::now();
    let mut note = String::new();
    let mut kept = None;
    match target {
        Target::Touched(buf) => {
            s.write_all(&[1]).expect("go");
            for off in (0..n).step_by(MESSAGE) {
                s.read_exact(&mut buf[off..(off + MESSAGE).min(n)])
                    .expect("recv");
            }
        }
        Target::Fresh(pages) => {
            let mut buf = Buffer::zeroed_with(n, pages);
            s.write_all(&[1]).expect("go");
            for off in (0..n).step_by(MESSAGE) {
                s.read_exact(&mut buf[off..(off + MESSAGE).min(n)])
                    .expect("recv");
            }
            kept = Some(vec![buf]);
        }
        Target::Prefaulted(pages, method) => {
            let opts = PrefaultOptions {
                method: Some(method),
                ..Default::default()
            };
            let pf = Prefaulter::with_options(vec![Buffer::zeroed_with(n, pages)], opts);
            s.write_all(&[1]).expect("go");
            for off in (0..n).step_by(MESSAGE) {
                s.read_exact(pf.claim(0, off..(off + MESSAGE).min(n)))
                    .expect("recv");
            }
            let st = pf.stats();
            note = format!(
                "prefaulter did {:.0}%",
                100.0 * st.prefaulted as f64 / st.total.max(1) as f64
            );
            kept = Some(pf.finish());
        }
    }
    let time = t.elapsed();
    let grew = rss_bytes().saturating_sub(rss0);
    sender.join().expect("sender");
    if let Some(bufs) = &kept {
        assert!(bufs[0][n - 1] == 0x5a && bufs[0][0] == 0x5a, "data check");
    }
    drop(kept);
    note = format!("rss+ {:>5} MiB  {note}", grew >> 20);
    Outcome { time, note }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gib: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3).max(1);
    let filter = args.next().unwrap_or_default();
    let pause = Duration::from_millis(
        std::env::var("PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let n = ((gib * (1u64 << 30) as f64) as usize).max(4096);
    println!(
        "fault_bench: target {:.3} GiB, {} reps (median shown), page {} B, THP {}, MADV_POPULATE_WRITE {}",
        n as f64 / (1u64 << 30) as f64,
        reps,
        pgt_host::memory::page_size(),
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default()
            .trim(),
        if pgt_host::memory::populate_write_supported() {
            "yes"
        } else {
            "no"
        },
    );

    let mut touched = Buffer::zeroed_with(n, Pages::Small);
    touched.fill(7);
    // The touched target is shared by (a) and (g i): take it out of the closures through a cell.
    let touched = std::cell::RefCell::new(&mut touched);
    let pw = PrefaultMethod::PopulateWrite;
    let touch = PrefaultMethod::Touch;
    let mut cases: Vec<Case<'_>> = vec![
        (
            "(a)  memset, touched memory",
            Box::new(|| {
                let mut b = touched.borrow_mut();
                let t = Instant::now();
                b.fill(3);
                t.elapsed().into()
            }),
        ),
        (
            "(b)  memset, fresh Vec (calloc)",
            Box::new(|| {
                let t = Instant::now();
                let mut v = vec![0u8; n];
                v.fill(1);
                let time = t.elapsed();
                black_box(&v);
                time.into()
            }),
        ),
        (
            "(c)  memset, fresh mmap 4K",
            Box::new(|| memset_fresh(|| Buffer::zeroed_with(n, Pages::Small))),
        ),
        (
            "(d)  memset, fresh mmap THP",
            Box::new(|| memset_fresh(|| Buffer::zeroed_with(n, Pages::Huge))),
        ),
        ("(e)  mmap MAP_POPULATE 4K", Box::new(|| map_populate(n))),
        (
            "(f1) MADV_POPULATE_WRITE 4K, 1 call",
            Box::new(|| populate_once(n, Pages::Small)),
        ),
        (
            "(f2) MADV_POPULATE_WRITE THP, 1 call",
            Box::new(|| populate_once(n, Pages::Huge)),
        ),
        (
            "(f3) Prefaulter alone, PopulateWrite 4K",
            Box::new(move || prefault_only(n, Pages::Small, pw)),
        ),
        (
            "(f4) Prefaulter alone, PopulateWrite THP",
            Box::new(move || prefault_only(n, Pages::Huge, pw)),
        ),
        (
            "(f5) Prefaulter alone, Touch 4K",
            Box::new(move || prefault_only(n, Pages::Small, touch)),
        ),
        (
            "(f6) Prefaulter alone, Touch THP",
            Box::new(move || prefault_only(n, Pages::Huge, touch)),
        ),
        (
            "(g i)   tcp -> touched",
            Box::new(|| tcp(n, Target::Touched(&mut touched.borrow_mut()))),
        ),
        (
            "(g ii)  tcp -> fresh 4K",
            Box::new(|| tcp(n, Target::Fresh(Pages::Small))),
        ),
        (
            "(g ii') tcp -> fresh THP",
            Box::new(|| tcp(n, Target::Fresh(Pages::Huge))),
        ),
        (
            "(g iii) tcp -> fresh 4K + prefaulter",
            Box::new(move || tcp(n, Target::Prefaulted(Pages::Small, pw))),
        ),
        (
            "(g iv)  tcp -> fresh THP + prefaulter",
            Box::new(move || tcp(n, Target::Prefaulted(Pages::Huge, pw))),
        ),
        (
            "(g iv') tcp -> fresh THP + prefaulter(Touch)",
            Box::new(move || tcp(n, Target::Prefaulted(Pages::Huge, touch))),
        ),
    ];

    let mut results: Vec<Vec<Outcome>> = cases.iter().map(|_| Vec::new()).collect();
    for rep in 0..reps {
        eprint!("rep {}/{reps}:", rep + 1);
        for (i, (name, run)) in cases.iter_mut().enumerate() {
            if i == 0 || i == 11 || name.contains(filter.as_str()) {
                eprint!(" {i}");
                std::thread::sleep(pause);
                results[i].push(run());
            }
        }
        eprintln!();
    }

    let median = |r: &[Outcome]| -> (Duration, String) {
        let mut idx: Vec<usize> = (0..r.len()).collect();
        idx.sort_by_key(|&i| r[i].time);
        let m = idx[idx.len() / 2];
        (r[m].time, r[m].note.clone())
    };
    let memset_base = median(&results[0]).0;
    let tcp_base = median(&results[11]).0;
    println!(
        "\n{:<46} {:>9} {:>8} {:>7}  {:<24} notes",
        "case", "median s", "GB/s", "ratio", "samples s"
    );
    for (i, (name, _)) in cases.iter().enumerate() {
        if results[i].is_empty() {
            continue;
        }
        let (t, note) = median(&results[i]);
        let base = if i >= 11 { tcp_base } else { memset_base };
        let samples: Vec<String> = results[i]
            .iter()
            .map(|o| format!("{:.3}", o.time.as_secs_f64()))
            .collect();
        println!(
            "{:<46} {:>9.3} {:>8.2} {:>7.2}  {:<24} {}",
            name,
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64() / 1e9,
            base.as_secs_f64() / t.as_secs_f64(),
            samples.join(" "),
            note
        );
    }
    println!("\nratio: throughput relative to (a) for (a)-(f), to (g i) for (g).");
}

//! Page-fault cost of receiving into fresh memory, and what `pgt_host::memory` does about it.
//!
//! `cargo run --release -p pgt-host --example fault_bench -- [GiB] [reps] [filter]`
//! (default 1 GiB, 3 reps, every case; `filter`, a comma-separated list, keeps the cases whose
//! name contains one of its items, plus the two baselines (a) and (g i)). Environment: `COLD_MS`
//! (default 5000), see below.
//!
//! Every case runs `reps` times, round-robin (so drift on a noisy machine hits all cases alike);
//! the table shows the median and every sample. Memset cases write the whole target once; populate
//! cases only map it; tcp cases receive it over one loopback TCP connection from a sender thread
//! writing from a touched 8 MiB buffer, in 4 MiB messages (pgt's default chunk size), timed from
//! the receiver's allocation to the last byte. "cpu" is the CPU time all threads (sender,
//! receiver, prefaulter) used meanwhile; "rss+" the resident-set growth by then (target alive).
//!
//! **Cold memory.** On a VM with free-page reporting (virtio-balloon; this machine reports free
//! blocks of ≥ 8 MiB about 2 s after they are freed), memory freed by the previous case goes back
//! to the host, and huge pages then cost ~20× more to fault in than on memory freed a moment ago
//! (4 KiB pages barely differ). A receiver's fresh buffers normally come from such long-free
//! memory, so each case first sleeps `COLD_MS` (default 5000) ms. `COLD_MS=0` measures "warm"
//! memory instead (freed just before, by the previous case).
//!
//! **Shared machine.** The pause before each case (at least 0.5 s) is repeated (up to 12 times)
//! while other processes keep the CPUs more than 15% busy, so that samples come from quiet moments
//! where there are any; stderr shows how often it waited.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pgt_host::memory::{
    page_size, populate_write_supported, Buffer, BufferPool, Pages, PrefaultMethod,
    PrefaultOptions, ReceiveMemory, Target as Region,
};

/// pgt's default chunk size: the receiver claims and reads one message at a time.
const MESSAGE: usize = 4 << 20;
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

/// Idle and total jiffies of all CPUs (first line of /proc/stat).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (idle, v.iter().take(8).sum())
}

/// Sleeps `cold` (at least 0.5 s), again and again while other processes kept the machine more
/// than 15% busy meanwhile (at most 12 times). Returns how many times it slept.
fn quiet_pause(cold: Duration) -> u32 {
    let window = cold.max(Duration::from_millis(500));
    for attempt in 1..=12 {
        let (i0, t0) = cpu_jiffies();
        std::thread::sleep(window);
        let (i1, t1) = cpu_jiffies();
        if t1 <= t0 || (i1 - i0) as f64 >= 0.85 * (t1 - t0) as f64 {
            return attempt;
        }
    }
    12
}

/// CPU time (user + system) of the whole process so far.
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, exclusively borrowed rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn memset_fresh(n: usize, pages: Pages) -> Outcome {
    let t = Instant::now();
    let mut b = Buffer::zeroed_with(n, pages);
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
    let len = n.next_multiple_of(page_size());
    // SAFETY: the buffer's own mapping (page aligned, its length rounded up to pages is mapped);
    // POPULATE_WRITE doesn't change contents.
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

fn options(method: PrefaultMethod) -> PrefaultOptions {
    PrefaultOptions {
        method: Some(method),
        // Measured alone, with nobody writing: no window to wait at.
        window: usize::MAX,
        ..Default::default()
    }
}

/// The background prefaulter alone, from allocation until it is done.
fn prefault_only(n: usize, pages: Pages, method: PrefaultMethod) -> Outcome {
    let t = Instant::now();
    let pf = ReceiveMemory::with_options(
        vec![Region::Fresh(Buffer::zeroed_with(n, pages))],
        options(method),
    );
    while !pf.prefault_done() {
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
    /// A buffer from the pool (fresh the first time), given back afterwards.
    Pooled(&'a BufferPool),
    Fresh(Pages),
    /// `count` fresh buffers splitting the target, prefaulted by `method`.
    Prefaulted {
        pages: Pages,
        method: PrefaultMethod,
        count: usize,
    },
}

fn recv_into(s: &mut TcpStream, buf: &mut [u8]) {
    for off in (0..buf.len()).step_by(MESSAGE) {
        let end = (off + MESSAGE).min(buf.len());
        s.read_exact(&mut buf[off..end]).expect("recv");
    }
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
    let cpu0 = cpu_time();
    let t = Instant::now();
    let mut note = String::new();
    let mut kept = Vec::new();
    let give_back = match &target {
        Target::Pooled(pool) => Some(*pool),
        _ => None,
    };
    match target {
        Target::Touched(buf) => {
            s.write_all(&[1]).expect("go");
            recv_into(&mut s, buf);
        }
        Target::Pooled(pool) => {
            let (mut buf, reused) = pool.take_or_zeroed(n);
            s.write_all(&[1]).expect("go");
            recv_into(&mut s, &mut buf);
            note = if reused { "reused" } else { "fresh" }.to_string();
            kept.push(buf);
        }
        Target::Fresh(pages) => {
            let mut buf = Buffer::zeroed_with(n, pages);
            s.write_all(&[1]).expect("go");
            recv_into(&mut s, &mut buf);
            kept.push(buf);
        }
        Target::Prefaulted {
            pages,
            method,
            count,
        } => {
            // As a receiver would: allocate every destination, start the prefaulter, receive.
            let part = n.div_ceil(count);
            let bufs: Vec<Buffer> = (0..n)
                .step_by(part)
                .map(|off| Buffer::zeroed_with(part.min(n - off), pages))
                .collect();
            let pf = ReceiveMemory::with_options(
                bufs.into_iter().map(Region::Fresh).collect(),
                options(method),
            );
            s.write_all(&[1]).expect("go");
            for i in 0..pf.len() {
                let len = pf.region_len(i);
                for off in (0..len).step_by(MESSAGE) {
                    let end = (off + MESSAGE).min(len);
                    pf.write(&[(i, off..end)], |p| s.read_exact(p[0]))
                        .expect("in bounds")
                        .expect("recv");
                }
            }
            let st = pf.stats();
            note = format!(
                "prefaulter did {:.0}%",
                100.0 * st.prefaulted as f64 / st.total.max(1) as f64
            );
            kept = pf.finish().into_iter().flatten().collect();
        }
    }
    sender.join().expect("sender");
    let time = t.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    let grew = rss_bytes().saturating_sub(rss0);
    for b in &kept {
        assert!(b[0] == 0x5a && b[b.len() - 1] == 0x5a, "data check");
    }
    if let Some(pool) = give_back {
        for b in kept.drain(..) {
            pool.put(b);
        }
    }
    drop(kept);
    note = format!(
        "cpu {:.2} s  rss+ {:>4} MiB  {note}",
        cpu.as_secs_f64(),
        grew >> 20
    );
    Outcome { time, note }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gib: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3).max(1);
    let filter = args.next().unwrap_or_default();
    let cold_ms: u64 = std::env::var("COLD_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let n = ((gib * (1u64 << 30) as f64) as usize).max(page_size());
    println!(
        "fault_bench: target {:.3} GiB, {} reps (median shown), page {} B, THP {}, \
         MADV_POPULATE_WRITE {}, {} memory (COLD_MS={cold_ms})",
        n as f64 / (1u64 << 30) as f64,
        reps,
        page_size(),
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default()
            .trim(),
        if populate_write_supported() {
            "yes"
        } else {
            "no"
        },
        if cold_ms >= 3000 { "cold" } else { "warm" },
    );

    let mut touched = Buffer::zeroed_with(n, Pages::Small);
    touched.fill(7);
    // The touched target serves (a) and (g i).
    let touched = std::cell::RefCell::new(&mut touched);
    let pool = BufferPool::new(n);
    let pw = PrefaultMethod::PopulateWrite;
    let touch = PrefaultMethod::Touch;
    let mlock = PrefaultMethod::Mlock;
    let (small, huge) = (Pages::Small, Pages::Huge);
    let prefaulted = |pages, method, count| Target::Prefaulted {
        pages,
        method,
        count,
    };
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
            Box::new(|| memset_fresh(n, small)),
        ),
        (
            "(d)  memset, fresh mmap THP",
            Box::new(|| memset_fresh(n, huge)),
        ),
        ("(e)  mmap MAP_POPULATE 4K", Box::new(|| map_populate(n))),
        (
            "(f1) MADV_POPULATE_WRITE 4K, 1 call",
            Box::new(|| populate_once(n, small)),
        ),
        (
            "(f2) MADV_POPULATE_WRITE THP, 1 call",
            Box::new(|| populate_once(n, huge)),
        ),
        (
            "(f3) Prefaulter alone, PopulateWrite 4K",
            Box::new(|| prefault_only(n, small, pw)),
        ),
        (
            "(f4) Prefaulter alone, PopulateWrite THP",
            Box::new(|| prefault_only(n, huge, pw)),
        ),
        (
            "(f5) Prefaulter alone, Touch 4K",
            Box::new(|| prefault_only(n, small, touch)),
        ),
        (
            "(f6) Prefaulter alone, Touch THP",
            Box::new(|| prefault_only(n, huge, touch)),
        ),
        (
            "(f7) Prefaulter alone, Mlock 4K",
            Box::new(|| prefault_only(n, small, mlock)),
        ),
        (
            "(g i)   tcp -> touched",
            Box::new(|| tcp(n, Target::Touched(&mut touched.borrow_mut()))),
        ),
        (
            "(g ii)  tcp -> fresh 4K",
            Box::new(|| tcp(n, Target::Fresh(small))),
        ),
        (
            "(g ii') tcp -> fresh THP",
            Box::new(|| tcp(n, Target::Fresh(huge))),
        ),
        (
            "(g iii) tcp -> fresh 4K + prefaulter",
            Box::new(|| tcp(n, prefaulted(small, pw, 1))),
        ),
        (
            "(g iii') tcp -> 256 fresh 4K + prefaulter",
            Box::new(|| tcp(n, prefaulted(small, pw, 256))),
        ),
        (
            "(g iv)  tcp -> fresh THP + prefaulter",
            Box::new(|| tcp(n, prefaulted(huge, pw, 1))),
        ),
        (
            "(g v)   tcp -> fresh 4K + prefaulter(Touch)",
            Box::new(|| tcp(n, prefaulted(small, touch, 1))),
        ),
        (
            "(g vi)  tcp -> fresh 4K + prefaulter(Mlock)",
            Box::new(|| tcp(n, prefaulted(small, mlock, 1))),
        ),
        (
            "(g vii) tcp -> BufferPool (reused after rep 1)",
            Box::new(|| tcp(n, Target::Pooled(&pool))),
        ),
    ];
    let tcp_base_index = cases
        .iter()
        .position(|(name, _)| name.starts_with("(g i)"))
        .expect("baseline");

    let mut results: Vec<Vec<Outcome>> = cases.iter().map(|_| Vec::new()).collect();
    for rep in 0..reps {
        eprint!("rep {}/{reps}:", rep + 1);
        for (i, (name, run)) in cases.iter_mut().enumerate() {
            let wanted = filter.split(',').any(|f| name.contains(f));
            if i == 0 || i == tcp_base_index || wanted {
                eprint!(" {i}");
                let slept = quiet_pause(Duration::from_millis(cold_ms));
                if slept > 1 {
                    eprint!("(waited {}x)", slept - 1);
                }
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
    // Per-rep ratios against the baseline run in the same rep (seconds apart), then their median:
    // steadier than a ratio of medians when the machine's load drifts.
    let ratio = |i: usize, base: usize| -> f64 {
        let mut r: Vec<f64> = results[i]
            .iter()
            .zip(&results[base])
            .map(|(c, b)| b.time.as_secs_f64() / c.time.as_secs_f64())
            .collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    println!(
        "\n{:<46} {:>8} {:>6} {:>6}  {:<30} notes",
        "case", "median s", "GB/s", "ratio", "samples s"
    );
    for (i, (name, _)) in cases.iter().enumerate() {
        if results[i].is_empty() {
            continue;
        }
        let (t, note) = median(&results[i]);
        let base = if i >= tcp_base_index {
            tcp_base_index
        } else {
            0
        };
        let samples: Vec<String> = results[i]
            .iter()
            .map(|o| format!("{:.3}", o.time.as_secs_f64()))
            .collect();
        println!(
            "{:<46} {:>8.3} {:>6.2} {:>6.2}  {:<30} {}",
            name,
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64() / 1e9,
            ratio(i, base),
            samples.join(" "),
            note
        );
    }
    println!(
        "\nratio: throughput relative to (a) for (a)-(f), to (g i) for (g); the median of the \
         per-rep ratios."
    );
}

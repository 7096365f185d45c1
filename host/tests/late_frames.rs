//! A transfer that stalls and whose data arrive after the receiver gave up (issue 13: "one failed
//! transfer never affects the next"). While the receiver waits for the next transfer's header from
//! that sender, the process group reads the late data messages; before `ProcessGroup::forget_prefix`
//! it set them aside in its per-peer stash, and once they exceeded the stash limit every later
//! receive from that sender failed with `PgError::UnexpectedBacklog`, forever. Now the `Transport`
//! tells the group that the failed transfer's id is dead, and its late messages are dropped as they
//! arrive, read in bounded chunks: the next transfer is received byte for byte, with a stash limit
//! far below the late data.
//!
//! Over the in-process group and over TCP (threads, one group handle per rank).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgt_core::schema::{FanOut, PlanParams};
use pgt_host::pg::inproc::InProcLimits;
use pgt_host::pg::{InProcessGroup, ProcessGroup, TcpOptions, TcpProcessGroup, TcpTuning};
use pgt_host::state_dict::{Entry, StateDict, Tensor};
use pgt_host::transport::{Transport, TransportOptions};

mod common;
use common::OnSend;

/// The stash may hold this much per peer …
const STASH_LIMIT: usize = 1 << 20;
/// … and each late transfer sends this many bytes of data (in 256 KiB chunks) after the receiver
/// gave up: 8 times the limit.
const FLOATS: usize = 2 << 20;
const CHUNK: u64 = 256 << 10;
/// The receiver's timeout, and how long the sender stalls before its first data message.
const RECV_TIMEOUT: Duration = Duration::from_millis(800);
const STALL: Duration = Duration::from_millis(1500);

fn checkpoint(round: u64) -> StateDict<'static> {
    let values: Vec<f32> = (0..FLOATS)
        .map(|i| round as f32 * 3.0e6 + i as f32)
        .collect();
    let mut sd = StateDict::new();
    sd.insert(
        "w",
        Entry::Tensor(Tensor::from_values(&[FLOATS as u64], &values).unwrap()),
    )
    .unwrap();
    sd.step = Some(round);
    sd
}

fn plan() -> PlanParams {
    PlanParams {
        fanout: FanOut::Direct,
        bucket_size: CHUNK,
        chunk_size: CHUNK,
    }
}

/// `e` and its sources on one line.
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s += &format!(": {c}");
        source = c.source();
    }
    s
}

fn assert_same(got: &StateDict<'_>, want: &StateDict<'_>) {
    assert_eq!(got.step, want.step, "step");
    let (g, w) = (got.tensor("w").unwrap(), want.tensor("w").unwrap());
    assert_eq!(g.shape(), w.shape());
    assert!(
        g.storage.bytes() == w.storage.bytes(),
        "the received bytes differ from the sent ones"
    );
}

/// Rank 0 sends `stalls` transfers that stall, then a good one; rank 1 receives until it has one,
/// and every receive must either get the good transfer byte for byte or fail by a timeout (the
/// stalled ones) — never because the stalled transfers' late data filled the stash.
fn late_data_do_not_wedge_the_next_transfer<P: ProcessGroup>(sender: P, receiver: P, stalls: u32) {
    // The first data message (tag 3) of each of the first `stalls` transfers waits `STALL` before it
    // goes out, as a sender stopped (SIGSTOP, a long GC pause) would.
    let (stalled, in_data) = (std::sync::Mutex::new(0), AtomicBool::new(false));
    let stalling = move |pg: &P, dst, tag, parts: &[&[u8]], timeout| {
        if tag == 1 {
            in_data.store(false, Ordering::SeqCst);
        }
        if tag == 3 && !in_data.swap(true, Ordering::SeqCst) {
            let mut n = stalled.lock().unwrap();
            if *n < stalls {
                *n += 1;
                drop(n);
                std::thread::sleep(STALL);
            }
        }
        pg.send(dst, tag, parts, timeout)
    };
    let sender = Transport::new(
        OnSend {
            inner: sender,
            hook: stalling,
        },
        TransportOptions {
            timeout: Duration::from_secs(30),
            plan: plan(),
            ..TransportOptions::default()
        },
    );
    let receiver = Transport::new(
        receiver,
        TransportOptions {
            timeout: RECV_TIMEOUT,
            plan: plan(),
            ..TransportOptions::default()
        },
    );
    let last = u64::from(stalls);
    std::thread::scope(|s| {
        let sending = s.spawn(|| {
            for round in 0..=last {
                sender.send_checkpoint(&[1], &checkpoint(round)).unwrap();
            }
        });
        let started = Instant::now();
        let mut timeouts = 0;
        let got = loop {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no good transfer within 60 s"
            );
            match receiver.recv_checkpoint(0) {
                Ok(sd) if sd.step == Some(last) => break sd,
                Ok(sd) => panic!("received the stalled transfer {:?}", sd.step),
                Err(e) if e.is_timeout() => timeouts += 1,
                Err(e) => panic!(
                    "a receive failed otherwise than by a timeout: {}",
                    with_sources(&e)
                ),
            }
        };
        assert!(
            timeouts >= stalls,
            "each stalled transfer times out ({timeouts} timeouts)"
        );
        assert_same(&got, &checkpoint(last));
        sending.join().unwrap();
    });
}

fn tcp_pair() -> (TcpProcessGroup, TcpProcessGroup) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut groups: Vec<TcpProcessGroup> = (0..2)
        .map(|rank| {
            std::thread::spawn(move || {
                TcpProcessGroup::connect_with(
                    TcpOptions {
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        rank,
                        world_size: 2,
                        token: b"late-frames-test-token".to_vec(),
                        timeout: Duration::from_secs(20),
                        listen_host: None,
                    },
                    TcpTuning {
                        stash_limit: STASH_LIMIT,
                        ..TcpTuning::default()
                    },
                )
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let b = groups.pop().unwrap();
    (groups.pop().unwrap(), b)
}

fn inproc_pair() -> (InProcessGroup, InProcessGroup) {
    let mut groups = InProcessGroup::with_limits(
        2,
        InProcLimits {
            stash_limit: STASH_LIMIT,
            ..InProcLimits::default()
        },
    );
    let b = groups.pop().unwrap();
    (groups.pop().unwrap(), b)
}

#[test]
fn late_data_do_not_wedge_the_next_transfer_in_process() {
    let (a, b) = inproc_pair();
    late_data_do_not_wedge_the_next_transfer(a, b, 1);
}

#[test]
fn late_data_do_not_wedge_the_next_transfer_tcp() {
    let (a, b) = tcp_pair();
    late_data_do_not_wedge_the_next_transfer(a, b, 1);
}

/// Three stalled transfers in a row: each one's id is forgotten, none of their late data is kept.
#[test]
fn late_data_of_several_transfers_tcp() {
    let (a, b) = tcp_pair();
    late_data_do_not_wedge_the_next_transfer(a, b, 3);
}

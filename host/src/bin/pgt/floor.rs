//! The floor of a `pgt bench` scenario: the same bytes over the same kind of process group, through
//! the same topology, into the same kind of memory, by the simplest loop — plain `send`/`recv_into`
//! of chunks, no protocol, no metadata, no digests. What pgt adds is its time over this one's.
//!
//! The digest floor is the same loop hashing every byte once per rank, as pgt's digests do: the
//! sender each piece right before the system call that sends it (`send_observed`), each receiver
//! each piece as it lands (`recv_into_observed`), into one XXH3 stream per rank, with the transport's
//! own hasher. What pgt adds beyond its digests is its time over that one's.
//!
//! - Memory: fresh scenarios receive into fresh mappings prefaulted by [`ReceiveMemory`] (as pgt's
//!   receiver does); in-place and pooled ones into touched memory.
//! - Layout: `large`-like scenarios keep their storages (one region each) and cut them into
//!   `--chunk-size` messages; `small` and `mixed` are one stream of all their bytes in one mapping,
//!   in messages of `--bucket-size` (`small`: pgt's buckets) or `--chunk-size` (`mixed`).
//! - Topology: one thread per destination on the sender (direct fan-out writes the stream to each
//!   receiver); with chain fan-out each receiver but the last forwards each chunk, from its own
//!   memory, on a second thread as soon as it has landed.
//!
//! Timing is pgt's: from the sender's "go" until a receiver has every byte (and has forwarded it).
//! Off the clock, every byte is checked against the sender's pattern, and the digest floor's ranks
//! report their stream's digest (`digest`), which the bench compares.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pgt_host::memory::{Buffer, ReceiveMemory, Target};
use pgt_host::pg::{PgError, ProcessGroup};
use pgt_host::transport::StorageHasher;
use serde_json::{json, Value};

use crate::common;

/// The raw transfer of one scenario.
#[derive(Clone, Debug)]
pub struct Floor {
    /// Destination regions in receive order (each its own mapping).
    pub regions: Vec<usize>,
    /// Bytes per message.
    pub message: usize,
    /// Fresh (prefaulted) memory, else touched memory.
    pub fresh: bool,
    /// Receivers forward to the next rank (else the sender sends to each).
    pub chain: bool,
    /// The digest floor: every rank hashes every byte it sends or receives once (see the module docs).
    pub digests: bool,
}

/// Tags of the floor's messages: far from pgt's (3 + message index) and the bench's barrier tags.
const TAG_BASE: u64 = 1 << 48;

/// Byte `i` of the stream: a period (251, prime) that no chunk size lines up with.
fn pattern_at(i: usize) -> u8 {
    (i % 251) as u8
}

/// `len` bytes of the pattern from stream offset 0, plus one period to slice any offset from.
fn pattern_block(len: usize) -> Vec<u8> {
    (0..len + 251).map(pattern_at).collect()
}

/// A rank's digest of its stream in a report: hex, or null when it hashed nothing.
fn digest_json(hasher: Option<StorageHasher>) -> Value {
    hasher.map_or(Value::Null, |h| json!(format!("{:016x}", h.finish())))
}

impl Floor {
    /// The messages: (index, region, byte range of the region, offset in the stream).
    fn messages(&self) -> Vec<(usize, std::ops::Range<usize>, usize)> {
        let mut out = Vec::new();
        let mut stream = 0;
        for (r, &len) in self.regions.iter().enumerate() {
            for off in (0..len).step_by(self.message.max(1)) {
                let end = (off + self.message).min(len);
                out.push((r, off..end, stream + off));
            }
            stream += len;
        }
        out
    }

    /// Runs this rank's part (rank 0 sends; the others receive) and returns its report, like
    /// `bench::worker`'s: receivers' `seconds` and `verified`, every rank's `cpu_seconds`.
    pub fn run_rank(&self, pg: &dyn ProcessGroup, timeout: Duration) -> Result<Value> {
        let (rank, world) = (pg.rank(), pg.size());
        ensure!(world >= 2, "the floor needs a sender and a receiver");
        let messages = self.messages();
        let total: usize = self.regions.iter().sum();
        if rank == 0 {
            let mut source = vec![0u8; total];
            let block = pattern_block(self.message.min(total));
            for (_, _, at) in &messages {
                let n = self.message.min(total - at);
                source[*at..at + n].copy_from_slice(&block[at % 251..][..n]);
            }
            let receivers: Vec<u32> = (1..world).collect();
            let dsts = if self.chain {
                &receivers[..1]
            } else {
                &receivers[..]
            };
            crate::bench::sender_barrier(pg, &receivers, timeout)?;
            let cpu = common::cpu_seconds();
            let start = Instant::now();
            let digest = std::thread::scope(|s| -> Result<Option<StorageHasher>> {
                let sends: Vec<_> = dsts
                    .iter()
                    .enumerate()
                    .map(|(n, &d)| {
                        let (messages, source) = (&messages, &source);
                        // Direct fan-out sends the stream to each receiver; it is hashed once.
                        let mut hasher = (self.digests && n == 0).then(StorageHasher::default);
                        s.spawn(move || -> Result<Option<StorageHasher>> {
                            for (i, (_, range, at)) in messages.iter().enumerate() {
                                let bytes = &source[*at..at + range.len()];
                                let tag = TAG_BASE + i as u64;
                                match hasher.as_mut() {
                                    Some(h) => {
                                        pg.send_observed(d, tag, &[bytes], timeout, &mut |_, p| {
                                            h.update(p)
                                        })
                                    }
                                    None => pg.send(d, tag, &[bytes], timeout),
                                }
                                .with_context(|| format!("floor: sending to rank {d}"))?;
                            }
                            Ok(hasher)
                        })
                    })
                    .collect();
                let mut digest = None;
                for h in sends {
                    digest = digest.or(h.join().expect("floor sender thread")?);
                }
                Ok(digest)
            })?;
            return Ok(json!({
                "rank": 0,
                "seconds": start.elapsed().as_secs_f64(),
                "cpu_seconds": common::cpu_seconds() - cpu,
                "digest": digest_json(digest),
            }));
        }
        let from = if self.chain { rank - 1 } else { 0 };
        let next = (self.chain && rank + 1 < world).then_some(rank + 1);
        let mut targets = Vec::with_capacity(self.regions.len());
        for &len in &self.regions {
            let mut buf = Buffer::try_zeroed(len).context("floor: allocating")?;
            targets.push(if self.fresh {
                Target::Fresh(buf)
            } else {
                buf.fill(1);
                Target::Touched(buf)
            });
        }
        let memory = ReceiveMemory::new(targets);
        crate::bench::receiver_barrier(pg, timeout)?;
        let cpu = common::cpu_seconds();
        let start = Instant::now();
        let mut hasher = self.digests.then(StorageHasher::default);
        std::thread::scope(|s| -> Result<()> {
            let (landed_tx, landed) = mpsc::channel::<usize>();
            let forward = next.map(|n| {
                let (memory, messages) = (&memory, &messages);
                s.spawn(move || -> Result<()> {
                    for i in landed {
                        let (r, range, _) = &messages[i];
                        let bytes = memory.read(*r, range.clone()).context("landed")?;
                        pg.send(n, TAG_BASE + i as u64, &[bytes], timeout)
                            .with_context(|| format!("floor: forwarding to rank {n}"))?;
                    }
                    Ok(())
                })
            });
            for (i, (r, range, _)) in messages.iter().enumerate() {
                let tag = TAG_BASE + i as u64;
                memory
                    .write(&[(*r, range.clone())], |s| -> Result<(), PgError> {
                        match hasher.as_mut() {
                            Some(h) => pg
                                .recv_into_observed(from, tag, s, timeout, &mut |_, p| h.update(p)),
                            None => pg.recv_into(from, tag, s, timeout),
                        }
                    })?
                    .with_context(|| format!("floor: receiving from rank {from}"))?;
                if forward.is_some() {
                    let _ = landed_tx.send(i);
                }
            }
            drop(landed_tx);
            if let Some(f) = forward {
                f.join().expect("floor forward thread")?;
            }
            Ok(())
        })?;
        let seconds = start.elapsed().as_secs_f64();
        let cpu_seconds = common::cpu_seconds() - cpu;
        let block = pattern_block(self.message.min(total));
        let verified = messages.iter().all(|(r, range, at)| {
            memory.read(*r, range.clone()) == Some(&block[at % 251..][..range.len()])
        });
        Ok(json!({
            "rank": rank,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "bytes": total,
            "verified": verified,
            "digest": digest_json(hasher),
        }))
    }
}

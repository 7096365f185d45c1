//! [`InProcessGroup`]: all ranks in one process, each rank a handle movable to its own thread.
//!
//! Each ordered pair (src, dst) has a channel: a FIFO "wire" of whole messages plus the receiver's
//! [stash](super#messages-and-tags). Semantics mirror the TCP group: per-peer order, tag matching
//! with a bounded stash, [`PgError::LengthMismatch`] / [`PgError::TooLarge`] without consuming,
//! timeouts everywhere, [`PgError::PeerClosed`] once the other rank's handle is dropped.
//!
//! Like a socket buffer, the wire holds at most [`DEFAULT_WIRE_CAPACITY`] bytes of unreceived
//! messages: a send waits (up to its timeout) while the wire is fuller than that, except that a
//! message is always accepted onto an empty wire, whatever its size. So a rank may send several
//! small messages before the peer receives, but not unboundedly much.
//!
//! Copies: a send copies the parts into one buffer (the wire can't borrow the caller's slices past
//! the call); `recv_vec` hands that buffer over, `recv_into` copies it into the caller's parts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::stash::{Stash, DEFAULT_STASH_LIMIT};
use super::wait_until;
use super::{check_peer, total_len, Dest, PgError, ProcessGroup};

/// Default bytes of sent-but-unreceived messages per (src, dst) pair before `send` waits.
pub const DEFAULT_WIRE_CAPACITY: usize = 64 << 20;

/// Limits of an in-process group, per ordered pair of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InProcLimits {
    /// Bytes of unreceived messages on the wire before `send` waits (a message is always accepted
    /// onto an empty wire).
    pub wire_capacity: usize,
    /// Cap on stashed (out-of-order) bytes, as in the TCP group.
    pub stash_limit: usize,
}

impl Default for InProcLimits {
    fn default() -> Self {
        InProcLimits {
            wire_capacity: DEFAULT_WIRE_CAPACITY,
            stash_limit: DEFAULT_STASH_LIMIT,
        }
    }
}

struct ChanState {
    wire: VecDeque<(u64, Vec<u8>)>,
    wire_bytes: usize,
    stash: Stash,
    /// Receivers currently waiting, per tag (a frame somebody waits for is left for them rather
    /// than stashed by another receiver).
    waiting: HashMap<u64, usize>,
    sender_gone: bool,
    receiver_gone: bool,
}

impl std::fmt::Debug for ChanState {
    /// A summary: payloads can be huge.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChanState")
            .field("wire_frames", &self.wire.len())
            .field("wire_bytes", &self.wire_bytes)
            .field("stash", &self.stash)
            .field("sender_gone", &self.sender_gone)
            .field("receiver_gone", &self.receiver_gone)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Channel {
    state: Mutex<ChanState>,
    cv: Condvar,
}

impl Channel {
    fn lock(&self) -> MutexGuard<'_, ChanState> {
        // A panic while holding the lock can only come from a bug here; the state stays consistent
        // enough to keep going, so ignore poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct Shared {
    size: u32,
    /// Index `src * size + dst`.
    channels: Vec<Channel>,
    limits: InProcLimits,
}

impl Shared {
    fn chan(&self, src: u32, dst: u32) -> &Channel {
        &self.channels[(src as usize) * (self.size as usize) + dst as usize]
    }
}

/// One rank's handle of an in-process group. `Send + Sync`; dropping it closes its channels (peers
/// then get [`PgError::PeerClosed`] once they have drained what it sent).
#[derive(Debug)]
pub struct InProcessGroup {
    rank: u32,
    shared: Arc<Shared>,
}

impl InProcessGroup {
    /// Create a group of `world_size` ranks with default limits; element `i` is rank `i`.
    pub fn new(world_size: u32) -> Vec<InProcessGroup> {
        Self::with_limits(world_size, InProcLimits::default())
    }

    /// Create a group of `world_size` ranks with the given limits.
    pub fn with_limits(world_size: u32, limits: InProcLimits) -> Vec<InProcessGroup> {
        let n = world_size as usize;
        let channels = (0..n * n)
            .map(|_| Channel {
                state: Mutex::new(ChanState {
                    wire: VecDeque::new(),
                    wire_bytes: 0,
                    stash: Stash::new(limits.stash_limit),
                    waiting: HashMap::new(),
                    sender_gone: false,
                    receiver_gone: false,
                }),
                cv: Condvar::new(),
            })
            .collect();
        let shared = Arc::new(Shared {
            size: world_size,
            channels,
            limits,
        });
        (0..world_size)
            .map(|rank| InProcessGroup {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    /// Shared receive logic: find the next message with `tag` from `src`, check its length with
    /// `accept` (which returns an error to leave it in place), and take it.
    fn recv_msg(
        &self,
        src: u32,
        tag: u64,
        timeout: Duration,
        accept: impl Fn(usize) -> Result<(), PgError>,
    ) -> Result<Vec<u8>, PgError> {
        check_peer(src, self.rank, self.shared.size)?;
        let deadline = Instant::now() + timeout;
        let chan = self.shared.chan(src, self.rank);
        let mut st = chan.lock();
        let mut registered = false;
        let result = loop {
            if let Some(len) = st.stash.peek_len(tag) {
                break accept(len).map(|()| st.stash.take(tag).expect("peeked"));
            }
            if let Some((ftag, payload)) = st.wire.front() {
                let (ftag, len) = (*ftag, payload.len());
                if ftag == tag {
                    if let Err(e) = accept(len) {
                        break Err(e);
                    }
                    let (_, payload) = st.wire.pop_front().expect("front");
                    st.wire_bytes -= len;
                    chan.cv.notify_all();
                    break Ok(payload);
                }
                let others_wait = st.waiting.get(&ftag).is_some_and(|&n| n > 0);
                if !others_wait && st.stash.is_forgotten(payload) {
                    // Nobody will want it (`forget_prefix`): dropped, not stashed.
                    st.wire.pop_front();
                    st.wire_bytes -= len;
                    chan.cv.notify_all();
                    continue;
                }
                if !others_wait {
                    if !st.stash.fits(len as u64) {
                        break Err(PgError::UnexpectedBacklog {
                            peer: src,
                            wanted: tag,
                            blocking_tag: ftag,
                            len: len as u64,
                            stashed: st.stash.bytes() as u64,
                            limit: st.stash.limit() as u64,
                        });
                    }
                    let (ftag, payload) = st.wire.pop_front().expect("front");
                    st.wire_bytes -= len;
                    st.stash.push(ftag, payload);
                    chan.cv.notify_all();
                    continue;
                }
                // Somebody else waits for the frame in front: leave it to them and wait.
            } else if st.sender_gone {
                break Err(PgError::PeerClosed { peer: src });
            }
            if !registered {
                *st.waiting.entry(tag).or_default() += 1;
                registered = true;
                // Re-check: a receiver that skipped past us may already be waiting on us.
                chan.cv.notify_all();
            }
            let (g, timed_out) = wait_until(&chan.cv, st, deadline);
            st = g;
            if timed_out {
                // One last look before giving up (the wakeup may have been the message).
                let ready = st.stash.peek_len(tag).is_some()
                    || st.wire.front().is_some_and(|(t, _)| *t == tag);
                if !ready {
                    break Err(PgError::Timeout {
                        peer: src,
                        tag,
                        after: timeout,
                    });
                }
            }
        };
        if registered {
            let n = st.waiting.get_mut(&tag).expect("registered");
            *n -= 1;
            if *n == 0 {
                st.waiting.remove(&tag);
            }
            // A frame left in front for us may now be stashed by others.
            chan.cv.notify_all();
        }
        result
    }
}

impl ProcessGroup for InProcessGroup {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn size(&self) -> u32 {
        self.shared.size
    }

    fn send(&self, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError> {
        check_peer(dst, self.rank, self.shared.size)?;
        let deadline = Instant::now() + timeout;
        let total = usize::try_from(total_len(parts)).expect("parts fit in memory");
        let mut payload = Vec::with_capacity(total);
        for p in parts {
            payload.extend_from_slice(p);
        }
        let chan = self.shared.chan(self.rank, dst);
        let cap = self.shared.limits.wire_capacity;
        let mut st = chan.lock();
        loop {
            if st.receiver_gone {
                return Err(PgError::PeerClosed { peer: dst });
            }
            if st.wire.is_empty() || st.wire_bytes.saturating_add(total) <= cap {
                break;
            }
            let (g, timed_out) = wait_until(&chan.cv, st, deadline);
            st = g;
            if timed_out && !(st.wire.is_empty() || st.wire_bytes.saturating_add(total) <= cap) {
                return Err(PgError::Timeout {
                    peer: dst,
                    tag,
                    after: timeout,
                });
            }
        }
        st.wire_bytes += total;
        st.wire.push_back((tag, payload));
        chan.cv.notify_all();
        Ok(())
    }

    fn recv_into(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        timeout: Duration,
    ) -> Result<(), PgError> {
        let mut dest = Dest::Parts(parts);
        let payload = self.recv_msg(src, tag, timeout, |len| dest.check(src, tag, len as u64))?;
        dest.deliver(payload);
        Ok(())
    }

    fn recv_vec(
        &self,
        src: u32,
        tag: u64,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, PgError> {
        let dest = Dest::Vec { max: max_len };
        self.recv_msg(src, tag, timeout, |len| dest.check(src, tag, len as u64))
    }

    fn forget_prefix(&self, src: u32, prefix: [u8; 8]) -> Result<(), PgError> {
        check_peer(src, self.rank, self.shared.size)?;
        let chan = self.shared.chan(src, self.rank);
        chan.lock().stash.forget(prefix);
        chan.cv.notify_all();
        Ok(())
    }
}

impl Drop for InProcessGroup {
    fn drop(&mut self) {
        for other in 0..self.shared.size {
            if other == self.rank {
                continue;
            }
            for (chan, outgoing) in [
                (self.shared.chan(self.rank, other), true),
                (self.shared.chan(other, self.rank), false),
            ] {
                let mut st = chan.lock();
                if outgoing {
                    st.sender_gone = true;
                } else {
                    st.receiver_gone = true;
                    // Nobody will read these any more.
                    st.wire.clear();
                    st.wire_bytes = 0;
                }
                chan.cv.notify_all();
            }
        }
    }
}

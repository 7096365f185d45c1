//! Process groups: ranked point-to-point messaging between the processes of one job.
//!
//! Two implementations of [`ProcessGroup`]:
//! - [`TcpProcessGroup`]: one authenticated TCP connection per pair of ranks, formed through an
//!   embedded rendezvous store hosted by rank 0 (torch-style `MASTER_ADDR`/`MASTER_PORT`/`RANK`/
//!   `WORLD_SIZE`, plus a shared job token `PGT_TOKEN`). See [`tcp`] for rendezvous, handshake and
//!   socket tuning; `TCP.md` at the repository root specifies all of it byte by byte, and
//!   [`conformance`] records the transcripts that pin it.
//! - [`InProcessGroup`]: all ranks in one process (threads), for tests and single-process use.
//! - `MpiProcessGroup` (feature `mpi`): the ranks of an MPI job (`mpirun`, `srun`); see `mpi`.
//!
//! # Messages and tags
//! A message is an opaque byte string with a `u64` tag. Messages from one peer are delivered in the
//! order they were sent. A receive names the tag it wants; if the next message from that peer has
//! another tag, it is set aside in a per-peer *stash* and reading goes on; a later receive of that
//! tag takes it from the stash (oldest first). The stash is bounded (default
//! [`DEFAULT_STASH_LIMIT`] bytes per peer): each frame is charged what it really costs — its
//! payload's allocation and its share of the stash's index, 96 bytes — so that no flood of frames,
//! however small, makes it hold more. A frame that would overflow it makes the receive fail with
//! [`PgError::UnexpectedBacklog`] and stays first in line.
//!
//! # Forgotten prefixes
//! A user of the group that knows that messages starting with some 8 bytes will never be wanted
//! says so with [`ProcessGroup::forget_prefix`]: pgt's `Transport` does, for the id of a transfer
//! whose receive failed (PROTOCOL.md §12, *Transfers cannot mix*). Such a message is not
//! stashed: when it arrives while nobody waits for its tag, it is read and dropped in bounded
//! chunks (TCP peeks at its first 8 payload bytes before reading any, so a message that is kept is
//! still first in line, untouched, when it does not fit the stash); frames already stashed are
//! dropped at once. A message somebody waits for is still handed to them whatever its prefix (the
//! waiter decides). So a failed transfer's late data, however large, cannot fill the stash and
//! block the next transfer's receives with [`PgError::UnexpectedBacklog`].
//!
//! A receive whose buffers do not fit the message ([`PgError::LengthMismatch`], or
//! [`PgError::TooLarge`] for [`ProcessGroup::recv_vec`]) fails **without consuming** the message.
//!
//! # Wire format (TCP)
//! After the handshake (see [`tcp`]), each direction of a connection is a plain sequence of frames:
//!
//! ```text
//! offset  size  field
//! 0       8     tag         u64 little-endian
//! 8       8     len         u64 little-endian, payload length in bytes (0 allowed)
//! 16      len   payload     the concatenation of the sender's parts
//! ```
//!
//! There is no padding, checksum or per-frame acknowledgement (TCP provides integrity against
//! accidents; the connection was authenticated once). Integrity of *contents* is the protocol
//! layer's business.
//!
//! # Concurrency contract
//! A group handle is `Send + Sync` and is meant to be shared (`Arc` or scoped threads):
//! - calls concerning **different peers** run fully in parallel (each peer has its own connection
//!   and locks) — e.g. one sender thread per destination plus a forwarding thread;
//! - a **send and a receive with the same peer** run concurrently (separate read and write halves);
//! - **concurrent sends to one peer** are serialized per message: each message goes out whole,
//!   never interleaved with another;
//! - **concurrent receives from one peer** are allowed: one thread reads the socket at a time; a
//!   frame whose tag another thread is waiting for is handed to that thread (read straight into its
//!   buffers) or stashed.
//!
//! # Timeouts
//! Every operation takes a timeout covering all of it, including waiting for locks held by other
//! threads. A stalled peer yields [`PgError::Timeout`] within the timeout plus a few milliseconds
//! (socket timeouts are re-armed with the remaining time before every system call). A receive that
//! times out leaves the connection usable: before the first byte of its message nothing is
//! consumed; part way through it the message is lost ([`PgError::TimeoutMidMessage`]) and the next
//! receive reads its rest and drops it (likewise a frame being stashed or dropped is finished by
//! the next receive). A send that times out part way, or an I/O error in the middle of a frame,
//! **poisons** the connection: it is shut down and every later operation on it fails with
//! [`PgError::Poisoned`] instead of misparsing the stream (frames already complete in the stash
//! are still delivered).

pub mod conformance;
mod error;
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing;
pub mod inproc;
#[cfg(feature = "mpi")]
pub mod mpi;
mod stash;
pub mod tcp;

mod accept;
mod auth;
mod conn;
mod rendezvous;
mod wire;

pub use std::time::Duration;

pub use error::PgError;
pub use inproc::InProcessGroup;
#[cfg(feature = "mpi")]
pub use mpi::MpiProcessGroup;
pub use stash::{DEFAULT_STASH_LIMIT, FORGOTTEN_PREFIXES};
#[cfg(feature = "testing")]
pub use tcp::raw_loopback_gbps;
pub use tcp::{TcpOptions, TcpProcessGroup, TcpTuning};
pub use wire::FRAME_HEADER_LEN;

/// Ranked point-to-point messaging; see the [module docs](self) for tags, ordering, the concurrency
/// contract and timeouts.
pub trait ProcessGroup: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> u32;

    /// Number of ranks in the group.
    fn size(&self) -> u32;

    /// Send one message: the concatenation of `parts`, with `tag`, to `dst`. Zero-copy, vectored
    /// writes (write_vectored / IoSlice), large messages streamed. Returns when fully handed to the
    /// OS.
    fn send(&self, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError>;

    /// Receive the message with `tag` from `src` directly into caller-owned `parts` (scatter). Its
    /// length must equal the sum of part lengths, else [`PgError::LengthMismatch`]. No intermediate
    /// copy of the payload when the message is next on the wire.
    fn recv_into(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        timeout: Duration,
    ) -> Result<(), PgError>;

    /// Receive a message of not-yet-known length (≤ `max_len`, else [`PgError::TooLarge`], without
    /// allocating it).
    fn recv_vec(
        &self,
        src: u32,
        tag: u64,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, PgError>;

    /// Declares that no receive will ever want a message from `src` whose payload starts with
    /// `prefix`: such messages are dropped from the stash at once, and from then on dropped as they
    /// arrive instead of being stashed — read and thrown away in bounded chunks (TCP: at most
    /// the tuning's `chunk_size` at a time), so they neither take memory nor count against the stash
    /// limit. See [Forgotten prefixes](self#forgotten-prefixes). The group remembers the last
    /// [`FORGOTTEN_PREFIXES`] prefixes per peer.
    ///
    /// The default does nothing: a group that does not implement it stashes such messages as any
    /// other.
    fn forget_prefix(&self, src: u32, prefix: [u8; 8]) -> Result<(), PgError> {
        let _ = (src, prefix);
        Ok(())
    }

    /// [`ProcessGroup::send`], showing `observe` every byte of `parts` once, in order, as
    /// `(part index, piece)`, before it is handed to the OS. A group that streams calls it with each
    /// system call's bytes (TCP: at most [`TcpTuning::chunk_size`]) right before that call, so that an
    /// observer which reads the bytes (a hasher) leaves them in cache for the kernel's copy. The
    /// default shows every part, then sends. After an error the observer may have seen any prefix of
    /// the message.
    fn send_observed(
        &self,
        dst: u32,
        tag: u64,
        parts: &[&[u8]],
        timeout: Duration,
        observe: &mut Observer<'_>,
    ) -> Result<(), PgError> {
        for (i, p) in parts.iter().enumerate() {
            if !p.is_empty() {
                observe(i, p);
            }
        }
        self.send(dst, tag, parts, timeout)
    }

    /// [`ProcessGroup::recv_into`], showing `observe` every byte of the message once, in order, as
    /// `(part index, piece)`, once it is in `parts`. A group that streams calls it piece by piece (at
    /// most [`OBSERVE_GRAIN`] bytes) right after the piece landed, on the receiving thread, while
    /// the piece is still in cache. The default receives, then shows every part. A receive that
    /// fails before the first payload byte (a length mismatch, a timeout) shows nothing; after an
    /// error in the middle the observer may have seen any prefix of the message.
    fn recv_into_observed(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        timeout: Duration,
        observe: &mut Observer<'_>,
    ) -> Result<(), PgError> {
        self.recv_into(src, tag, parts, timeout)?;
        for (i, p) in parts.iter().enumerate() {
            if !p.is_empty() {
                observe(i, p);
            }
        }
        Ok(())
    }
}

/// Sees a message's bytes as they move: `(part index, piece)`; see [`ProcessGroup::send_observed`]
/// and [`ProcessGroup::recv_into_observed`].
pub type Observer<'a> = dyn FnMut(usize, &[u8]) + 'a;

/// The largest piece a streaming group's receive shows an [`Observer`] at once: it fits in a core's
/// L2 cache (256 KiB on older Intel cores, 512 KiB–2 MiB on newer ones and on AMD's), so that the
/// observer reads the bytes the system call has just written from cache, not from DRAM.
pub const OBSERVE_GRAIN: usize = 256 << 10;

/// A shared or boxed group is a group: several `Transport`s (or other users) can share one, and a
/// program can pick the implementation at run time (`Box<dyn ProcessGroup>`).
macro_rules! forward_process_group {
    ($($ty:ty),*) => {$(
        impl<P: ProcessGroup + ?Sized> ProcessGroup for $ty {
            fn rank(&self) -> u32 {
                (**self).rank()
            }
            fn size(&self) -> u32 {
                (**self).size()
            }
            fn send(
                &self,
                dst: u32,
                tag: u64,
                parts: &[&[u8]],
                timeout: Duration,
            ) -> Result<(), PgError> {
                (**self).send(dst, tag, parts, timeout)
            }
            fn recv_into(
                &self,
                src: u32,
                tag: u64,
                parts: &mut [&mut [u8]],
                timeout: Duration,
            ) -> Result<(), PgError> {
                (**self).recv_into(src, tag, parts, timeout)
            }
            fn recv_vec(
                &self,
                src: u32,
                tag: u64,
                max_len: usize,
                timeout: Duration,
            ) -> Result<Vec<u8>, PgError> {
                (**self).recv_vec(src, tag, max_len, timeout)
            }
            fn forget_prefix(&self, src: u32, prefix: [u8; 8]) -> Result<(), PgError> {
                (**self).forget_prefix(src, prefix)
            }
            fn send_observed(
                &self,
                dst: u32,
                tag: u64,
                parts: &[&[u8]],
                timeout: Duration,
                observe: &mut Observer<'_>,
            ) -> Result<(), PgError> {
                (**self).send_observed(dst, tag, parts, timeout, observe)
            }
            fn recv_into_observed(
                &self,
                src: u32,
                tag: u64,
                parts: &mut [&mut [u8]],
                timeout: Duration,
                observe: &mut Observer<'_>,
            ) -> Result<(), PgError> {
                (**self).recv_into_observed(src, tag, parts, timeout, observe)
            }
        }
    )*};
}
forward_process_group!(&P, Box<P>, std::sync::Arc<P>);

/// Wait on `cv` until `deadline`; returns the guard and whether the deadline has passed.
pub(crate) fn wait_until<'a, T>(
    cv: &std::sync::Condvar,
    guard: std::sync::MutexGuard<'a, T>,
    deadline: std::time::Instant,
) -> (std::sync::MutexGuard<'a, T>, bool) {
    let now = std::time::Instant::now();
    if now >= deadline {
        return (guard, true);
    }
    let (g, _) = cv
        .wait_timeout(guard, deadline - now)
        .unwrap_or_else(|e| e.into_inner());
    (g, std::time::Instant::now() >= deadline)
}

/// Check that `peer` is another rank of a group of `size` with own rank `own`.
pub(crate) fn check_peer(peer: u32, own: u32, size: u32) -> Result<(), PgError> {
    if peer >= size || peer == own {
        Err(PgError::InvalidRank {
            rank: peer,
            size,
            own,
        })
    } else {
        Ok(())
    }
}

/// Where a received payload goes.
pub(crate) enum Dest<'a, 'b> {
    Parts(&'a mut [&'b mut [u8]]),
    Vec { max: usize },
}

impl Dest<'_, '_> {
    /// Whether a message of `len` bytes fits; the error leaves it queued.
    pub(crate) fn check(&self, peer: u32, tag: u64, len: u64) -> Result<(), PgError> {
        match self {
            Dest::Parts(parts) => {
                let expected = total_len(parts);
                if len == expected {
                    Ok(())
                } else {
                    Err(PgError::LengthMismatch {
                        peer,
                        tag,
                        expected,
                        got: len,
                    })
                }
            }
            Dest::Vec { max } => {
                if len <= *max as u64 {
                    Ok(())
                } else {
                    Err(PgError::TooLarge {
                        peer,
                        tag,
                        max: *max as u64,
                        got: len,
                    })
                }
            }
        }
    }

    /// Deliver a stashed payload.
    pub(crate) fn deliver(&mut self, payload: Vec<u8>) -> Option<Vec<u8>> {
        match self {
            Dest::Parts(parts) => {
                scatter(&payload, parts);
                None
            }
            Dest::Vec { .. } => Some(payload),
        }
    }
}

/// Sum of part lengths as u64.
pub(crate) fn total_len<T: AsRef<[u8]>>(parts: &[T]) -> u64 {
    parts.iter().map(|p| p.as_ref().len() as u64).sum()
}

/// Copy `src` (whose length equals the parts' total) into `parts` in order.
pub(crate) fn scatter(src: &[u8], parts: &mut [&mut [u8]]) {
    let mut off = 0;
    for p in parts.iter_mut() {
        let n = p.len();
        p.copy_from_slice(&src[off..off + n]);
        off += n;
    }
    debug_assert_eq!(off, src.len());
}

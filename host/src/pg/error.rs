//! The one error type of the process-group layer.

use std::io;
use std::time::Duration;

/// Everything a [`ProcessGroup`](super::ProcessGroup) operation or group setup can fail with.
///
/// `peer` is always the *other* rank of the operation (the destination of a send, the source of a
/// receive). Errors are `Clone` so a caller can fan one failure out to several waiters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The operation did not complete within its timeout. Nothing of the message was consumed
    /// (a receive) and the operation may be retried; a send that timed out part way poisons the
    /// connection ([`PgError::Poisoned`] afterwards), as the peer cannot find where its frame ends.
    #[error("timed out after {after:?} on tag {tag} with rank {peer}")]
    Timeout {
        peer: u32,
        tag: u64,
        after: Duration,
    },

    /// A receive timed out part way through its message, `received` of `len` bytes in: the
    /// message is lost (the next receive from `peer` reads its rest and drops it), the connection
    /// stays usable. In-place buffers may hold some of its bytes.
    #[error(
        "timed out after {after:?} on tag {tag} with rank {peer}, {received} of the message's \
         {len} bytes in: the message is dropped"
    )]
    TimeoutMidMessage {
        peer: u32,
        tag: u64,
        after: Duration,
        received: u64,
        len: u64,
    },

    /// The peer closed its end (or its handle was dropped) before the message was complete.
    #[error("rank {peer} closed the connection")]
    PeerClosed { peer: u32 },

    /// The next message with `tag` from `peer` has a length other than the receive buffers'.
    /// The message is **not** consumed: it stays queued for a later receive of that tag.
    #[error("message with tag {tag} from rank {peer} has {got} bytes, expected {expected}")]
    LengthMismatch {
        peer: u32,
        tag: u64,
        expected: u64,
        got: u64,
    },

    /// [`recv_vec`](super::ProcessGroup::recv_vec) found a message longer than `max`. Nothing was
    /// allocated and the message is **not** consumed.
    #[error(
        "message with tag {tag} from rank {peer} has {got} bytes, more than the limit of {max}"
    )]
    TooLarge {
        peer: u32,
        tag: u64,
        max: u64,
        got: u64,
    },

    /// Receiving `wanted` required setting aside an earlier frame (tag `blocking_tag`, `len` bytes)
    /// but the per-peer stash of set-aside frames would exceed its limit. The frame stays first in
    /// line; a receive of `blocking_tag` still gets it.
    #[error(
        "receiving tag {wanted} from rank {peer}: frame with tag {blocking_tag} ({len} bytes) \
         does not fit the stash ({stashed} of {limit} bytes used)"
    )]
    UnexpectedBacklog {
        peer: u32,
        wanted: u64,
        blocking_tag: u64,
        len: u64,
        stashed: u64,
        limit: u64,
    },

    /// The connection to `peer` failed earlier in the middle of a frame (a send's timeout, an I/O
    /// error);
    /// the byte stream can no longer be parsed, so every later operation on it fails with this.
    #[error(
        "connection to rank {peer} is unusable after an earlier failure in the middle of a frame"
    )]
    Poisoned { peer: u32 },

    /// Authentication of a connection failed (wrong job token, or the other side is not a pgt
    /// rank / store).
    #[error("authentication with {addr} failed: {reason}")]
    AuthFailed { addr: String, reason: String },

    /// Group formation failed (store unreachable, rank registered twice, world size mismatch, ...).
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),

    /// Bad options or environment (`MASTER_ADDR`, `RANK`, empty token, ...).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// `rank` is not a valid peer: out of range, or this process's own rank.
    #[error("rank {rank} is not a peer of this group (world size {size}, own rank {own})")]
    InvalidRank { rank: u32, size: u32, own: u32 },

    /// Any other I/O error, with the peer rank when it concerns an established connection.
    #[error("I/O error{}: {message} ({kind:?})", fmt_peer(.peer))]
    Io {
        peer: Option<u32>,
        kind: io::ErrorKind,
        message: String,
    },
}

fn fmt_peer(peer: &Option<u32>) -> String {
    match peer {
        Some(p) => format!(" with rank {p}"),
        None => String::new(),
    }
}

impl PgError {
    /// Wrap an I/O error, keeping its kind and message.
    pub fn io(peer: Option<u32>, err: &io::Error) -> Self {
        PgError::Io {
            peer,
            kind: err.kind(),
            message: err.to_string(),
        }
    }

    /// True for [`PgError::Timeout`] and [`PgError::TimeoutMidMessage`].
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            PgError::Timeout { .. } | PgError::TimeoutMidMessage { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_rank_and_tag() {
        let e = PgError::Timeout {
            peer: 3,
            tag: 17,
            after: Duration::from_millis(300),
        };
        assert_eq!(e.to_string(), "timed out after 300ms on tag 17 with rank 3");
        let e = PgError::io(Some(2), &io::Error::other("boom"));
        assert_eq!(e.to_string(), "I/O error with rank 2: boom (Other)");
        let e = PgError::io(None, &io::Error::other("boom"));
        assert_eq!(e.to_string(), "I/O error: boom (Other)");
    }
}

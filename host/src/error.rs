//! The error type of pgt-host's library API.
//!
//! One enum, so that a caller can tell a digest mismatch ([`Error::Protocol`]) from a stalled peer
//! ([`Error::ProcessGroup`] or [`Error::Timeout`]) with a `match` instead of a downcast.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::engine::EngineError;
use crate::pg::PgError;

/// What a transfer was doing with a peer when the process group failed ([`Error::Peer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerAction {
    /// Sending a message to a destination.
    Sending,
    /// Receiving a data message from the upstream rank.
    Receiving,
    /// Forwarding a message to the next rank of a chain.
    Forwarding,
}

impl std::fmt::Display for PeerAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerAction::Sending => "sending",
            PeerAction::Receiving => "receiving",
            PeerAction::Forwarding => "forwarding",
        })
    }
}

/// Receive memory refusing a write is a bug in pgt-host: the plan's ranges never overlap.
impl From<crate::memory::ClaimError> for Error {
    fn from(e: crate::memory::ClaimError) -> Error {
        Error::internal(e.to_string())
    }
}

/// A protocol error as [`Error::Protocol`], whichever engine reported it, so callers match it the same
/// way with either engine.
impl From<EngineError> for Error {
    fn from(e: EngineError) -> Error {
        match e {
            EngineError::Protocol(p) => Error::Protocol(p),
            other => Error::Engine(other),
        }
    }
}

/// Everything the library's operations can fail with.
///
/// A variant that wraps a lower-level error returns it from [`std::error::Error::source`] and does
/// not repeat it in its own message: walk the `source()` chain to see both (the CLI prints it as
/// one line).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// pgt-core refused something: malformed or hostile metadata, an invalid layout or spec, a
    /// protocol step out of order, an in-place mismatch, a digest mismatch.
    #[error(transparent)]
    Protocol(#[from] pgt_core::Error),

    /// A process-group operation failed; the [`PgError`] names the peer rank where there is one.
    #[error(transparent)]
    ProcessGroup(#[from] PgError),

    /// A file or OS operation failed; `context` says which (and on what path).
    #[error("{context}")]
    Io {
        /// What was being done, e.g. `cannot open model.safetensors`.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A state dict that cannot be built, received into or written as asked. `path` is the key
    /// path (dotted) of the leaf concerned, empty when the problem is not at one leaf (a tensor
    /// built on its own, the tree's structure).
    #[error("{}", with_path(path, reason))]
    StateDict {
        /// The leaf's key path, or empty.
        path: String,
        /// What is wrong.
        reason: String,
    },

    /// A file that is not a safetensors file pgt can read, or one that could not be written.
    #[error("{}: {reason}", file.display())]
    Safetensors {
        /// The file.
        file: PathBuf,
        /// What is wrong (the `safetensors` crate's message included).
        reason: String,
    },

    /// The protocol engine failed other than by refusing the protocol: the wasm sandbox (fuel, memory,
    /// a trap) or the module itself (could not be loaded, misbehaved).
    #[error(transparent)]
    Engine(EngineError),

    /// Sending or forwarding a message, or receiving a data message, failed at the process group;
    /// the [`PgError`] says why and names the peer.
    #[error("{action} message {message} {} rank {rank}", if *.action == PeerAction::Receiving { "from" } else { "to" })]
    Peer {
        /// What was being done.
        action: PeerAction,
        /// The message's index in the plan.
        message: u32,
        /// The other rank.
        rank: u32,
        /// The process group's error.
        #[source]
        source: PgError,
    },

    /// A bug in pgt-host (an invariant of its own that did not hold); please report it.
    #[error("pgt-host bug: {what}")]
    Internal {
        /// What went wrong.
        what: String,
    },

    /// A transfer waited longer than its timeout for something other than a process-group
    /// operation (those fail with [`PgError::Timeout`]).
    #[error("timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// What did not arrive, e.g. `storage digests`.
        waiting_for: String,
        /// The timeout.
        after: Duration,
    },

    /// A transfer with this rank is already running on this [`crate::transport::Transport`] in this
    /// direction (a receive from it, or a send or chain forward to it). Transfers between one pair of
    /// ranks use the same tags, so they run one at a time: the second is refused at once instead of
    /// letting the two take each other's messages (PROTOCOL.md §12).
    #[error(
        "a transfer {} rank {rank} is already running on this Transport: transfers between two ranks run one at a time",
        if *.action == PeerAction::Receiving { "from" } else { "to" }
    )]
    ConcurrentTransfer {
        /// What this transfer would do with the rank.
        action: PeerAction,
        /// The other rank.
        rank: u32,
    },

    /// A send reached some destinations but not all (PROTOCOL.md §3, *When a destination fails*):
    /// a destination whose send failed stopped only its own stream, and the others ran to the end.
    /// The message names every failed destination with its error (there may be several, so they
    /// are part of the message rather than one [`std::error::Error::source`]). A send whose every
    /// destination failed is not this: it fails with the first failure's own error at once.
    #[error("{}", destinations_message(completed, failed, cut_off))]
    Destinations {
        /// Destinations that were sent everything the sender sends them: the whole checkpoint in
        /// Direct fan-out; in Chain fan-out the header and metadata (and for the first destination
        /// the data and trailer too), the rest reaching them over the chain, which the sender does
        /// not see (each receiver reports its own result).
        completed: Vec<u32>,
        /// Each destination whose send failed, with why, in the order they failed.
        failed: Vec<(u32, Error)>,
        /// Chain fan-out: the destinations downstream of a failed one. Their data would have come
        /// through it, so their receives fail too, naming the broken link.
        cut_off: Vec<u32>,
    },

    // ---- added by hostile branch ----
    /// A safetensors file [`crate::safetensors_io::save`] does not write because the `safetensors`
    /// library would refuse to load it: its header (names, shapes, `__metadata__` strings) would be
    /// longer than [`crate::safetensors_io::SAFETENSORS_MAX_HEADER`].
    #[error(
        "{}: the safetensors header would be {bytes} bytes, more than the {max} the safetensors library loads (plain values and names go in the header)",
        file.display()
    )]
    SafetensorsHeaderTooLarge {
        /// The file not written.
        file: PathBuf,
        /// Bytes of the header, padded to 8 as the writer does.
        bytes: u64,
        /// The library's limit.
        max: u64,
    },

    // ---- added by budget branch ----
    /// A receive would take more memory than the receiver's budget
    /// ([`crate::transport::TransportOptions::memory_budget`]): the metadata's decoded size plus
    /// the fresh buffers (and cast staging) of every storage it announces, checked before any of it
    /// is allocated.
    #[error(
        "receiving needs {needed} bytes of memory (the metadata decoded and the announced storages), more than the receiver's memory budget of {budget} bytes"
    )]
    MemoryBudget {
        /// Bytes the receive needs.
        needed: u64,
        /// The budget.
        budget: u64,
    },

    // ---- added by recvsem branch ----
    /// An in-place receive found a tensor at a received key path whose storage it cannot write:
    /// borrowed bytes (`&[u8]`) or shared ones (an `Arc`, e.g. a memory-mapped safetensors file).
    /// Refused rather than silently received into a fresh buffer the caller would not see; give
    /// that leaf a writable storage ([`crate::state_dict::Storage::Owned`] or
    /// [`crate::state_dict::Storage::BorrowedMut`]) or leave it out of the target. The transfer is
    /// drained (PROTOCOL.md §12), so the next receive from the rank starts clean.
    #[error(
        "{path}: cannot receive in place into a read-only storage ({storage}): give it a writable storage (Owned or BorrowedMut) or leave it out of the in-place state dict"
    )]
    InPlaceReadOnly {
        /// The leaf's key path, displayed.
        path: String,
        /// The storage's kind: `Borrowed` or `Shared`.
        storage: &'static str,
    },

    // ---- added by staged branch ----
    /// An in-place receive failed after it had written into some of its in-place targets
    /// (unstaged, the default; a staged receive, [`crate::transport::RecvOptions::staged`], leaves
    /// them untouched and fails with the cause alone). The cause is the
    /// [`std::error::Error::source`] ([`Error::cause`]); the message names the leaves.
    ///
    /// Written means landed, not verified: digests are compared at the trailer, so on a digest
    /// mismatch every leaf is usually written, the wrong bytes included.
    #[error("{}", in_place_message(written, partly))]
    InPlaceWritten {
        /// Key paths (displayed) of the in-place leaves whose new bytes all landed in their targets.
        written: Vec<String>,
        /// Key paths of the in-place leaves that may hold some new bytes (a message carrying a part
        /// of them was being received): partly written. Every other in-place leaf is untouched.
        partly: Vec<String>,
        /// Why the receive failed.
        #[source]
        source: Box<Error>,
    },
}

/// At most this many key paths in [`Error::InPlaceWritten`]'s message (all of them are in its fields).
const SHOWN_PATHS: usize = 8;

fn path_list(paths: &[String]) -> String {
    let mut s = paths
        .iter()
        .take(SHOWN_PATHS)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if paths.len() > SHOWN_PATHS {
        s.push_str(&format!(" and {} more", paths.len() - SHOWN_PATHS));
    }
    s
}

fn in_place_message(written: &[String], partly: &[String]) -> String {
    let mut s = format!(
        "the in-place receive failed after writing {} leaf(s) fully",
        written.len()
    );
    if !written.is_empty() {
        s.push_str(&format!(" ({})", path_list(written)));
    }
    if !partly.is_empty() {
        s.push_str(&format!(
            " and {} partly ({})",
            partly.len(),
            path_list(partly)
        ));
    }
    s.push_str("; every other in-place leaf is untouched");
    s
}

fn rank_list(ranks: impl IntoIterator<Item = u32>) -> String {
    ranks
        .into_iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// An error and its sources, outermost first, on one line (as the CLI prints errors).
pub(crate) fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn destinations_message(completed: &[u32], failed: &[(u32, Error)], cut_off: &[u32]) -> String {
    let mut s = format!(
        "the checkpoint was sent to rank(s) {} but not to rank(s) {}",
        if completed.is_empty() {
            "none".to_string()
        } else {
            rank_list(completed.iter().copied())
        },
        rank_list(
            failed
                .iter()
                .map(|(r, _)| *r)
                .chain(cut_off.iter().copied())
        )
    );
    for (rank, e) in failed {
        s.push_str(&format!("; rank {rank} failed: {}", with_sources(e)));
    }
    if !cut_off.is_empty() {
        s.push_str(&format!(
            "; rank(s) {} cut off: downstream of a failed rank in the chain",
            rank_list(cut_off.iter().copied())
        ));
    }
    s
}

fn with_path(path: &str, reason: &str) -> String {
    if path.is_empty() {
        reason.to_string()
    } else {
        format!("{path}: {reason}")
    }
}

impl Error {
    /// An [`Error::Io`]: `source` while doing what `context` says.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An [`Error::StateDict`] at key path `path` (empty: not at one leaf).
    pub fn state_dict(path: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::StateDict {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Safetensors`] about `file`.
    pub fn safetensors(file: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Safetensors {
            file: file.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Internal`].
    pub fn internal(what: impl Into<String>) -> Error {
        Error::Internal { what: what.into() }
    }

    /// Why the operation failed: the error an [`Error::InPlaceWritten`] wraps, else this one. Match
    /// on it to tell failures apart whether or not an in-place receive had written.
    pub fn cause(&self) -> &Error {
        match self {
            Error::InPlaceWritten { source, .. } => source.cause(),
            e => e,
        }
    }

    /// The in-place leaves (key paths, displayed) a failed in-place receive had fully written
    /// ([`Error::InPlaceWritten`]); empty for any other error.
    pub fn written_leaves(&self) -> &[String] {
        match self {
            Error::InPlaceWritten { written, .. } => written,
            _ => &[],
        }
    }

    /// The in-place leaves a failed in-place receive may have partly written
    /// ([`Error::InPlaceWritten`]); empty for any other error.
    pub fn partly_written_leaves(&self) -> &[String] {
        match self {
            Error::InPlaceWritten { partly, .. } => partly,
            _ => &[],
        }
    }

    /// True for a timeout, of a process-group operation or of the transfer itself: the peer
    /// stalled, and nothing says the data was bad.
    pub fn is_timeout(&self) -> bool {
        match self.cause() {
            Error::ProcessGroup(e) | Error::Peer { source: e, .. } => e.is_timeout(),
            Error::Timeout { .. } => true,
            _ => false,
        }
    }
}

/// A `Result` with [`Error`] as its default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn messages_and_sources() {
        let e = Error::io("cannot open m.safetensors", io::Error::other("boom"));
        assert_eq!(e.to_string(), "cannot open m.safetensors");
        assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("boom"));

        assert_eq!(
            Error::state_dict("a.b", "storage has 3 bytes").to_string(),
            "a.b: storage has 3 bytes"
        );
        assert_eq!(
            Error::state_dict("", "malformed tree").to_string(),
            "malformed tree"
        );
        assert_eq!(
            Error::safetensors("m.safetensors", "not a safetensors file").to_string(),
            "m.safetensors: not a safetensors file"
        );

        // The wrapped errors speak for themselves.
        let core = pgt_core::Error::MetadataDigest;
        assert_eq!(Error::from(core.clone()).to_string(), core.to_string());
        let pg = PgError::PeerClosed { peer: 2 };
        assert_eq!(Error::from(pg.clone()).to_string(), pg.to_string());
    }

    #[test]
    fn in_place_written_wraps_its_cause() {
        let paths = |n: usize| (0..n).map(|i| format!("['w{i}']")).collect::<Vec<_>>();
        let e = Error::InPlaceWritten {
            written: paths(10),
            partly: vec!["['x']".into()],
            source: Box::new(Error::from(PgError::Timeout {
                peer: 0,
                tag: 5,
                after: Duration::from_secs(1),
            })),
        };
        assert_eq!(e.written_leaves().len(), 10);
        assert_eq!(e.partly_written_leaves(), ["['x']"]);
        assert!(matches!(
            e.cause(),
            Error::ProcessGroup(PgError::Timeout { .. })
        ));
        assert!(e.is_timeout(), "the cause's timeout shows through");
        let message = e.to_string();
        assert!(
            message.starts_with(
                "the in-place receive failed after writing 10 leaf(s) fully (['w0'], "
            ),
            "{message}"
        );
        assert!(
            message.contains("['w7'] and 2 more) and 1 partly (['x'])"),
            "{message}"
        );
        assert!(!message.contains("['w8']"), "at most 8 paths: {message}");
        // The cause is the source, printed after the message by the CLI.
        assert!(with_sources(&e).ends_with(
            &PgError::Timeout {
                peer: 0,
                tag: 5,
                after: Duration::from_secs(1)
            }
            .to_string()
        ));
        // Any other error has no leaves and is its own cause.
        let plain = Error::from(pgt_core::Error::MetadataDigest);
        assert!(plain.written_leaves().is_empty() && plain.partly_written_leaves().is_empty());
        assert!(matches!(plain.cause(), Error::Protocol(_)));
    }

    #[test]
    fn timeouts_are_told_apart_without_downcasting() {
        let pg = Error::from(PgError::Timeout {
            peer: 1,
            tag: 7,
            after: Duration::from_secs(1),
        });
        assert!(pg.is_timeout());
        assert!(matches!(
            pg,
            Error::ProcessGroup(PgError::Timeout { peer: 1, .. })
        ));
        let waiting = Error::Timeout {
            waiting_for: "storage digests".into(),
            after: Duration::from_secs(2),
        };
        assert!(waiting.is_timeout());
        assert_eq!(
            waiting.to_string(),
            "timed out after 2s waiting for storage digests"
        );
        let digest = Error::from(pgt_core::Error::MetadataDigest);
        assert!(!digest.is_timeout());
        assert!(matches!(
            digest,
            Error::Protocol(pgt_core::Error::MetadataDigest)
        ));
        // Boxable behind `?` by callers that collect errors (the CLI, examples, tests).
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
    }
}

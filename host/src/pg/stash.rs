//! Bounded per-peer store of frames that arrived before anyone asked for their tag.

use std::collections::{HashMap, VecDeque};

/// Bytes charged per stashed frame on top of its payload, so that a flood of zero-length frames is
/// bounded too.
pub(crate) const FRAME_OVERHEAD: usize = 64;

/// Default cap on stashed (out-of-order) bytes per peer; see [the module docs](super#messages-and-tags).
pub const DEFAULT_STASH_LIMIT: usize = 256 << 20;

/// Frames set aside per tag, FIFO within a tag, with a cap on the bytes held.
pub(crate) struct Stash {
    frames: HashMap<u64, VecDeque<Vec<u8>>>,
    bytes: usize,
    limit: usize,
}

impl std::fmt::Debug for Stash {
    /// A summary: payloads can be huge.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stash")
            .field(
                "frames",
                &self.frames.values().map(VecDeque::len).sum::<usize>(),
            )
            .field("bytes", &self.bytes)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Stash {
    pub(crate) fn new(limit: usize) -> Self {
        Stash {
            frames: HashMap::new(),
            bytes: 0,
            limit,
        }
    }

    /// Length of the oldest stashed frame with `tag`.
    pub(crate) fn peek_len(&self, tag: u64) -> Option<usize> {
        self.frames.get(&tag).and_then(|q| q.front()).map(Vec::len)
    }

    /// Remove and return the oldest stashed frame with `tag`.
    pub(crate) fn take(&mut self, tag: u64) -> Option<Vec<u8>> {
        let q = self.frames.get_mut(&tag)?;
        let v = q.pop_front()?;
        if q.is_empty() {
            self.frames.remove(&tag);
        }
        self.bytes -= v.len() + FRAME_OVERHEAD;
        Some(v)
    }

    /// Whether a frame of `len` payload bytes may still be stashed.
    pub(crate) fn fits(&self, len: u64) -> bool {
        let room = self.limit.saturating_sub(self.bytes) as u64;
        len.saturating_add(FRAME_OVERHEAD as u64) <= room
    }

    /// Stash a frame; the caller checked [`fits`](Self::fits).
    pub(crate) fn push(&mut self, tag: u64, payload: Vec<u8>) {
        self.bytes += payload.len() + FRAME_OVERHEAD;
        self.frames.entry(tag).or_default().push_back(payload);
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_per_tag_and_accounting() {
        let mut s = Stash::new(1000);
        assert!(s.fits(500));
        s.push(1, vec![1; 10]);
        s.push(2, vec![2; 20]);
        s.push(1, vec![3; 30]);
        assert_eq!(s.bytes(), 60 + 3 * FRAME_OVERHEAD);
        assert_eq!(s.peek_len(1), Some(10));
        assert_eq!(s.take(1).unwrap(), vec![1; 10]);
        assert_eq!(s.take(1).unwrap(), vec![3; 30]);
        assert_eq!(s.take(1), None);
        assert_eq!(s.take(2).unwrap().len(), 20);
        assert_eq!(s.bytes(), 0);
        assert!(!s.fits(1000));
        assert!(s.fits(1000 - FRAME_OVERHEAD as u64));
        assert!(!s.fits(u64::MAX));
    }
}

//! Bounded per-peer store of frames that arrived before anyone asked for their tag.
//!
//! # What a frame costs
//! The limit bounds the memory the stash really holds, not just the payload bytes: a peer can send
//! millions of empty frames with distinct tags, and what each one costs is then all index. Each frame
//! is charged [`frame_cost`]: its payload's allocation (rounded up as the allocator does) plus
//! [`FRAME_OVERHEAD`], an upper bound of its share of the index, measured.
//!
//! The index is a `BTreeMap` from tag to a [`Queue`]: one boxed payload for a tag that has one frame
//! (the common case, 16 bytes in the map), a boxed `VecDeque` once a tag has more. A B-tree frees its
//! nodes as entries go and has no rehash peak (a `HashMap` holds old and new table at once while it
//! grows, and never shrinks). Measured with glibc's malloc (the allocations' real sizes), bytes per
//! empty frame, 2M frames (the peak includes a growing table's old and new copies):
//!
//! | frames | before: `HashMap<u64, VecDeque<Vec<u8>>>`, charged 64 | this index, charged 96 |
//! |---|---|---|
//! | distinct tags, ascending | 198, peak 232 | 50 |
//! | distinct tags, random | 198, peak 232 | 38 |
//! | two per tag | 97 | 73 |
//! | one tag | 25 | 17 |
//!
//! The worst pattern (two frames per tag: a node entry, the boxed deque and its first buffer of two)
//! stays under the 96 bytes charged; `host/tests/pg/stash_cost.rs` checks it over a real connection
//! with an allocation counter.

use std::collections::{BTreeMap, VecDeque};

/// Bytes charged per stashed frame on top of its payload's allocation: an upper bound of its share of
/// the index (see the [module docs](self)).
pub(crate) const FRAME_OVERHEAD: usize = 96;

/// Default cap on what the stash may hold per peer (`frame_cost` summed); see
/// [the module docs](super#messages-and-tags). pgt's own transfers receive every message in the
/// order it is sent and stash nothing; the stash only ever holds a peer's extra or misordered frames.
pub const DEFAULT_STASH_LIMIT: usize = 64 << 20;

/// What holding a payload of `len` bytes costs the allocator, at most: glibc's malloc gives a chunk of
/// `len + 8` bytes rounded up to 16 (32 at least), and from 128 KiB on whole pages (plus a 16-byte
/// header). Zero for an empty payload (no allocation).
pub(crate) fn payload_cost(len: u64) -> u64 {
    match len {
        0 => 0,
        l if l < 128 << 10 => (l + 8).next_multiple_of(16).max(32),
        l => l
            .checked_add(16)
            .and_then(|l| l.checked_next_multiple_of(4096))
            .unwrap_or(u64::MAX),
    }
}

/// What a stashed frame of `len` payload bytes is charged against the limit.
pub(crate) fn frame_cost(len: u64) -> u64 {
    payload_cost(len).saturating_add(FRAME_OVERHEAD as u64)
}

/// The frames of one tag, oldest first. The deque is boxed so that the map's entries stay 16
/// bytes: most tags hold one frame.
#[allow(clippy::box_collection)]
enum Queue {
    One(Box<[u8]>),
    Many(Box<VecDeque<Box<[u8]>>>),
}

/// How many forgotten prefixes a stash remembers (`Stash::forget`): the most recent ones. A
/// prefix pushed out only means that its late frames, should any still come, are stashed again as
/// before.
pub const FORGOTTEN_PREFIXES: usize = 64;

/// Frames set aside per tag, FIFO within a tag, with a cap on the memory held.
pub(crate) struct Stash {
    frames: BTreeMap<u64, Queue>,
    count: usize,
    bytes: usize,
    limit: usize,
    /// Payload prefixes no receive will ever want ([`super::ProcessGroup::forget_prefix`]), most
    /// recent last.
    forgotten: VecDeque<[u8; 8]>,
}

impl std::fmt::Debug for Stash {
    /// A summary: payloads can be huge.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stash")
            .field("frames", &self.count)
            .field("bytes", &self.bytes)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Stash {
    pub(crate) fn new(limit: usize) -> Self {
        Stash {
            frames: BTreeMap::new(),
            count: 0,
            bytes: 0,
            limit,
            forgotten: VecDeque::new(),
        }
    }

    /// Forgets `prefix`: drops every stashed frame whose payload starts with it, and remembers it
    /// (the last [`FORGOTTEN_PREFIXES`]) so that [`is_forgotten`](Self::is_forgotten) tells the
    /// group to drop such frames instead of stashing them. Returns the number of frames dropped.
    pub(crate) fn forget(&mut self, prefix: [u8; 8]) -> usize {
        if !self.forgotten.contains(&prefix) {
            if self.forgotten.len() == FORGOTTEN_PREFIXES {
                self.forgotten.pop_front();
            }
            self.forgotten.push_back(prefix);
        }
        let dead = |p: &[u8]| p.starts_with(&prefix);
        let mut dropped: Vec<usize> = Vec::new();
        self.frames.retain(|_, q| match q {
            Queue::One(p) => {
                if dead(p) {
                    dropped.push(p.len());
                    false
                } else {
                    true
                }
            }
            Queue::Many(q) => {
                q.retain(|p| {
                    let keep = !dead(p);
                    if !keep {
                        dropped.push(p.len());
                    }
                    keep
                });
                !q.is_empty()
            }
        });
        for len in &dropped {
            self.count -= 1;
            self.bytes -= frame_cost(*len as u64) as usize;
        }
        dropped.len()
    }

    /// Whether any prefix is forgotten (only then is a frame's prefix worth looking at).
    pub(crate) fn forgets_any(&self) -> bool {
        !self.forgotten.is_empty()
    }

    /// Whether a frame whose payload starts with `head` is of a forgotten prefix (a payload shorter
    /// than 8 bytes has none).
    pub(crate) fn is_forgotten(&self, head: &[u8]) -> bool {
        head.get(..8)
            .is_some_and(|h| self.forgotten.iter().any(|p| p[..] == *h))
    }

    /// Length of the oldest stashed frame with `tag`.
    pub(crate) fn peek_len(&self, tag: u64) -> Option<usize> {
        match self.frames.get(&tag)? {
            Queue::One(p) => Some(p.len()),
            Queue::Many(q) => q.front().map(|p| p.len()),
        }
    }

    /// Remove and return the oldest stashed frame with `tag`.
    pub(crate) fn take(&mut self, tag: u64) -> Option<Vec<u8>> {
        let v = match self.frames.get_mut(&tag)? {
            Queue::One(_) => match self.frames.remove(&tag) {
                Some(Queue::One(p)) => p,
                _ => unreachable!("just seen"),
            },
            Queue::Many(q) => {
                let p = q.pop_front().expect("a queue in the map is never empty");
                if q.is_empty() {
                    self.frames.remove(&tag);
                }
                p
            }
        };
        self.count -= 1;
        self.bytes -= frame_cost(v.len() as u64) as usize;
        Some(v.into_vec())
    }

    /// Whether a frame of `len` payload bytes may still be stashed.
    pub(crate) fn fits(&self, len: u64) -> bool {
        let room = self.limit.saturating_sub(self.bytes) as u64;
        frame_cost(len) <= room
    }

    /// Stash a frame; the caller checked [`fits`](Self::fits).
    pub(crate) fn push(&mut self, tag: u64, payload: Vec<u8>) {
        let payload = payload.into_boxed_slice();
        self.bytes += frame_cost(payload.len() as u64) as usize;
        self.count += 1;
        match self.frames.get_mut(&tag) {
            None => {
                self.frames.insert(tag, Queue::One(payload));
            }
            Some(Queue::Many(q)) => q.push_back(payload),
            Some(slot @ Queue::One(_)) => {
                let mut q = Box::new(VecDeque::with_capacity(2));
                if let Queue::One(first) = std::mem::replace(slot, Queue::One(Box::default())) {
                    q.push_back(first);
                }
                q.push_back(payload);
                *slot = Queue::Many(q);
            }
        }
    }

    /// What the stashed frames are charged ([`frame_cost`] summed).
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
        s.push(1, vec![]);
        assert_eq!(
            s.bytes() as u64,
            frame_cost(10) + frame_cost(20) + frame_cost(30) + frame_cost(0)
        );
        assert_eq!(s.peek_len(1), Some(10));
        assert_eq!(s.take(1).unwrap(), vec![1; 10]);
        assert_eq!(s.take(1).unwrap(), vec![3; 30]);
        assert_eq!(s.take(1).unwrap(), Vec::<u8>::new());
        assert_eq!(s.take(1), None);
        assert_eq!(s.take(2).unwrap().len(), 20);
        assert_eq!(s.bytes(), 0);
        assert_eq!(
            format!("{s:?}"),
            "Stash { frames: 0, bytes: 0, limit: 1000 }"
        );
        assert!(!s.fits(1000));
        assert!(s.fits(800));
        assert!(!s.fits(1000 - FRAME_OVERHEAD as u64));
        assert!(!s.fits(u64::MAX));
    }

    #[test]
    fn forgetting_a_prefix_drops_its_frames_and_remembers_the_last_ones() {
        let mut s = Stash::new(1 << 20);
        let (dead, live) = ([7u8; 8], [9u8; 8]);
        let frame = |p: [u8; 8], n: usize| [&p[..], &vec![0xAB; n]].concat();
        s.push(3, frame(dead, 100));
        s.push(3, frame(live, 10));
        s.push(3, frame(dead, 5));
        s.push(4, frame(dead, 0));
        s.push(5, vec![7; 4]);
        assert!(!s.forgets_any());
        assert_eq!(s.forget(dead), 3);
        assert!(s.forgets_any());
        assert!(s.is_forgotten(&frame(dead, 1)));
        assert!(!s.is_forgotten(&frame(live, 1)));
        assert!(!s.is_forgotten(&dead[..7]), "no prefix in 7 bytes");
        assert_eq!(
            s.bytes() as u64,
            frame_cost(18) + frame_cost(4),
            "what is left is charged"
        );
        assert_eq!(s.take(3).unwrap(), frame(live, 10));
        assert_eq!(s.take(3), None);
        assert_eq!(s.take(4), None);
        assert_eq!(
            s.take(5).unwrap(),
            vec![7; 4],
            "a frame without a prefix stays"
        );
        assert_eq!(s.bytes(), 0);
        // Only the most recent FORGOTTEN_PREFIXES are remembered.
        for i in 0..FORGOTTEN_PREFIXES as u64 {
            s.forget((1000 + i).to_le_bytes());
        }
        assert!(!s.is_forgotten(&dead), "pushed out");
        assert!(s.is_forgotten(&1000u64.to_le_bytes()));
        assert_eq!(s.forgotten.len(), FORGOTTEN_PREFIXES);
    }

    #[test]
    fn costs_round_up_as_malloc_does() {
        assert_eq!(frame_cost(0), FRAME_OVERHEAD as u64);
        assert_eq!(payload_cost(1), 32);
        assert_eq!(payload_cost(24), 32);
        assert_eq!(payload_cost(25), 48);
        assert_eq!(payload_cost((128 << 10) - 1), (128 << 10) + 16);
        assert_eq!(payload_cost(128 << 10), (128 << 10) + 4096);
        assert_eq!(payload_cost(u64::MAX), u64::MAX);
        assert_eq!(frame_cost(u64::MAX), u64::MAX);
    }
}

//! Tensor digests: XXH3-64 (seed 0) of each storage's wire bytes, streamed.
//!
//! Hosts hash the bytes as they move them (the state machines never hold tensor bytes;
//! [`crate::memory::MemoryHost`] does it for hosts that keep everything in memory); the core
//! compares what the host computed with the sender's trailer.

/// A streaming XXH3-64 hasher for one storage.
#[derive(Clone)]
pub struct StorageHasher(xxhash_rust::xxh3::Xxh3);

impl StorageHasher {
    /// A fresh hasher.
    pub fn new() -> StorageHasher {
        StorageHasher(xxhash_rust::xxh3::Xxh3::new())
    }

    /// Feeds the next bytes of the storage, in order.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

impl Default for StorageHasher {
    fn default() -> Self {
        StorageHasher::new()
    }
}

impl core::fmt::Debug for StorageHasher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("StorageHasher")
    }
}

/// XXH3-64 of a whole buffer.
pub fn digest(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot_and_known_value() {
        let data: alloc::vec::Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut h = StorageHasher::new();
        for part in data.chunks(333) {
            h.update(part);
        }
        assert_eq!(h.finish(), digest(&data));
        // XXH3-64 of the empty input, seed 0 (the reference implementation's test vector).
        assert_eq!(digest(&[]), 0x2D06_8005_38D3_94C2);
    }
}

//! Test support shared by the host's integration tests.

use std::time::Duration;

use pgt_host::pg::{PgError, ProcessGroup};

/// A process group that flips one byte (the middle one) of the message with tag `tag` to rank `to`.
pub struct Corrupting<P> {
    pub inner: P,
    pub tag: u64,
    pub to: u32,
}

impl<P: ProcessGroup> ProcessGroup for Corrupting<P> {
    fn rank(&self) -> u32 {
        self.inner.rank()
    }
    fn size(&self) -> u32 {
        self.inner.size()
    }
    fn send(&self, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError> {
        if dst == self.to && tag == self.tag {
            let mut bytes: Vec<u8> = parts.concat();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x40;
            return self.inner.send(dst, tag, &[&bytes], timeout);
        }
        self.inner.send(dst, tag, parts, timeout)
    }
    fn recv_into(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        timeout: Duration,
    ) -> Result<(), PgError> {
        self.inner.recv_into(src, tag, parts, timeout)
    }
    fn recv_vec(
        &self,
        src: u32,
        tag: u64,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, PgError> {
        self.inner.recv_vec(src, tag, max, timeout)
    }
}

/// A process group whose sends to rank `to` with a tag of at least `from_tag` fail at once, as if
/// that peer had closed its connection.
#[allow(dead_code)] // each test crate that includes this module uses only some of it
pub struct FailingTo<P> {
    pub inner: P,
    pub to: u32,
    pub from_tag: u64,
}

impl<P: ProcessGroup> ProcessGroup for FailingTo<P> {
    fn rank(&self) -> u32 {
        self.inner.rank()
    }
    fn size(&self) -> u32 {
        self.inner.size()
    }
    fn send(&self, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError> {
        if dst == self.to && tag >= self.from_tag {
            return Err(PgError::PeerClosed { peer: dst });
        }
        self.inner.send(dst, tag, parts, timeout)
    }
    fn recv_into(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        timeout: Duration,
    ) -> Result<(), PgError> {
        self.inner.recv_into(src, tag, parts, timeout)
    }
    fn recv_vec(
        &self,
        src: u32,
        tag: u64,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, PgError> {
        self.inner.recv_vec(src, tag, max, timeout)
    }
}

//! Test support shared by the host's integration tests.

use std::time::Duration;

use pgt_host::pg::{PgError, ProcessGroup};

/// What a [`Faulty`] group does to sends to its rank `to`.
#[allow(dead_code)] // each test crate that includes this module uses only some of it
pub enum Fault {
    /// Flip one byte (the middle one) of the message with this tag.
    Corrupt { tag: u64 },
    /// Fail every send with a tag of at least this at once, as if the peer had closed.
    CloseFrom { tag: u64 },
}

/// A process group that misbehaves on sends to rank `to` as `fault` says.
pub struct Faulty<P> {
    pub inner: P,
    pub to: u32,
    pub fault: Fault,
}

impl<P: ProcessGroup> ProcessGroup for Faulty<P> {
    fn rank(&self) -> u32 {
        self.inner.rank()
    }
    fn size(&self) -> u32 {
        self.inner.size()
    }
    fn send(&self, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError> {
        if dst == self.to {
            match self.fault {
                Fault::Corrupt { tag: t } if tag == t => {
                    let mut bytes: Vec<u8> = parts.concat();
                    let mid = bytes.len() / 2;
                    bytes[mid] ^= 0x40;
                    return self.inner.send(dst, tag, &[&bytes], timeout);
                }
                Fault::CloseFrom { tag: t } if tag >= t => {
                    return Err(PgError::PeerClosed { peer: dst });
                }
                _ => {}
            }
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

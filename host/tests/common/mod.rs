//! Test support shared by the host's integration tests.

use std::time::Duration;

use pgt_host::pg::{InProcessGroup, PgError, ProcessGroup, TcpOptions, TcpProcessGroup};
use pgt_host::state_dict::{Entry, StateDict, Tensor};
use pgt_host::synthetic::{self, Shape};
use pgt_host::transport::{Transport, TransportOptions};

/// A process group that hands every send to `hook` (which may corrupt, stall or fail it before
/// sending through the inner group) and passes everything else to `inner`: the one place tests
/// write a fault into a group.
#[allow(dead_code)] // each test crate that includes this module uses only some of it
pub struct OnSend<P, F> {
    pub inner: P,
    pub hook: F,
}

/// What [`OnSend`] calls in place of a send: the inner group, then `send`'s arguments.
pub trait SendHook<P>:
    Fn(&P, u32, u64, &[&[u8]], Duration) -> Result<(), PgError> + Send + Sync
{
}

impl<P, F> SendHook<P> for F where
    F: Fn(&P, u32, u64, &[&[u8]], Duration) -> Result<(), PgError> + Send + Sync
{
}

impl<P: ProcessGroup, F: SendHook<P>> ProcessGroup for OnSend<P, F> {
    fn rank(&self) -> u32 {
        self.inner.rank()
    }
    fn size(&self) -> u32 {
        self.inner.size()
    }
    fn send(&self, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError> {
        (self.hook)(&self.inner, dst, tag, parts, timeout)
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
    fn forget_prefix(&self, src: u32, prefix: [u8; 8]) -> Result<(), PgError> {
        self.inner.forget_prefix(src, prefix)
    }
}

/// What a [`faulty`] group does to sends to its rank `to`.
#[allow(dead_code)] // each test crate that includes this module uses only some of it
#[derive(Clone, Copy)]
pub enum Fault {
    /// Flip one byte (the middle one) of the message with this tag.
    Corrupt { tag: u64 },
    /// Fail every send with a tag of at least this at once, as if the peer had closed.
    CloseFrom { tag: u64 },
}

/// A process group that misbehaves on sends to rank `to` as `fault` says.
#[allow(dead_code)] // each test crate that includes this module uses only some of it
pub fn faulty<P: ProcessGroup>(inner: P, to: u32, fault: Fault) -> OnSend<P, impl SendHook<P>> {
    let hook = move |pg: &P, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration| {
        if dst == to {
            match fault {
                Fault::Corrupt { tag: t } if tag == t => {
                    let mut bytes: Vec<u8> = parts.concat();
                    let mid = bytes.len() / 2;
                    bytes[mid] ^= 0x40;
                    return pg.send(dst, tag, &[&bytes], timeout);
                }
                Fault::CloseFrom { tag: t } if tag >= t => {
                    return Err(PgError::PeerClosed { peer: dst });
                }
                _ => {}
            }
        }
        pg.send(dst, tag, parts, timeout)
    };
    OnSend { inner, hook }
}

/// Sends 4 float32 tensors (`w00`..`w03`, 64 KiB) from rank 0 to ranks 1 and 2 with `opts`, flipping a
/// byte of data message 5 (tag 8) on its way to rank 2; returns the shape and both receivers' results.
#[allow(dead_code)] // each test crate that includes this module uses only some of it
pub fn transfer_with_a_corrupted_byte(
    opts: TransportOptions,
) -> (Shape, Vec<pgt_host::Result<StateDict<'static>>>) {
    let shape = synthetic::large(64 << 10, 4);
    let sd = synthetic::materialize(&shape).unwrap();
    let mut groups = InProcessGroup::new(3).into_iter();
    let sender = Transport::new(
        faulty(groups.next().unwrap(), 2, Fault::Corrupt { tag: 8 }),
        opts.clone(),
    );
    let results = std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .map(|pg| {
                let t = Transport::new(pg, opts.clone());
                s.spawn(move || t.recv_checkpoint(0))
            })
            .collect();
        sender.send_checkpoint(&[1, 2], &sd).unwrap();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (shape, results)
}

/// Rank 1 receives in place a 4-element `model.layers.0.weight` into its 3-element one, with `opts`;
/// returns the receiver's error and its state dict afterwards.
#[allow(dead_code)] // each test crate that includes this module uses only some of it
pub fn in_place_size_mismatch(opts: TransportOptions) -> (pgt_host::Error, StateDict<'static>) {
    let tensor =
        |n: u64| Entry::Tensor(Tensor::from_values(&[n], &vec![1f32; n as usize]).unwrap());
    let mut src = StateDict::new();
    src.insert("model.layers.0.weight", tensor(4)).unwrap();
    let mut dst = StateDict::new();
    dst.insert("model.layers.0.weight", tensor(3)).unwrap();
    let mut groups = InProcessGroup::new(2).into_iter();
    let a = Transport::new(groups.next().unwrap(), opts.clone());
    let b = Transport::new(groups.next().unwrap(), opts);
    let err = std::thread::scope(|s| {
        let h = s.spawn(|| b.recv_checkpoint_into(0, &mut dst));
        // The receiver gives up after the metadata; the sender's sends may or may not complete.
        let _ = a.send_checkpoint(&[1], &src);
        h.join().unwrap().unwrap_err()
    });
    (err, dst)
}

/// A TCP process group of `world` ranks in this process (a thread each to form it), job token `token`.
#[allow(dead_code)] // each test crate that includes this module uses only some of it
pub fn tcp_groups(world: u32, token: &[u8]) -> Vec<TcpProcessGroup> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = token.to_vec();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let token = token.clone();
            std::thread::spawn(move || {
                TcpProcessGroup::connect(TcpOptions {
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    rank,
                    world_size: world,
                    token,
                    timeout: Duration::from_secs(20),
                    listen_host: None,
                })
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().expect("group formation"))
        .collect()
}

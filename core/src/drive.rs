//! The one loop that drives a state machine. A host says how bytes move by implementing [`ReceiveHost`]
//! or [`SendHost`]; [`receive`] and [`send`] decide what happens when, from the engine's ops. pgt-host's
//! `Transport` and CLI, the test harnesses and the in-memory [`crate::memory::MemoryHost`] all run
//! through these two functions, so none of them re-derives the protocol.

use alloc::vec::Vec;

use crate::engine::{ReceiveEngine, SendEngine};
use crate::header::prefix;
use crate::plan::{MessageKind, Plan, Segment};
use crate::receiver::{
    Binding, Dest, ForwardOp, InPlace, InPlaceWritten, Incoming, KeptManifest, Received, RecvOp,
    RecvPoll,
};
use crate::sender::{Payload, SendOp, SendPoll};
use crate::tree::{KeyPath, Node};
use crate::{Call, Error};

/// A completion a host reports back to the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Data message `message` has fully landed in its destinations.
    Landed(u32),
    /// The digests of the storages data message `message` completes, in segment order.
    Digests(u32, Vec<u64>),
    /// The forward of message `message` has been sent.
    Forwarded(u32),
}

/// The received tree, for a host that binds in place. Each is built (or fetched from a wasm guest) only
/// when asked for: a target of the received tree's shape is bound leaf by leaf from [`nodes`] alone,
/// and only a target of another shape needs the key paths, which take memory.
///
/// [`nodes`]: ReceivedTree::nodes
pub trait ReceivedTree<E> {
    /// The tree's nodes, pre-order ([`crate::receiver::Receiver::tree`]).
    fn nodes(&mut self) -> Result<Vec<Node>, E>;
    /// Every leaf's key path, in leaf order.
    fn paths(&mut self) -> Result<Vec<KeyPath>, E>;
}

/// A receive engine's tree, its errors converted into the host's.
struct EngineTree<'e, R>(&'e mut R);

impl<R, E> ReceivedTree<E> for EngineTree<'_, R>
where
    R: ReceiveEngine,
    E: From<R::Error>,
{
    fn nodes(&mut self) -> Result<Vec<Node>, E> {
        Ok(self.0.tree()?)
    }

    fn paths(&mut self) -> Result<Vec<KeyPath>, E> {
        Ok(self.0.paths()?)
    }
}

/// How a receiving host moves bytes. Each method does one thing the driver asks for; completions of
/// work the host does in the background come back through [`ReceiveHost::next_event`].
pub trait ReceiveHost {
    /// The host's error (engine and protocol errors convert into it, see [`receive`]).
    type Error;

    /// Receives a header, metadata or trailer message: exactly `op.len` bytes from `op.from` under
    /// `op.tag`.
    fn recv_bytes(&mut self, op: &RecvOp) -> Result<Vec<u8>, Self::Error>;

    /// Picks in-place destinations for what `incoming` announced; `tree` gives the received tree's
    /// shape and key paths. The default binds nothing: every storage gets a fresh destination.
    fn bind(
        &mut self,
        incoming: &Incoming,
        tree: &mut dyn ReceivedTree<Self::Error>,
    ) -> Result<Vec<InPlace>, Self::Error> {
        let _ = (incoming, tree);
        Ok(Vec::new())
    }

    /// Bindings are final (one per storage, in storage order): prepare the destinations.
    fn bound(&mut self, incoming: &Incoming, bindings: &[Binding]) -> Result<(), Self::Error>;

    /// Receives data message `op` into the destinations of `segments` (casting where a binding says
    /// so), hashing each segment's wire bytes when `op.hash`; reports [`Event::Landed`] (and
    /// [`Event::Digests`]) now or later.
    fn recv_data(&mut self, op: &RecvOp, segments: &[Segment]) -> Result<(), Self::Error>;

    /// Sends `payload`, the message's wire bytes, to `op.to`; reports [`Event::Forwarded`] now or
    /// later.
    fn forward(&mut self, op: &ForwardOp, payload: Payload<'_>) -> Result<(), Self::Error>;

    /// After the transfer failed: receives message `op`, which the failed transfer's plan says is
    /// still coming (skipping stale messages, as for any receive), and throws it away, so that the next
    /// transfer on the link does not meet it. Returns whether to go on draining: a host whose link is
    /// broken (a timeout, a closed peer, a message of the wrong length) returns `false`, and so does
    /// the default, which drains nothing (PROTOCOL.md §12: stale messages are skipped by the next
    /// transfer instead).
    fn discard(&mut self, op: &RecvOp) -> bool {
        let _ = op;
        false
    }

    /// The next completion. Without `wait`, `None` when none is ready; with `wait`, blocks until one
    /// is (or fails: a host that has nothing in flight returns `None`, and the driver reports
    /// [`Error::Incomplete`]).
    fn next_event(&mut self, wait: bool) -> Result<Option<Event>, Self::Error>;

    /// The transfer failed: stop background work that writes into the destinations (hashing,
    /// casting), so that what [`ReceiveHost::not_in_target`] and the completions ready now say is
    /// final. The default has none.
    fn stop(&mut self) {}

    /// In-place storages whose landed bytes are not in their target (yet): held in staging until
    /// the transfer verified, or still to be cast. Their targets count as untouched
    /// ([`crate::receiver::Receiver::in_place_written`]). The default: none.
    fn not_in_target(&mut self) -> Vec<u32> {
        Vec::new()
    }

    /// The transfer failed with `error` after writing in place (`written` is not empty): the
    /// host's error that says so. The default returns `error` as it is.
    fn written_in_place(&mut self, error: Self::Error, written: InPlaceWritten) -> Self::Error {
        let _ = written;
        error
    }
}

/// Runs `engine` to completion over `host` and returns the verified result. The first error — the
/// engine's, the protocol's or the host's — ends the transfer: the host stops its background work
/// ([`ReceiveHost::stop`]), and when the transfer had written in place, the error says what
/// ([`ReceiveHost::written_in_place`]); then the host drains what the plan still says is coming
/// ([`ReceiveEngine::leftover`], [`ReceiveHost::discard`]), and the engine is dropped.
pub fn receive<E, H>(engine: E, host: &mut H) -> Result<Received, H::Error>
where
    E: ReceiveEngine,
    H: ReceiveHost,
    H::Error: From<E::Error> + From<Error>,
{
    receive_and(engine, host, E::finish)
}

/// [`receive`], also returning what the engine keeps for the next transfer from the same source
/// ([`ReceiveEngine::finish_keeping`]).
pub fn receive_keeping<E, H>(
    engine: E,
    host: &mut H,
) -> Result<(Received, Option<KeptManifest>), H::Error>
where
    E: ReceiveEngine,
    H: ReceiveHost,
    H::Error: From<E::Error> + From<Error>,
{
    receive_and(engine, host, E::finish_keeping)
}

/// [`receive`], whose engine, once done, ends with `finish`.
fn receive_and<E, H, T>(
    mut engine: E,
    host: &mut H,
    finish: impl FnOnce(E) -> Result<T, E::Error>,
) -> Result<T, H::Error>
where
    E: ReceiveEngine,
    H: ReceiveHost,
    H::Error: From<E::Error> + From<Error>,
{
    let mut in_place = false;
    let failure = match run_receive(&mut engine, host, &mut in_place) {
        Ok(()) => {
            // Once done, `finish` refuses only a digest mismatch, and it takes the engine: what was
            // written is asked before (every message has landed; only a host that writes later holds
            // some back), and only then, as naming every leaf written costs ~1 µs a leaf. (A sandboxed
            // engine that fails inside `finish` itself is reported as that failure, unnamed.)
            let written = match in_place && engine.has_digest_mismatch()? {
                true => engine.in_place_written(&host.not_in_target())?,
                false => InPlaceWritten::default(),
            };
            return finish(engine).map_err(|e| written_in_place(host, e.into(), written));
        }
        Err(e) => e,
    };
    host.stop();
    let mut written = InPlaceWritten::default();
    if in_place {
        // What landed before the failure and was not reported yet.
        while let Ok(Some(event)) = host.next_event(false) {
            if apply_receive(&mut engine, event).is_err() {
                break;
            }
        }
        written = engine
            .in_place_written(&host.not_in_target())
            .unwrap_or_default();
    }
    while let Ok(Some(op)) = engine.leftover() {
        if !host.discard(&op) {
            break;
        }
    }
    Err(written_in_place(host, failure, written))
}

fn written_in_place<H: ReceiveHost>(
    host: &mut H,
    e: H::Error,
    written: InPlaceWritten,
) -> H::Error {
    if written.is_empty() {
        e
    } else {
        host.written_in_place(e, written)
    }
}

fn run_receive<E, H>(
    engine: &mut E,
    host: &mut H,
    in_place_bound: &mut bool,
) -> Result<(), H::Error>
where
    E: ReceiveEngine,
    H: ReceiveHost,
    H::Error: From<E::Error> + From<Error>,
{
    let mut incoming: Option<Incoming> = None;
    let mut trailer = Vec::new();
    loop {
        while let Some(event) = host.next_event(false)? {
            apply_receive(engine, event)?;
        }
        match engine.poll()? {
            RecvPoll::Recv(op) => match op.kind {
                MessageKind::Header => engine.handle_header(&host.recv_bytes(&op)?)?,
                MessageKind::Metadata => {
                    incoming = Some(engine.handle_metadata(&host.recv_bytes(&op)?)?);
                }
                MessageKind::Trailer => {
                    trailer = host.recv_bytes(&op)?;
                    engine.handle_trailer(&trailer)?;
                }
                MessageKind::Data => {
                    let plan = &announced(&incoming, Call::Data)?.plan;
                    host.recv_data(&op, segments(plan, op.message)?)?;
                }
            },
            RecvPoll::NeedBindings => {
                let incoming = announced(&incoming, Call::Bindings)?;
                let in_place = host.bind(incoming, &mut EngineTree(&mut *engine))?;
                let bindings = engine.finish_bindings(&in_place)?;
                *in_place_bound = bindings.iter().any(|b| matches!(b.dest, Dest::InPlace(_)));
                host.bound(incoming, &bindings)?;
            }
            RecvPoll::Forward(op) => {
                let payload = match op.kind {
                    MessageKind::Data => Payload::Storages {
                        prefix: op_prefix(op.prefix, op.message)?,
                        segments: segments(
                            &announced(&incoming, Call::Forwarded)?.plan,
                            op.message,
                        )?,
                    },
                    _ => Payload::Bytes(&trailer),
                };
                host.forward(&op, payload)?;
            }
            RecvPoll::Wait => match host.next_event(true)? {
                Some(event) => apply_receive(engine, event)?,
                None => return Err(Error::Incomplete.into()),
            },
            RecvPoll::Done => return Ok(()),
        }
    }
}

/// A data message's prefix, from its op.
fn op_prefix(id: Option<u64>, message: u32) -> Result<[u8; 8], Error> {
    id.map(prefix).ok_or(Error::MessageNotOutstanding {
        message: message.into(),
    })
}

fn announced(incoming: &Option<Incoming>, call: Call) -> Result<&Incoming, Error> {
    incoming.as_ref().ok_or(Error::UnexpectedCall { call })
}

fn segments(plan: &Plan, message: u32) -> Result<&[Segment], Error> {
    let m = plan
        .messages()
        .get(message as usize)
        .ok_or(Error::MessageNotOutstanding {
            message: message.into(),
        })?;
    Ok(plan.segments(m))
}

fn apply_receive<E: ReceiveEngine>(engine: &mut E, event: Event) -> Result<(), E::Error> {
    match event {
        Event::Landed(m) => engine.handle_data(m),
        Event::Digests(m, d) => engine.handle_digests(m, &d),
        Event::Forwarded(m) => engine.handle_forwarded(m),
    }
}

/// How a sending host moves bytes.
pub trait SendHost {
    /// The host's error (engine and protocol errors convert into it, see [`send`]).
    type Error;

    /// Sends `payload`, message `op`'s bytes, to `op.to` (in poll order per destination); when
    /// `op.hash`, hashes the storage bytes as in [`crate::sender`] and reports [`Event::Digests`] now
    /// or later.
    fn send(&mut self, op: &SendOp, payload: Payload<'_>) -> Result<(), Self::Error>;

    /// The next digest report, as [`ReceiveHost::next_event`].
    fn next_event(&mut self, wait: bool) -> Result<Option<Event>, Self::Error>;

    /// Every send has been handed out: finish those in flight.
    fn flush(&mut self) -> Result<(), Self::Error>;
}

/// Runs `engine` to completion over `host`.
pub fn send<E, H>(engine: &mut E, host: &mut H) -> Result<(), H::Error>
where
    E: SendEngine,
    H: SendHost,
    H::Error: From<E::Error> + From<Error>,
{
    loop {
        while let Some(event) = host.next_event(false)? {
            apply_send(engine, event)?;
        }
        match engine.poll()? {
            SendPoll::Send(op) if op.kind == MessageKind::Data => {
                let payload = Payload::Storages {
                    prefix: op_prefix(op.prefix, op.message)?,
                    segments: segments(engine.plan(), op.message)?,
                };
                host.send(&op, payload)?;
            }
            SendPoll::Send(op) => {
                let bytes = engine.message_bytes(op.message)?;
                host.send(&op, Payload::Bytes(&bytes))?;
            }
            SendPoll::WaitDigests => match host.next_event(true)? {
                Some(event) => apply_send(engine, event)?,
                None => return Err(Error::Incomplete.into()),
            },
            SendPoll::Done => return host.flush(),
        }
    }
}

fn apply_send<E: SendEngine>(engine: &mut E, event: Event) -> Result<(), E::Error> {
    match event {
        Event::Digests(m, d) => engine.handle_digests(m, &d),
        Event::Landed(m) | Event::Forwarded(m) => {
            Err(Error::MessageNotOutstanding { message: m.into() }.into())
        }
    }
}

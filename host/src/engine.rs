//! The protocol engine a [`crate::transport::Transport`] drives: pgt-core's sans-IO Sender and Receiver,
//! behind object-safe traits with owned operations, so the same transport runs the core natively or
//! inside a wasm sandbox. The host owns no protocol logic: everything decided here comes from the core.

use pgt_core::codec::{Limits, Metadata, StorageRef};
use pgt_core::dtype::DType;
use pgt_core::plan::{MessageKind, Segment};
use pgt_core::receiver::{Binding, Receiver, ReceiverOptions, RecvInto, RecvPoll};
use pgt_core::sender::{Payload, SendPoll, Sender};
use pgt_core::tree::{KeyPath, Leaf, Node};

/// A protocol error from the engine (the core's error, or the sandbox failing).
pub type EngineError = anyhow::Error;

/// What a message carries when it is sent or forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedPayload {
    /// Bytes from the engine (header, metadata, trailer).
    Bytes(Vec<u8>),
    /// Storage byte ranges held by the host.
    Storages(Vec<Segment>),
}

/// One send, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendStep {
    /// Destination rank.
    pub to: u32,
    /// Plan index.
    pub message: usize,
    /// Tag.
    pub tag: u64,
    /// Length.
    pub len: u64,
    /// Bytes to send.
    pub payload: OwnedPayload,
    /// Hash the storage bytes while sending.
    pub hash: bool,
}

/// What the sender engine wants next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendNext {
    /// Perform this send.
    Send(SendStep),
    /// Report missing storage digests, then poll again.
    WaitDigests,
    /// All sends handed out.
    Done,
}

/// The sender side of the core.
pub trait SenderEngine: Send {
    /// The storages of the transfer, in wire order.
    fn storages(&self) -> Vec<StorageRef>;
    /// The next operation.
    fn poll(&mut self) -> Result<SendNext, EngineError>;
    /// Reports a storage's digest.
    fn handle_storage_digest(&mut self, storage: u32, digest: u64) -> Result<(), EngineError>;
}

/// One receive, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvStep {
    /// Source rank.
    pub from: u32,
    /// Plan index.
    pub message: usize,
    /// What it carries.
    pub kind: MessageKind,
    /// Tag.
    pub tag: u64,
    /// Exact length.
    pub len: u64,
    /// Storage ranges for data messages (empty otherwise: bytes go back to the engine).
    pub segments: Vec<Segment>,
    /// Hash the storage bytes as they land.
    pub hash: bool,
}

/// One forward, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardStep {
    /// Destination rank.
    pub to: u32,
    /// Plan index.
    pub message: usize,
    /// Tag.
    pub tag: u64,
    /// Length.
    pub len: u64,
    /// Bytes to forward.
    pub payload: OwnedPayload,
}

/// What the receiver engine wants next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecvNext {
    /// Receive this message.
    Recv(RecvStep),
    /// Bind destinations ([`ReceiverEngine::bind_in_place`]), then [`ReceiverEngine::finish_bindings`].
    NeedBindings,
    /// Forward this message.
    Forward(ForwardStep),
    /// Complete something in flight.
    Wait,
    /// Everything handled: call [`ReceiverEngine::finish`].
    Done,
}

/// What the receiver learned from the metadata, for binding.
#[derive(Clone, Debug, PartialEq)]
pub struct IncomingManifest {
    /// Step of the checkpoint.
    pub step: Option<u64>,
    /// Key path of every leaf.
    pub paths: Vec<KeyPath>,
    /// Every storage, in wire order.
    pub storages: Vec<StorageRef>,
    /// Total storage bytes.
    pub total_bytes: u64,
}

/// The verified result of a transfer.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedTree {
    /// Step of the checkpoint.
    pub step: Option<u64>,
    /// Tree structure, pre-order.
    pub tree: Vec<Node>,
    /// Leaves as bound (dtype after cast, placements rewritten).
    pub leaves: Vec<Leaf>,
    /// Destination of every storage.
    pub bindings: Vec<Binding>,
}

/// The receiver side of the core.
pub trait ReceiverEngine: Send {
    /// The next operation.
    fn poll(&mut self) -> Result<RecvNext, EngineError>;
    /// Hands over the header's bytes.
    fn handle_header(&mut self, bytes: &[u8]) -> Result<(), EngineError>;
    /// Hands over the metadata's bytes; returns what binding needs.
    fn handle_metadata(&mut self, bytes: &[u8]) -> Result<IncomingManifest, EngineError>;
    /// Binds a storage to an existing buffer.
    fn bind_in_place(
        &mut self,
        storage: usize,
        id: u64,
        dtype: DType,
        nbytes: u64,
    ) -> Result<(), EngineError>;
    /// Ends binding; returns every storage's binding.
    fn finish_bindings(&mut self) -> Result<Vec<Binding>, EngineError>;
    /// A data message landed.
    fn handle_data(&mut self, message: usize) -> Result<(), EngineError>;
    /// The trailer's bytes.
    fn handle_trailer(&mut self, bytes: &[u8]) -> Result<(), EngineError>;
    /// A storage's digest, hashed as it landed.
    fn handle_storage_digest(&mut self, storage: u32, digest: u64) -> Result<(), EngineError>;
    /// A forward was sent.
    fn handle_forwarded(&mut self, message: usize) -> Result<(), EngineError>;
    /// The verified result.
    fn finish(self: Box<Self>) -> Result<ReceivedTree, EngineError>;
}

/// Builds engines: native (pgt-core linked in) or sandboxed.
pub trait EngineFactory: Send + Sync {
    /// A sender for `metadata`.
    fn sender(
        &self,
        metadata: Metadata,
        digests: bool,
        limits: &Limits,
    ) -> Result<Box<dyn SenderEngine>, EngineError>;
    /// A receiver.
    fn receiver(&self, options: ReceiverOptions) -> Result<Box<dyn ReceiverEngine>, EngineError>;
}

/// pgt-core, linked natively.
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeEngine;

impl EngineFactory for NativeEngine {
    fn sender(
        &self,
        metadata: Metadata,
        digests: bool,
        limits: &Limits,
    ) -> Result<Box<dyn SenderEngine>, EngineError> {
        Ok(Box::new(Sender::new(metadata, digests, limits)?))
    }

    fn receiver(&self, options: ReceiverOptions) -> Result<Box<dyn ReceiverEngine>, EngineError> {
        Ok(Box::new(Receiver::new(options)))
    }
}

fn owned(payload: Payload<'_>) -> OwnedPayload {
    match payload {
        Payload::Bytes(b) => OwnedPayload::Bytes(b.to_vec()),
        Payload::Storages(s) => OwnedPayload::Storages(s.to_vec()),
    }
}

impl SenderEngine for Sender {
    fn storages(&self) -> Vec<StorageRef> {
        self.manifest().storages().to_vec()
    }

    fn poll(&mut self) -> Result<SendNext, EngineError> {
        Ok(match Sender::poll(self) {
            SendPoll::Send(op) => SendNext::Send(SendStep {
                to: op.to,
                message: op.message,
                tag: op.tag,
                len: op.len,
                payload: owned(op.payload),
                hash: op.hash,
            }),
            SendPoll::WaitDigests => SendNext::WaitDigests,
            SendPoll::Done => SendNext::Done,
        })
    }

    fn handle_storage_digest(&mut self, storage: u32, digest: u64) -> Result<(), EngineError> {
        Ok(Sender::handle_storage_digest(self, storage, digest)?)
    }
}

impl ReceiverEngine for Receiver {
    fn poll(&mut self) -> Result<RecvNext, EngineError> {
        Ok(match Receiver::poll(self) {
            RecvPoll::Recv(op) => RecvNext::Recv(RecvStep {
                from: op.from,
                message: op.message,
                kind: op.kind,
                tag: op.tag,
                len: op.len,
                segments: match op.into {
                    RecvInto::Core => Vec::new(),
                    RecvInto::Storages(s) => s.to_vec(),
                },
                hash: op.hash,
            }),
            RecvPoll::NeedBindings => RecvNext::NeedBindings,
            RecvPoll::Forward(op) => RecvNext::Forward(ForwardStep {
                to: op.to,
                message: op.message,
                tag: op.tag,
                len: op.len,
                payload: owned(op.payload),
            }),
            RecvPoll::Wait => RecvNext::Wait,
            RecvPoll::Done => RecvNext::Done,
        })
    }

    fn handle_header(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        Ok(Receiver::handle_header(self, bytes)?)
    }

    fn handle_metadata(&mut self, bytes: &[u8]) -> Result<IncomingManifest, EngineError> {
        Receiver::handle_metadata(self, bytes)?;
        let m = self
            .manifest()
            .ok_or_else(|| anyhow::anyhow!("no manifest"))?;
        Ok(IncomingManifest {
            step: m.metadata().step,
            paths: m.paths().to_vec(),
            storages: m.storages().to_vec(),
            total_bytes: m.total_bytes(),
        })
    }

    fn bind_in_place(
        &mut self,
        storage: usize,
        id: u64,
        dtype: DType,
        nbytes: u64,
    ) -> Result<(), EngineError> {
        Ok(Receiver::bind_in_place(self, storage, id, dtype, nbytes)?)
    }

    fn finish_bindings(&mut self) -> Result<Vec<Binding>, EngineError> {
        Receiver::finish_bindings(self)?;
        Ok(self.bindings())
    }

    fn handle_data(&mut self, message: usize) -> Result<(), EngineError> {
        Ok(Receiver::handle_data(self, message)?)
    }

    fn handle_trailer(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        Ok(Receiver::handle_trailer(self, bytes)?)
    }

    fn handle_storage_digest(&mut self, storage: u32, digest: u64) -> Result<(), EngineError> {
        Ok(Receiver::handle_storage_digest(self, storage, digest)?)
    }

    fn handle_forwarded(&mut self, message: usize) -> Result<(), EngineError> {
        Ok(Receiver::handle_forwarded(self, message)?)
    }

    fn finish(self: Box<Self>) -> Result<ReceivedTree, EngineError> {
        let r = Receiver::finish(*self)?;
        let meta = r.manifest.into_metadata();
        Ok(ReceivedTree {
            step: meta.step,
            tree: meta.tree,
            leaves: r.leaves,
            bindings: r.bindings,
        })
    }
}

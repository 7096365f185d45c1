//! The protocol engines a [`crate::transport::Transport`] drives: pgt-core linked natively, or inside a
//! wasm sandbox ([`crate::wasm_engine`]). Both implement pgt-core's own engine traits
//! ([`pgt_core::engine`]) with pgt-core's own ops, so the one driver ([`pgt_core::drive`]) runs either;
//! the host owns no protocol logic.

use std::borrow::Cow;

use pgt_core::engine::{ReceiveEngine, SendEngine};
use pgt_core::header::Limits;
use pgt_core::plan::Plan;
use pgt_core::receiver::{
    Binding, InPlace, InPlaceWritten, Incoming, KeptManifest, Received, Receiver, ReceiverOptions,
    RecvOp, RecvPoll,
};
use pgt_core::schema::Metadata;
use pgt_core::sender::{DestinationOutcome, KeptMetadata, SendPoll, Sender};
use pgt_core::tree::{KeyPath, Node};

#[cfg(feature = "wasm")]
use crate::wasm_engine::{SandboxError, WasmReceiver, WasmSender};

/// Why an engine failed a call: the protocol (the same [`pgt_core::Error`] from either engine), or the
/// sandbox running it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// pgt-core refused: bad bytes, invalid metadata, a call in the wrong order…
    #[error(transparent)]
    Protocol(#[from] pgt_core::Error),
    /// The wasm sandbox failed the call (fuel, memory, a trap).
    #[cfg(feature = "wasm")]
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The wasm module misbehaved: it refused a call as ABI misuse, answered with something that does
    /// not decode, or could not be loaded.
    #[error("wasm module: {0}")]
    Module(String),
}

impl EngineError {
    /// The protocol error, if that is what this is.
    pub fn protocol(&self) -> Option<&pgt_core::Error> {
        match self {
            EngineError::Protocol(e) => Some(e),
            _ => None,
        }
    }
}

/// A sender engine: native or sandboxed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SenderEngine {
    /// pgt-core linked in.
    Native(Box<Sender>),
    /// pgt-core in wasmtime.
    #[cfg(feature = "wasm")]
    Wasm(Box<WasmSender>),
}

/// A receiver engine: native or sandboxed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReceiverEngine {
    /// pgt-core linked in.
    Native(Box<Receiver>),
    /// pgt-core in wasmtime.
    #[cfg(feature = "wasm")]
    Wasm(Box<WasmReceiver>),
}

/// Builds engines: native (pgt-core linked in) or sandboxed.
pub trait EngineFactory: Send + Sync + std::fmt::Debug {
    /// A sender for `metadata` (validated under `limits`), for transfer `transfer_id` (every message
    /// after the header starts with it; the host picks it at random).
    fn sender(
        &self,
        metadata: Metadata,
        digests: bool,
        limits: &Limits,
        transfer_id: u64,
    ) -> Result<SenderEngine, EngineError>;
    /// A sender for what a finished send kept ([`SenderEngine::into_kept`]) at `step`: what
    /// [`EngineFactory::sender`] makes of the kept metadata at that step, with the same bytes on the
    /// wire.
    fn sender_again(
        &self,
        kept: KeptMetadata,
        step: Option<u64>,
        limits: &Limits,
        transfer_id: u64,
    ) -> Result<SenderEngine, EngineError> {
        let digests = kept.digests();
        self.sender(kept.into_metadata_at(step), digests, limits, transfer_id)
    }
    /// A receiver.
    fn receiver(&self, options: ReceiverOptions) -> Result<ReceiverEngine, EngineError>;
    /// A receiver that keeps its validated metadata for the next transfer from the same source
    /// ([`ReceiveEngine::finish_keeping`]), given what the previous one kept. The default is
    /// [`EngineFactory::receiver`], which keeps nothing.
    fn receiver_keeping(
        &self,
        options: ReceiverOptions,
        kept: Option<KeptManifest>,
    ) -> Result<ReceiverEngine, EngineError> {
        let _ = kept;
        self.receiver(options)
    }
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
        transfer_id: u64,
    ) -> Result<SenderEngine, EngineError> {
        Ok(Sender::new(metadata, digests, limits, transfer_id)?.into())
    }

    /// Only the step's bytes are encoded again ([`Sender::again`]).
    fn sender_again(
        &self,
        kept: KeptMetadata,
        step: Option<u64>,
        limits: &Limits,
        transfer_id: u64,
    ) -> Result<SenderEngine, EngineError> {
        Ok(Sender::again(kept, step, limits, transfer_id)?.into())
    }

    fn receiver(&self, options: ReceiverOptions) -> Result<ReceiverEngine, EngineError> {
        Ok(Receiver::new(options).into())
    }

    /// A metadata message that is the kept one's but for its step is not decoded again
    /// ([`Receiver::keeping`]).
    fn receiver_keeping(
        &self,
        options: ReceiverOptions,
        kept: Option<KeptManifest>,
    ) -> Result<ReceiverEngine, EngineError> {
        Ok(Receiver::keeping(options, kept).into())
    }
}

impl From<Sender> for SenderEngine {
    fn from(sender: Sender) -> SenderEngine {
        SenderEngine::Native(Box::new(sender))
    }
}

impl From<Receiver> for ReceiverEngine {
    fn from(receiver: Receiver) -> ReceiverEngine {
        ReceiverEngine::Native(Box::new(receiver))
    }
}

impl SenderEngine {
    /// What [`EngineFactory::sender_again`] needs to send this engine's metadata again: pgt-core's
    /// kept metadata when it runs natively. A sandboxed sender keeps nothing: its metadata lives in
    /// its guest, which ends with its transfer.
    pub fn into_kept(self) -> Option<KeptMetadata> {
        match self {
            Self::Native(e) => Some(e.into_kept()),
            #[cfg(feature = "wasm")]
            Self::Wasm(_) => None,
        }
    }
}

/// Dispatches a call to whichever engine this is, converting its error.
macro_rules! dispatch {
    ($self:expr, $e:ident => $call:expr) => {
        match $self {
            Self::Native($e) => Ok($call?),
            #[cfg(feature = "wasm")]
            Self::Wasm($e) => Ok($call?),
        }
    };
}

impl SendEngine for SenderEngine {
    type Error = EngineError;

    fn plan(&self) -> &Plan {
        match self {
            Self::Native(e) => e.plan(),
            #[cfg(feature = "wasm")]
            Self::Wasm(e) => e.plan(),
        }
    }

    fn poll(&mut self) -> Result<SendPoll, EngineError> {
        dispatch!(self, e => SendEngine::poll(&mut **e))
    }

    fn message_bytes(&mut self, message: u32) -> Result<Cow<'_, [u8]>, EngineError> {
        dispatch!(self, e => e.message_bytes(message))
    }

    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), EngineError> {
        dispatch!(self, e => SendEngine::handle_digests(&mut **e, message, digests))
    }

    fn destination_outcome(&mut self, failed: &[u32]) -> Result<DestinationOutcome, EngineError> {
        dispatch!(self, e => SendEngine::destination_outcome(&mut **e, failed))
    }
}

impl ReceiveEngine for ReceiverEngine {
    type Error = EngineError;

    fn poll(&mut self) -> Result<RecvPoll, EngineError> {
        dispatch!(self, e => ReceiveEngine::poll(&mut **e))
    }

    fn handle_header(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        dispatch!(self, e => ReceiveEngine::handle_header(&mut **e, bytes))
    }

    fn handle_metadata(&mut self, bytes: &[u8]) -> Result<Incoming, EngineError> {
        let _span = tracing::info_span!("decode", bytes = bytes.len()).entered();
        dispatch!(self, e => ReceiveEngine::handle_metadata(&mut **e, bytes))
    }

    fn tree(&mut self) -> Result<Vec<Node>, EngineError> {
        let _span = tracing::info_span!("tree").entered();
        dispatch!(self, e => ReceiveEngine::tree(&mut **e))
    }

    fn paths(&mut self) -> Result<Vec<KeyPath>, EngineError> {
        dispatch!(self, e => ReceiveEngine::paths(&mut **e))
    }

    fn finish_bindings(&mut self, in_place: &[InPlace]) -> Result<Vec<Binding>, EngineError> {
        dispatch!(self, e => ReceiveEngine::finish_bindings(&mut **e, in_place))
    }

    fn handle_data(&mut self, message: u32) -> Result<(), EngineError> {
        dispatch!(self, e => ReceiveEngine::handle_data(&mut **e, message))
    }

    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), EngineError> {
        dispatch!(self, e => ReceiveEngine::handle_digests(&mut **e, message, digests))
    }

    fn handle_trailer(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        dispatch!(self, e => ReceiveEngine::handle_trailer(&mut **e, bytes))
    }

    fn handle_forwarded(&mut self, message: u32) -> Result<(), EngineError> {
        dispatch!(self, e => ReceiveEngine::handle_forwarded(&mut **e, message))
    }

    fn in_place_written(&mut self, not_in_target: &[u32]) -> Result<InPlaceWritten, EngineError> {
        dispatch!(self, e => ReceiveEngine::in_place_written(&mut **e, not_in_target))
    }

    fn has_digest_mismatch(&mut self) -> Result<bool, EngineError> {
        dispatch!(self, e => ReceiveEngine::has_digest_mismatch(&mut **e))
    }

    fn leftover(&mut self) -> Result<Option<RecvOp>, EngineError> {
        dispatch!(self, e => ReceiveEngine::leftover(&mut **e))
    }

    fn finish(self) -> Result<Received, EngineError> {
        match self {
            Self::Native(e) => Ok(ReceiveEngine::finish(*e)?),
            #[cfg(feature = "wasm")]
            Self::Wasm(e) => Ok(ReceiveEngine::finish(*e)?),
        }
    }

    fn finish_keeping(self) -> Result<(Received, Option<KeptManifest>), EngineError> {
        match self {
            Self::Native(e) => Ok(ReceiveEngine::finish_keeping(*e)?),
            #[cfg(feature = "wasm")]
            Self::Wasm(e) => Ok(ReceiveEngine::finish_keeping(*e)?),
        }
    }
}

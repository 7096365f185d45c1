//! The state machines as traits, so that one driver ([`crate::drive`]) runs pgt-core linked natively or
//! inside a sandbox (pgt-host's wasm engine implements the same traits by calling the guest). The ops
//! are the core's own owned types; only a sandbox's failures need another error type.

use alloc::borrow::Cow;
use alloc::vec::Vec;

use crate::plan::Plan;
use crate::receiver::{
    Binding, InPlace, InPlaceWritten, Incoming, KeptManifest, Received, Receiver, RecvOp, RecvPoll,
};
use crate::sender::{DestinationOutcome, Payload, SendPoll, Sender};
use crate::tree::{KeyPath, Node};
use crate::Error;

/// The sender side.
pub trait SendEngine {
    /// The engine's error: the core's, or more (a sandbox can fail too).
    type Error: From<Error>;
    /// The plan: which storage ranges each data message carries.
    fn plan(&self) -> &Plan;
    /// The next send ([`Sender::poll`]).
    fn poll(&mut self) -> Result<SendPoll, Self::Error>;
    /// The header, metadata or trailer bytes of message `message` (after it was polled).
    fn message_bytes(&mut self, message: u32) -> Result<Cow<'_, [u8]>, Self::Error>;
    /// The digests a data message completes ([`Sender::handle_digests`]).
    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), Self::Error>;
    /// Where the send stands once the destinations in `failed` failed
    /// ([`Sender::destination_outcome`]).
    fn destination_outcome(&mut self, failed: &[u32]) -> Result<DestinationOutcome, Self::Error>;
}

/// The receiver side.
pub trait ReceiveEngine {
    /// The engine's error: the core's, or more (a sandbox can fail too).
    type Error: From<Error>;
    /// The next operation ([`Receiver::poll`]).
    fn poll(&mut self) -> Result<RecvPoll, Self::Error>;
    /// The header's bytes.
    fn handle_header(&mut self, bytes: &[u8]) -> Result<(), Self::Error>;
    /// The metadata's bytes; returns what it announced.
    fn handle_metadata(&mut self, bytes: &[u8]) -> Result<Incoming, Self::Error>;
    /// The received tree's nodes, pre-order ([`Receiver::tree`]; asked for only when binding in place).
    fn tree(&mut self) -> Result<Vec<Node>, Self::Error>;
    /// Every leaf's key path (asked for only when binding in place to a tree of another shape).
    fn paths(&mut self) -> Result<Vec<KeyPath>, Self::Error>;
    /// Ends binding ([`Receiver::finish_bindings`]); returns every storage's binding.
    fn finish_bindings(&mut self, in_place: &[InPlace]) -> Result<Vec<Binding>, Self::Error>;
    /// A data message landed.
    fn handle_data(&mut self, message: u32) -> Result<(), Self::Error>;
    /// The digests a data message completes.
    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), Self::Error>;
    /// The trailer's bytes.
    fn handle_trailer(&mut self, bytes: &[u8]) -> Result<(), Self::Error>;
    /// A forward was sent.
    fn handle_forwarded(&mut self, message: u32) -> Result<(), Self::Error>;
    /// What the transfer wrote in place so far ([`Receiver::in_place_written`]).
    fn in_place_written(&mut self, not_in_target: &[u32]) -> Result<InPlaceWritten, Self::Error>;
    /// Whether a storage's digest mismatched so far ([`Receiver::digest_mismatch`]): once the
    /// receiver is done, the one thing [`ReceiveEngine::finish`] refuses. The default says yes (it
    /// may refuse), which costs a driver that asks only time.
    fn has_digest_mismatch(&mut self) -> Result<bool, Self::Error> {
        Ok(true)
    }
    /// After an error: the next message the plan still says is coming ([`Receiver::leftover`]).
    fn leftover(&mut self) -> Result<Option<RecvOp>, Self::Error>;
    /// The verified result.
    fn finish(self) -> Result<Received, Self::Error>;
    /// [`ReceiveEngine::finish`], and what the receiver keeps for the next transfer from the same
    /// source ([`Receiver::finish_keeping`]). The default keeps nothing.
    fn finish_keeping(self) -> Result<(Received, Option<KeptManifest>), Self::Error>
    where
        Self: Sized,
    {
        Ok((self.finish()?, None))
    }
}

impl SendEngine for Sender {
    type Error = Error;

    fn plan(&self) -> &Plan {
        Sender::plan(self)
    }

    fn poll(&mut self) -> Result<SendPoll, Error> {
        Ok(Sender::poll(self))
    }

    fn message_bytes(&mut self, message: u32) -> Result<Cow<'_, [u8]>, Error> {
        match self.payload(message)? {
            Payload::Bytes(b) => Ok(Cow::Borrowed(b)),
            Payload::Storages { .. } => Err(Error::MessageNotOutstanding {
                message: message.into(),
            }),
        }
    }

    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), Error> {
        Sender::handle_digests(self, message, digests)
    }

    fn destination_outcome(&mut self, failed: &[u32]) -> Result<DestinationOutcome, Error> {
        Ok(Sender::destination_outcome(self, failed))
    }
}

impl ReceiveEngine for Receiver {
    type Error = Error;

    fn poll(&mut self) -> Result<RecvPoll, Error> {
        Ok(Receiver::poll(self))
    }

    fn handle_header(&mut self, bytes: &[u8]) -> Result<(), Error> {
        Receiver::handle_header(self, bytes)
    }

    fn handle_metadata(&mut self, bytes: &[u8]) -> Result<Incoming, Error> {
        Receiver::handle_metadata(self, bytes)?;
        self.incoming()
    }

    fn tree(&mut self) -> Result<Vec<Node>, Error> {
        Ok(Receiver::tree(self)?.to_vec())
    }

    fn paths(&mut self) -> Result<Vec<KeyPath>, Error> {
        Ok(Receiver::paths(self)?.to_vec())
    }

    fn finish_bindings(&mut self, in_place: &[InPlace]) -> Result<Vec<Binding>, Error> {
        Ok(Receiver::finish_bindings(self, in_place)?.to_vec())
    }

    fn handle_data(&mut self, message: u32) -> Result<(), Error> {
        Receiver::handle_data(self, message)
    }

    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), Error> {
        Receiver::handle_digests(self, message, digests)
    }

    fn handle_trailer(&mut self, bytes: &[u8]) -> Result<(), Error> {
        Receiver::handle_trailer(self, bytes)
    }

    fn handle_forwarded(&mut self, message: u32) -> Result<(), Error> {
        Receiver::handle_forwarded(self, message)
    }

    fn in_place_written(&mut self, not_in_target: &[u32]) -> Result<InPlaceWritten, Error> {
        Ok(Receiver::in_place_written(self, not_in_target))
    }

    fn has_digest_mismatch(&mut self) -> Result<bool, Error> {
        Ok(self.digest_mismatch().is_some())
    }

    fn leftover(&mut self) -> Result<Option<RecvOp>, Error> {
        Ok(Receiver::leftover(self))
    }

    fn finish(self) -> Result<Received, Error> {
        Receiver::finish(self)
    }

    fn finish_keeping(self) -> Result<(Received, Option<KeptManifest>), Error> {
        Receiver::finish_keeping(self)
    }
}

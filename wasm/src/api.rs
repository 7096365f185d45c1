//! The guest's operations as plain Rust over pgt-core, shared by the raw ABI ([`crate::abi`]), the JS
//! build and native callers (tests compare native and sandboxed runs through these).

use alloc::string::ToString;
use alloc::vec::Vec;

use pgt_core::codec::{self, Header, Limits, Manifest, Metadata};
use pgt_core::plan::Plan;
use pgt_core::receiver::{Received, Receiver, RecvInto, RecvPoll};
use pgt_core::sender::{Payload, SendPoll};
use pgt_core::Result;

use crate::types::*;

/// Parses the header and decodes + validates the metadata under `limits`.
pub fn decode(header: &[u8], metadata: &[u8], limits: &Limits) -> Result<(Header, Manifest)> {
    let header = Header::parse(header, limits)?;
    let manifest = codec::decode(&header, metadata, limits)?;
    Ok((header, manifest))
}

/// The summary of a decoded transfer.
pub fn summary(header: &Header, manifest: &Manifest) -> Summary {
    let m = manifest.metadata();
    Summary {
        header: (*header).into(),
        step: m.step,
        source: m.source,
        destinations: m.destinations.clone(),
        plan: m.plan,
        digests: manifest.digests(),
        total_bytes: manifest.total_bytes(),
        tree: m.tree.clone(),
        leaves: m.leaves.clone(),
        paths: manifest.paths().iter().map(ToString::to_string).collect(),
        path_elems: manifest.paths().to_vec(),
        storages: storages(manifest),
    }
}

/// The storages of a manifest, mirrored.
pub fn storages(manifest: &Manifest) -> Vec<StorageW> {
    manifest
        .storages()
        .iter()
        .copied()
        .map(Into::into)
        .collect()
}

/// The plan of a decoded transfer whose metadata message is `metadata_len` bytes.
pub fn plan(manifest: &Manifest, metadata_len: u64) -> PlanW {
    let plan = Plan::new(manifest, metadata_len);
    PlanW {
        messages: plan
            .messages()
            .iter()
            .map(|msg| MessageW {
                kind: msg.kind.into(),
                tag: msg.tag,
                len: msg.len,
                segments: segments_to_w(plan.segments(msg)),
            })
            .collect(),
    }
}

/// Validates `metadata` (as a sender does) and encodes it: the header and metadata messages.
pub fn encode(metadata: Metadata, digests: bool, limits: &Limits) -> Result<Encoded> {
    let manifest = Manifest::new(metadata, digests, limits)?;
    let (header, metadata) = codec::encode(&manifest)?;
    Ok(Encoded {
        header: header.to_bytes().to_vec(),
        metadata,
    })
}

fn payload(p: Payload<'_>) -> PayloadW {
    match p {
        Payload::Bytes(b) => PayloadW::Bytes(b.to_vec()),
        Payload::Storages(s) => PayloadW::Storages(segments_to_w(s)),
    }
}

/// A sender's poll, owned and mirrored.
pub fn send_next(p: SendPoll<'_>) -> SendNextW {
    match p {
        SendPoll::Send(op) => SendNextW::Send(SendStepW {
            to: op.to,
            message: op.message as u64,
            tag: op.tag,
            len: op.len,
            payload: payload(op.payload),
            hash: op.hash,
        }),
        SendPoll::WaitDigests => SendNextW::WaitDigests,
        SendPoll::Done => SendNextW::Done,
    }
}

/// A receiver's poll, owned and mirrored.
pub fn recv_next(p: RecvPoll<'_>) -> RecvNextW {
    match p {
        RecvPoll::Recv(op) => RecvNextW::Recv(RecvStepW {
            from: op.from,
            message: op.message as u64,
            kind: op.kind.into(),
            tag: op.tag,
            len: op.len,
            segments: match op.into {
                RecvInto::Core => Vec::new(),
                RecvInto::Storages(s) => segments_to_w(s),
            },
            hash: op.hash,
        }),
        RecvPoll::NeedBindings => RecvNextW::NeedBindings,
        RecvPoll::Forward(op) => RecvNextW::Forward(ForwardStepW {
            to: op.to,
            message: op.message as u64,
            tag: op.tag,
            len: op.len,
            payload: payload(op.payload),
        }),
        RecvPoll::Wait => RecvNextW::Wait,
        RecvPoll::Done => RecvNextW::Done,
    }
}

/// What a receiver that accepted the metadata knows (for binding).
pub fn incoming(receiver: &Receiver) -> Result<IncomingRef<'_>, pgt_core::Error> {
    let m = receiver
        .manifest()
        .ok_or(pgt_core::Error::ProtocolState("no manifest"))?;
    Ok(IncomingRef {
        step: m.metadata().step,
        paths: m.paths(),
        storages: storages(m),
        total_bytes: m.total_bytes(),
    })
}

/// Every storage's binding, once bindings are finished.
pub fn bindings(receiver: &Receiver) -> Vec<BindingW> {
    receiver.bindings().into_iter().map(Into::into).collect()
}

/// The verified result, mirrored.
pub fn received(r: Received) -> ReceivedW {
    let meta = r.manifest.into_metadata();
    ReceivedW {
        step: meta.step,
        tree: meta.tree,
        leaves: r.leaves,
        bindings: r.bindings.into_iter().map(Into::into).collect(),
    }
}

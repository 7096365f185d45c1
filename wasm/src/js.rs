//! The JS API (feature "js", wasm-bindgen): functions and the `Sender` / `Receiver` classes on plain JS
//! objects in the JSON forms of [`crate::json`] (index.json's conventions: integers past 2^53 − 1 as
//! decimal strings, dtypes as torch names). Byte arrays are `Uint8Array`; digests are `bigint`.
//!
//! Errors are thrown as `Error` objects whose `name` is the pgt-core variant (`"BadMagic"`,
//! `"InPlaceSizeMismatch"`…; `"BadArgument"` / `"BadHandle"` for misuse), `message` its Display text, and
//! with extra properties `variant` (= name) and `pgt: true`.

use alloc::string::String;
use alloc::vec::Vec;

use js_sys::{Error as JsError, Reflect, Uint8Array, JSON};
use pgt_core::header::Limits;
use pgt_core::receiver::{Receiver as CoreReceiver, ReceiverOptions, RecvPoll};
use pgt_core::sender::{Payload, SendPoll, Sender as CoreSender};
use serde_json::{json, Value as Json};
use wasm_bindgen::prelude::*;

use crate::json::*;
use crate::types::{abi_error, ErrorInfo};
use crate::{api, json};

#[wasm_bindgen(typescript_custom_section)]
const TS_TYPES: &'static str = r#"
/** An unsigned integer: a number up to 2^53 - 1, else a decimal string. */
export type U64 = number | string;
/** Caps on untrusted metadata; missing fields take the defaults (see defaultLimits()). */
export interface Limits {
  max_metadata_bytes?: U64; max_leaves?: U64; max_depth?: number; max_ndim?: number;
  max_total_bytes?: U64; max_messages?: U64;
}
/** A storage byte range; `completes`: the storage's last bytes (finish its digest here). */
export interface Segment { storage: number; offset: U64; len: U64; completes: boolean }
export interface StorageInfo { leaf: number; shard: number; nbytes: U64; dtype: string }
export type PathElem = { key: string } | { int_key: U64 } | { index: U64 };
export type TreeNode = "leaf" | { list: U64 } | { tuple: U64 } | { dict: (string | { int: U64 })[] };
/** A leaf in the form of tests/vectors/index.json: {kind: "value" | "tensor" | "dtensor" | "sharded_tensor", …}. */
export type Leaf = { kind: string; [field: string]: unknown };
export interface PlanParams { fanout: "Chain" | "Direct"; bucket_size: U64; chunk_size: U64 }
/** What encode() takes (a Summary works too). */
export interface MetadataInput {
  step: U64 | null; source: number; destinations: number[]; plan: PlanParams; tree: TreeNode[]; leaves: Leaf[];
}
/** What a header + metadata decode to: index.json's manifest without messages, plus tree. */
export interface Summary extends MetadataInput {
  header: { version: number; flags: number; metadata_len: U64; metadata_digest: string; transfer_id: string };
  digests: boolean; leaf_count: number; storage_count: number; total_bytes: U64;
  paths: string[]; path_elems: PathElem[][]; storages: StorageInfo[];
}
export type MessageKind = "header" | "metadata" | "data" | "trailer";
export interface Message { kind: MessageKind; tag: U64; len: U64; segments: Segment[] }
export interface Encoded { header: Uint8Array; metadata: Uint8Array }
/**
 * `prefix`: the transfer id every message after the header starts with, as "0x" and 16 hex digits (its 8
 * bytes are the id little-endian); null for the header. Header, metadata and trailer bytes already start
 * with it; a data message is those 8 bytes, then its segments' bytes.
 */
export type Prefix = string | null;
/** A send's bytes: sender.bytes(message) for header, metadata and trailer; the prefix, then the plan's segments for data. */
export type SendOp =
  | { type: "send"; to: number; message: number; kind: MessageKind; tag: U64; len: U64; hash: boolean; prefix: Prefix }
  | { type: "wait_digests" } | { type: "done" };
/**
 * A data receive takes the prefix, then lands in the plan's segments; a forward sends the prefix and
 * them (or, for the trailer, the bytes received). A message whose first 8 bytes are not the prefix is
 * stale: skip it and receive the next one with the tag.
 */
export type RecvOp =
  | { type: "recv"; from: number; message: number; kind: MessageKind; tag: U64; len: U64; hash: boolean; prefix: Prefix }
  | { type: "need_bindings" }
  | { type: "forward"; to: number; message: number; kind: MessageKind; tag: U64; len: U64; prefix: Prefix }
  | { type: "wait" } | { type: "done" };
export interface ReceiverOptions { rank: number; source: number; expected_step?: U64 | null; limits?: Limits }
export interface Incoming { transfer_id: string; step: U64 | null; storages: StorageInfo[]; total_bytes: U64; plan: Message[] }
export interface InPlaceTarget { storage: number; id: U64; dtype: string; nbytes: U64 }
export interface BindingInfo { dest: "fresh" | { in_place: U64 }; dtype: string; nbytes: U64; cast_from: string | null }
export interface Received { step: U64 | null; tree: TreeNode[]; leaves: Leaf[]; bindings: BindingInfo[] }
"#;

fn throw(info: ErrorInfo) -> JsValue {
    let e = JsError::new(&info.message);
    e.set_name(&info.name);
    let _ = Reflect::set(&e, &"variant".into(), &info.name.as_str().into());
    let _ = Reflect::set(&e, &"pgt".into(), &JsValue::TRUE);
    e.into()
}

fn core_err(e: pgt_core::Error) -> JsValue {
    throw(ErrorInfo::from_core(e))
}

fn bad_argument(message: String) -> JsValue {
    throw(ErrorInfo::abi(abi_error::BAD_ARGUMENT, &message))
}

fn to_js(j: &Json) -> JsValue {
    // serde_json always produces valid JSON.
    JSON::parse(&j.to_string()).unwrap_or(JsValue::NULL)
}

fn from_js(v: &JsValue, what: &str) -> Result<Json, JsValue> {
    if v.is_undefined() || v.is_null() {
        return Ok(Json::Null);
    }
    let s = JSON::stringify(v)
        .map_err(|_| bad_argument(alloc::format!("{what}: not JSON-serializable (bigint?)")))?;
    let s: String = s.into();
    serde_json::from_str(&s).map_err(|e| bad_argument(alloc::format!("{what}: {e}")))
}

fn limits_arg(v: &JsValue) -> Result<Limits, JsValue> {
    match from_js(v, "limits")? {
        Json::Null => Ok(Limits::default()),
        j => limits_from_json(&j).map_err(bad_argument),
    }
}

fn set(obj: &JsValue, key: &str, value: &JsValue) {
    let _ = Reflect::set(obj, &key.into(), value);
}

/// The default limits.
#[wasm_bindgen(js_name = defaultLimits, unchecked_return_type = "Limits")]
pub fn default_limits() -> JsValue {
    to_js(&limits_json(&Limits::default()))
}

/// The wire protocol version this module speaks.
#[wasm_bindgen(js_name = protocolVersion)]
pub fn protocol_version() -> u32 {
    u32::from(pgt_core::header::VERSION)
}

/// Parses `header` and decodes + validates `metadata` (optionally under `limits`). Throws a pgt error.
#[wasm_bindgen(js_name = decodeMetadata, unchecked_return_type = "Summary")]
pub fn decode_metadata(
    header: &[u8],
    metadata: &[u8],
    #[wasm_bindgen(unchecked_param_type = "Limits | undefined")] limits: JsValue,
) -> Result<JsValue, JsValue> {
    let limits = limits_arg(&limits)?;
    let (h, m) = api::decode(header, metadata, &limits).map_err(core_err)?;
    Ok(to_js(&summary_json(&api::summary(&h, &m))))
}

/// The transfer plan of a header + metadata: every wire message, in order.
#[wasm_bindgen(unchecked_return_type = "Message[]")]
pub fn plan(
    header: &[u8],
    metadata: &[u8],
    #[wasm_bindgen(unchecked_param_type = "Limits | undefined")] limits: JsValue,
) -> Result<JsValue, JsValue> {
    let limits = limits_arg(&limits)?;
    let (h, m) = api::decode(header, metadata, &limits).map_err(core_err)?;
    Ok(to_js(&plan_json(&m.plan(h.metadata_len))))
}

fn metadata_arg(v: &JsValue) -> Result<pgt_core::schema::Metadata, JsValue> {
    json::metadata_from_json(&from_js(v, "metadata")?).map_err(bad_argument)
}

/// Validates metadata as a sender does and encodes it for transfer `transferId` (a u64 bigint):
/// `{header, metadata}` messages.
#[wasm_bindgen(unchecked_return_type = "Encoded")]
pub fn encode(
    #[wasm_bindgen(unchecked_param_type = "MetadataInput")] metadata: JsValue,
    digests: bool,
    #[wasm_bindgen(unchecked_param_type = "Limits | undefined")] limits: JsValue,
    #[wasm_bindgen(js_name = transferId)] transfer_id: u64,
) -> Result<JsValue, JsValue> {
    let limits = limits_arg(&limits)?;
    let e =
        api::encode(metadata_arg(&metadata)?, digests, &limits, transfer_id).map_err(core_err)?;
    let obj = to_js(&json!({}));
    set(
        &obj,
        "header",
        &Uint8Array::from(e.header.as_slice()).into(),
    );
    set(
        &obj,
        "metadata",
        &Uint8Array::from(e.metadata.as_slice()).into(),
    );
    Ok(obj)
}

/// The sender state machine of one transfer.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Sender {
    inner: CoreSender,
}

#[wasm_bindgen]
impl Sender {
    /// Validates and encodes `metadata`; `digests`: send a digest trailer; `transferId`: this
    /// transfer's id (a u64 bigint, random: every message after the header starts with it).
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(unchecked_param_type = "MetadataInput")] metadata: JsValue,
        digests: bool,
        #[wasm_bindgen(unchecked_param_type = "Limits | undefined")] limits: JsValue,
        #[wasm_bindgen(js_name = transferId)] transfer_id: u64,
    ) -> Result<Sender, JsValue> {
        let limits = limits_arg(&limits)?;
        let inner = CoreSender::new(metadata_arg(&metadata)?, digests, &limits, transfer_id)
            .map_err(core_err)?;
        Ok(Sender { inner })
    }

    /// The plan: every wire message, with the storage segments of the data messages.
    #[wasm_bindgen(unchecked_return_type = "Message[]")]
    pub fn plan(&self) -> JsValue {
        to_js(&plan_json(self.inner.plan()))
    }

    #[wasm_bindgen(js_name = headerBytes)]
    pub fn header_bytes(&self) -> Vec<u8> {
        self.inner.header_bytes().to_vec()
    }

    #[wasm_bindgen(js_name = metadataBytes)]
    pub fn metadata_bytes(&self) -> Vec<u8> {
        self.inner.metadata_bytes().to_vec()
    }

    #[wasm_bindgen(unchecked_return_type = "SendOp")]
    pub fn poll(&mut self) -> JsValue {
        match self.inner.poll() {
            SendPoll::Send(op) => to_js(&json!({
                "type": "send", "to": op.to, "message": op.message, "kind": kind_name(op.kind),
                "tag": uint(op.tag), "len": uint(op.len), "hash": op.hash,
                "prefix": op.prefix.map(hex64),
            })),
            SendPoll::WaitDigests => to_js(&json!({"type": "wait_digests"})),
            SendPoll::Done => to_js(&json!({"type": "done"})),
        }
    }

    /// The bytes of header, metadata or trailer message `message` (once polled).
    pub fn bytes(&self, message: u32) -> Result<Vec<u8>, JsValue> {
        match self.inner.payload(message).map_err(core_err)? {
            Payload::Bytes(b) => Ok(b.to_vec()),
            Payload::Storages { .. } => Err(core_err(pgt_core::Error::MessageNotOutstanding {
                message: message.into(),
            })),
        }
    }

    /// The digests data message `message` completes, in segment order.
    #[wasm_bindgen(js_name = handleDigests)]
    pub fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), JsValue> {
        self.inner
            .handle_digests(message, digests)
            .map_err(core_err)
    }
}

#[wasm_bindgen]
#[derive(Debug)]
pub struct Receiver {
    inner: Option<CoreReceiver>,
}

#[wasm_bindgen]
impl Receiver {
    /// A receiver waiting for the header.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(unchecked_param_type = "ReceiverOptions")] options: JsValue,
    ) -> Result<Receiver, JsValue> {
        let o = from_js(&options, "options")?;
        let u32_of = |k: &str| -> Result<u32, JsValue> {
            let v = o
                .get(k)
                .ok_or_else(|| bad_argument(alloc::format!("options: missing \"{k}\"")))?;
            let v = as_u64(v, k).map_err(bad_argument)?;
            u32::try_from(v).map_err(|_| bad_argument(alloc::format!("options.{k}: too large")))
        };
        let expected_step = match o.get("expected_step") {
            None | Some(Json::Null) => None,
            Some(s) => Some(as_u64(s, "expected_step").map_err(bad_argument)?),
        };
        let limits = match o.get("limits") {
            None | Some(Json::Null) => Limits::default(),
            Some(l) => limits_from_json(l).map_err(bad_argument)?,
        };
        Ok(Receiver {
            inner: Some(CoreReceiver::new(ReceiverOptions {
                rank: u32_of("rank")?,
                source: u32_of("source")?,
                expected_step,
                limits,
            })),
        })
    }

    fn get(&mut self) -> Result<&mut CoreReceiver, JsValue> {
        self.inner.as_mut().ok_or_else(|| {
            throw(ErrorInfo::abi(
                abi_error::BAD_HANDLE,
                "the receiver has finished",
            ))
        })
    }

    /// The next operation.
    #[wasm_bindgen(unchecked_return_type = "RecvOp")]
    pub fn poll(&mut self) -> Result<JsValue, JsValue> {
        Ok(match self.get()?.poll() {
            RecvPoll::Recv(op) => to_js(&recv_op_json(&op)),
            RecvPoll::NeedBindings => to_js(&json!({"type": "need_bindings"})),
            RecvPoll::Forward(op) => to_js(&json!({
                "type": "forward", "to": op.to, "message": op.message, "kind": kind_name(op.kind),
                "tag": uint(op.tag), "len": uint(op.len), "prefix": op.prefix.map(hex64),
            })),
            RecvPoll::Wait => to_js(&json!({"type": "wait"})),
            RecvPoll::Done => to_js(&json!({"type": "done"})),
        })
    }

    /// Hands over the header message.
    #[wasm_bindgen(js_name = handleHeader)]
    pub fn handle_header(&mut self, bytes: &[u8]) -> Result<(), JsValue> {
        self.get()?.handle_header(bytes).map_err(core_err)
    }

    /// Hands over the metadata message; returns what binding needs.
    #[wasm_bindgen(js_name = handleMetadata, unchecked_return_type = "Incoming")]
    pub fn handle_metadata(&mut self, bytes: &[u8]) -> Result<JsValue, JsValue> {
        let r = self.get()?;
        r.handle_metadata(bytes).map_err(core_err)?;
        let m = r.incoming().map_err(core_err)?;
        Ok(to_js(&json!({
            "transfer_id": hex64(m.transfer_id),
            "step": m.step.map(uint),
            "storages": storages_json(&m.storages),
            "total_bytes": uint(m.total_bytes),
            "plan": plan_json(&m.plan),
        })))
    }

    /// Every leaf's key path (after the metadata).
    #[wasm_bindgen(unchecked_return_type = "PathElem[][]")]
    pub fn paths(&mut self) -> Result<JsValue, JsValue> {
        Ok(to_js(&paths_json(self.get()?.paths().map_err(core_err)?)))
    }

    /// Ends binding: each target binds its storage in place, every other storage is fresh.
    #[wasm_bindgen(js_name = finishBindings, unchecked_return_type = "BindingInfo[]")]
    pub fn finish_bindings(
        &mut self,
        #[wasm_bindgen(unchecked_param_type = "InPlaceTarget[] | undefined")] targets: JsValue,
    ) -> Result<JsValue, JsValue> {
        let targets = match from_js(&targets, "targets")? {
            Json::Null => Vec::new(),
            Json::Array(a) => a
                .iter()
                .map(in_place_from)
                .collect::<Result<Vec<_>, String>>()
                .map_err(bad_argument)?,
            _ => return Err(bad_argument("targets: not an array".into())),
        };
        let b = self.get()?.finish_bindings(&targets).map_err(core_err)?;
        Ok(to_js(&Json::Array(b.iter().map(binding_json).collect())))
    }

    #[wasm_bindgen(js_name = handleData)]
    pub fn handle_data(&mut self, message: u32) -> Result<(), JsValue> {
        self.get()?.handle_data(message).map_err(core_err)
    }

    /// The digests data message `message` completes, in segment order.
    #[wasm_bindgen(js_name = handleDigests)]
    pub fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), JsValue> {
        self.get()?
            .handle_digests(message, digests)
            .map_err(core_err)
    }

    #[wasm_bindgen(js_name = handleTrailer)]
    pub fn handle_trailer(&mut self, bytes: &[u8]) -> Result<(), JsValue> {
        self.get()?.handle_trailer(bytes).map_err(core_err)
    }

    /// Reports that forward `message` has been sent.
    #[wasm_bindgen(js_name = handleForwarded)]
    pub fn handle_forwarded(&mut self, message: u32) -> Result<(), JsValue> {
        self.get()?.handle_forwarded(message).map_err(core_err)
    }

    /// After an error: the next message the failed transfer's plan still says is coming (a "recv" op),
    /// which the host receives and discards so that the next transfer on the link starts clean; null
    /// when none is left or nothing is known. The first call ends the transfer.
    #[wasm_bindgen(unchecked_return_type = "RecvOp | null")]
    pub fn leftover(&mut self) -> Result<JsValue, JsValue> {
        Ok(match self.get()?.leftover() {
            Some(op) => to_js(&recv_op_json(&op)),
            None => JsValue::NULL,
        })
    }

    /// The verified result (once poll() said "done"); the receiver is finished afterwards.
    #[wasm_bindgen(unchecked_return_type = "Received")]
    pub fn finish(&mut self) -> Result<JsValue, JsValue> {
        let r = self.inner.take().ok_or_else(|| {
            throw(ErrorInfo::abi(
                abi_error::BAD_HANDLE,
                "the receiver has finished",
            ))
        })?;
        let r = r.finish().map_err(core_err)?;
        Ok(to_js(&json!({
            "step": r.step.map(uint),
            "tree": r.tree.iter().map(node_json).collect::<Vec<_>>(),
            "leaves": r.leaves.iter().map(leaf_json).collect::<Vec<_>>(),
            "bindings": r.bindings.iter().map(binding_json).collect::<Vec<_>>(),
        })))
    }
}

fn recv_op_json(op: &pgt_core::receiver::RecvOp) -> Json {
    json!({
        "type": "recv", "from": op.from, "message": op.message, "kind": kind_name(op.kind),
        "tag": uint(op.tag), "len": uint(op.len), "hash": op.hash, "prefix": op.prefix.map(hex64),
    })
}

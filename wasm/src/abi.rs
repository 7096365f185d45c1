//! The raw ABI: C-ABI exports over linear memory, importing nothing. See `wasm/ABI.md`.
//!
//! Every function that returns a `*const u8` returns a *result block* in guest memory: a little-endian
//! `u32` status ([`crate::types::status`]), a little-endian `u32` payload length, then the payload (postcard
//! of the function's result type, or of an [`ErrorInfo`]). The block stays valid until the next call of any
//! block-returning function; the host copies it out and never frees it.
//!
//! Inputs are byte ranges the host wrote into buffers from [`pgt_alloc`] (and frees with [`pgt_free`]
//! after the call). A zero length needs no buffer (any pointer, e.g. 0).

use alloc::vec::Vec;
use core::cell::UnsafeCell;

use pgt_core::header::{Header, Limits};
use pgt_core::manifest::Manifest;
use pgt_core::receiver::{InPlace, Receiver, ReceiverOptions};
use pgt_core::sender::{Payload, Sender};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api;
use crate::types::{abi_error, status, ErrorInfo, SenderCreated};

#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // A panic is a bug (pgt-core reports every bad input as an error); the host sees a trap.
    core::arch::wasm32::unreachable()
}

struct State {
    result: Vec<u8>,
    senders: Vec<Option<Sender>>,
    receivers: Vec<Option<Receiver>>,
}

struct Global(UnsafeCell<State>);

// SAFETY: wasm32-unknown-unknown without the atomics feature has one thread.
unsafe impl Sync for Global {}

static STATE: Global = Global(UnsafeCell::new(State {
    result: Vec::new(),
    senders: Vec::new(),
    receivers: Vec::new(),
}));

fn state() -> &'static mut State {
    // SAFETY: one thread, and no export calls another export or back into the host (the module imports
    // nothing), so at most one of these references is live at a time.
    unsafe { &mut *STATE.0.get() }
}

enum Fail {
    Core(pgt_core::Error),
    Abi(&'static str, &'static str),
}

impl From<pgt_core::Error> for Fail {
    fn from(e: pgt_core::Error) -> Fail {
        Fail::Core(e)
    }
}

fn bad_argument(what: &'static str) -> Fail {
    Fail::Abi(abi_error::BAD_ARGUMENT, what)
}

fn bad_handle() -> Fail {
    Fail::Abi(abi_error::BAD_HANDLE, "no live instance has this handle")
}

/// Writes the result block for `r` and returns its address.
fn respond<T: Serialize>(r: Result<T, Fail>) -> *const u8 {
    let mut buf = core::mem::take(&mut state().result);
    buf.clear();
    buf.extend_from_slice(&[0; 8]);
    let (code, buf) = match r {
        Ok(v) => (status::OK, postcard::to_extend(&v, buf)),
        Err(Fail::Core(e)) => (
            status::ERROR,
            postcard::to_extend(&ErrorInfo::from_core(e), buf),
        ),
        Err(Fail::Abi(name, message)) => (
            status::ABI_ERROR,
            postcard::to_extend(&ErrorInfo::abi(name, message), buf),
        ),
    };
    // Serializing these types into a Vec cannot fail (no unknown-length sequences, no custom errors).
    let mut buf = buf.unwrap_or_else(|_| core::arch::wasm32::unreachable());
    let len = (buf.len() - 8) as u32;
    buf[0..4].copy_from_slice(&code.to_le_bytes());
    buf[4..8].copy_from_slice(&len.to_le_bytes());
    let st = state();
    st.result = buf;
    st.result.as_ptr()
}

fn run<T: Serialize>(f: impl FnOnce() -> Result<T, Fail>) -> *const u8 {
    respond(f())
}

/// The bytes the host passed.
///
/// # Safety
/// `ptr..ptr + len` must be readable guest memory (from [`pgt_alloc`]) when `len > 0`.
unsafe fn input<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { core::slice::from_raw_parts(ptr, len) }
    }
}

fn from_postcard<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, Fail> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((v, [])) => Ok(v),
        _ => Err(bad_argument(what)),
    }
}

/// Limits from their postcard bytes; empty means `Limits::default()`.
fn limits(bytes: &[u8]) -> Result<Limits, Fail> {
    if bytes.is_empty() {
        return Ok(Limits::default());
    }
    from_postcard::<Limits>(bytes, "limits are not postcard Limits")
}

/// The postcard `Vec<u32>` the host passed; no bytes at all is the empty list.
///
/// # Safety
/// As [`input`].
unsafe fn u32_list(ptr: *const u8, len: usize, what: &'static str) -> Result<Vec<u32>, Fail> {
    // SAFETY: the caller's contract.
    match unsafe { input(ptr, len) } {
        [] => Ok(Vec::new()),
        bytes => from_postcard(bytes, what),
    }
}

fn flag(v: u32) -> Result<bool, Fail> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(bad_argument("a flag must be 0 or 1")),
    }
}

fn digests(bytes: &[u8]) -> Result<Vec<u64>, Fail> {
    api::digests_from_le(bytes)
        .ok_or_else(|| bad_argument("digests are 8 little-endian bytes each"))
}

/// The arguments of `pgt_decode` and `pgt_plan`: header, metadata and limits, decoded and validated.
fn decoded(
    header: &[u8],
    metadata: &[u8],
    limits_bytes: &[u8],
) -> Result<(Header, Manifest), Fail> {
    let limits = limits(limits_bytes)?;
    Ok(api::decode(header, metadata, &limits)?)
}

/// A transfer id from its two 32-bit halves (arguments are wasm `i32`s).
fn transfer_id(lo: u32, hi: u32) -> u64 {
    u64::from(hi) << 32 | u64::from(lo)
}

fn insert<T>(slab: &mut Vec<Option<T>>, v: T) -> u32 {
    let i = match slab.iter().position(Option::is_none) {
        Some(i) => {
            slab[i] = Some(v);
            i
        }
        None => {
            slab.push(Some(v));
            slab.len() - 1
        }
    };
    i as u32 + 1
}

fn slot<T>(slab: &mut [Option<T>], handle: u32) -> Result<&mut Option<T>, Fail> {
    let i = (handle as usize).checked_sub(1).ok_or_else(bad_handle)?;
    match slab.get_mut(i) {
        Some(s @ Some(_)) => Ok(s),
        _ => Err(bad_handle()),
    }
}

fn sender(handle: u32) -> Result<&'static mut Sender, Fail> {
    slot(&mut state().senders, handle)?
        .as_mut()
        .ok_or_else(bad_handle)
}

fn receiver(handle: u32) -> Result<&'static mut Receiver, Fail> {
    slot(&mut state().receivers, handle)?
        .as_mut()
        .ok_or_else(bad_handle)
}

// ---- memory and versions ----

/// Version of this ABI ([`crate::types::ABI_VERSION`]).
#[no_mangle]
pub extern "C" fn pgt_abi_version() -> u32 {
    crate::types::ABI_VERSION
}

/// Version of the wire protocol the module speaks.
#[no_mangle]
pub extern "C" fn pgt_protocol_version() -> u32 {
    u32::from(pgt_core::header::VERSION)
}

/// Allocates `len` bytes for an input; returns 0 when out of memory. `len == 0` gives a dangling,
/// non-null pointer that must not be written.
#[no_mangle]
pub extern "C" fn pgt_alloc(len: usize) -> *mut u8 {
    if len == 0 {
        return core::ptr::NonNull::<u8>::dangling().as_ptr();
    }
    match core::alloc::Layout::from_size_align(len, 1) {
        // SAFETY: the layout has a non-zero size.
        Ok(layout) => unsafe { alloc::alloc::alloc(layout) },
        Err(_) => core::ptr::null_mut(),
    }
}

/// Frees a buffer from [`pgt_alloc`].
///
/// # Safety
/// `ptr` and `len` must be exactly those of one [`pgt_alloc`] call, freed once.
#[no_mangle]
pub unsafe extern "C" fn pgt_free(ptr: *mut u8, len: usize) {
    if len == 0 || ptr.is_null() {
        return;
    }
    if let Ok(layout) = core::alloc::Layout::from_size_align(len, 1) {
        // SAFETY: the caller's contract: allocated by `pgt_alloc(len)` with this layout.
        unsafe { alloc::alloc::dealloc(ptr, layout) }
    }
}

/// `Limits::default()` as postcard `Limits`.
#[no_mangle]
pub extern "C" fn pgt_default_limits() -> *const u8 {
    respond::<Limits>(Ok(Limits::default()))
}

// ---- stateless ----

/// Parses the header and decodes + validates the metadata under the limits (postcard `Limits`, or
/// empty for the defaults). Result: `Summary`.
///
/// # Safety
/// Each `(ptr, len)` must be readable guest memory (see [`input`]).
#[no_mangle]
pub unsafe extern "C" fn pgt_decode(
    header: *const u8,
    header_len: usize,
    metadata: *const u8,
    metadata_len: usize,
    limits_ptr: *const u8,
    limits_len: usize,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let (h, m, l) = unsafe {
        (
            input(header, header_len),
            input(metadata, metadata_len),
            input(limits_ptr, limits_len),
        )
    };
    run(|| {
        let (header, manifest) = decoded(h, m, l)?;
        Ok(api::summary(&header, &manifest))
    })
}

/// Like [`pgt_decode`], but the result is the transfer plan: `Plan`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_plan(
    header: *const u8,
    header_len: usize,
    metadata: *const u8,
    metadata_len: usize,
    limits_ptr: *const u8,
    limits_len: usize,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let (h, m, l) = unsafe {
        (
            input(header, header_len),
            input(metadata, metadata_len),
            input(limits_ptr, limits_len),
        )
    };
    run(|| {
        let (header, manifest) = decoded(h, m, l)?;
        Ok(manifest.plan(header.metadata_len))
    })
}

/// Validates metadata (postcard `pgt_core::schema::Metadata`, the metadata message's schema) as a sender
/// does and encodes it. `digests`: 0 or 1. Result: `Encoded` (header and metadata messages).
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_encode(
    metadata: *const u8,
    metadata_len: usize,
    digests: u32,
    limits_ptr: *const u8,
    limits_len: usize,
    transfer_id_lo: u32,
    transfer_id_hi: u32,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let (m, l) = unsafe { (input(metadata, metadata_len), input(limits_ptr, limits_len)) };
    run(|| {
        let digests = flag(digests)?;
        let limits = limits(l)?;
        let id = transfer_id(transfer_id_lo, transfer_id_hi);
        Ok(api::encode_postcard(m, digests, &limits, id)?)
    })
}

// ---- sender ----

/// A sender for metadata (postcard `Metadata`), validated under the limits. Result: `SenderCreated`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_sender_new(
    metadata: *const u8,
    metadata_len: usize,
    digests: u32,
    limits_ptr: *const u8,
    limits_len: usize,
    transfer_id_lo: u32,
    transfer_id_hi: u32,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let (m, l) = unsafe { (input(metadata, metadata_len), input(limits_ptr, limits_len)) };
    run(|| {
        let digests = flag(digests)?;
        let limits = limits(l)?;
        let id = transfer_id(transfer_id_lo, transfer_id_hi);
        let sender = Sender::from_postcard(m, digests, &limits, id)?;
        let plan = sender.plan().clone();
        let handle = insert(&mut state().senders, sender);
        Ok(SenderCreated { handle, plan })
    })
}

/// The sender's next send. Result: `SendPoll`.
#[no_mangle]
pub extern "C" fn pgt_sender_poll(handle: u32) -> *const u8 {
    respond(sender(handle).map(|s| s.poll()))
}

/// The bytes of header, metadata or trailer message `message` (once polled). Result: `Vec<u8>`.
#[no_mangle]
pub extern "C" fn pgt_sender_bytes(handle: u32, message: u32) -> *const u8 {
    run(|| match sender(handle)?.payload(message)? {
        Payload::Bytes(b) => Ok(b),
        Payload::Storages { .. } => Err(Fail::Core(pgt_core::Error::MessageNotOutstanding {
            message: message.into(),
        })),
    })
}

/// Reports the digests data message `message` completes: `len / 8` little-endian `u64`s, in segment
/// order. Result: `()`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_sender_digests(
    handle: u32,
    message: u32,
    ptr: *const u8,
    len: usize,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let bytes = unsafe { input(ptr, len) };
    run(|| Ok(sender(handle)?.handle_digests(message, &digests(bytes)?)?))
}

/// Where the send stands once the destinations in `failed` (postcard `Vec<u32>`; empty: none) failed:
/// pgt-core's `Sender::destination_outcome`, the policy every host applies. Result:
/// `DestinationOutcome`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_sender_destination_outcome(
    handle: u32,
    ptr: *const u8,
    len: usize,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let failed = unsafe { u32_list(ptr, len, "ranks are not postcard Vec<u32>") };
    run(|| Ok(sender(handle)?.destination_outcome(&failed?)))
}

/// Frees a sender. Result: `()`.
#[no_mangle]
pub extern "C" fn pgt_sender_drop(handle: u32) -> *const u8 {
    respond(slot(&mut state().senders, handle).map(|s| *s = None))
}

// ---- receiver ----

/// A receiver with these options (postcard `ReceiverOptions`). Result: the handle, a `u32`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_receiver_new(options: *const u8, options_len: usize) -> *const u8 {
    // SAFETY: the caller's contract.
    let o = unsafe { input(options, options_len) };
    run(|| {
        let options: ReceiverOptions =
            from_postcard(o, "options are not postcard ReceiverOptions")?;
        Ok(insert(&mut state().receivers, Receiver::new(options)))
    })
}

/// The receiver's next step. Result: `RecvPoll`.
#[no_mangle]
pub extern "C" fn pgt_receiver_poll(handle: u32) -> *const u8 {
    respond(receiver(handle).map(|r| r.poll()))
}

/// Hands over the header message. Result: `()`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_receiver_header(handle: u32, ptr: *const u8, len: usize) -> *const u8 {
    // SAFETY: the caller's contract.
    let bytes = unsafe { input(ptr, len) };
    run(|| Ok(receiver(handle)?.handle_header(bytes)?))
}

/// Hands over the metadata message. Result: `Incoming` (storages, plan).
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_receiver_metadata(
    handle: u32,
    ptr: *const u8,
    len: usize,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let bytes = unsafe { input(ptr, len) };
    run(|| {
        let r = receiver(handle)?;
        r.handle_metadata(bytes)?;
        Ok(r.incoming()?)
    })
}

/// The received tree's nodes, pre-order (after the metadata). Result: `Vec<Node>`.
#[no_mangle]
pub extern "C" fn pgt_receiver_tree(handle: u32) -> *const u8 {
    run(|| Ok(receiver(handle)?.tree()?))
}

/// Every leaf's key path (after the metadata). Result: `Vec<KeyPath>`.
#[no_mangle]
pub extern "C" fn pgt_receiver_paths(handle: u32) -> *const u8 {
    run(|| Ok(receiver(handle)?.paths()?))
}

/// Ends binding: the in-place targets (postcard `Vec<InPlace>`), every other storage fresh. Result:
/// every storage's binding, `Vec<Binding>`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_receiver_bind(handle: u32, ptr: *const u8, len: usize) -> *const u8 {
    // SAFETY: the caller's contract.
    let bytes = unsafe { input(ptr, len) };
    run(|| {
        let targets: Vec<InPlace> = from_postcard(bytes, "targets are not postcard Vec<InPlace>")?;
        Ok(receiver(handle)?.finish_bindings(&targets)?)
    })
}

/// Data message `message` has landed. Result: `()`.
#[no_mangle]
pub extern "C" fn pgt_receiver_data(handle: u32, message: u32) -> *const u8 {
    run(|| Ok(receiver(handle)?.handle_data(message)?))
}

/// Reports the digests data message `message` completes, as [`pgt_sender_digests`]. Result: `()`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_receiver_digests(
    handle: u32,
    message: u32,
    ptr: *const u8,
    len: usize,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let bytes = unsafe { input(ptr, len) };
    run(|| Ok(receiver(handle)?.handle_digests(message, &digests(bytes)?)?))
}

/// Hands over the trailer message. Result: `()`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_receiver_trailer(
    handle: u32,
    ptr: *const u8,
    len: usize,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let bytes = unsafe { input(ptr, len) };
    run(|| Ok(receiver(handle)?.handle_trailer(bytes)?))
}

/// Forward `message` has been sent. Result: `()`.
#[no_mangle]
pub extern "C" fn pgt_receiver_forwarded(handle: u32, message: u32) -> *const u8 {
    run(|| Ok(receiver(handle)?.handle_forwarded(message)?))
}

/// What the transfer has written in place so far (pgt-core's `Receiver::in_place_written`), given the
/// in-place storages whose landed bytes are not in their target (postcard `Vec<u32>`; empty: none). Ask
/// before `pgt_receiver_leftover`, and before `pgt_receiver_finish` when it will fail on a digest
/// mismatch (`pgt_receiver_digest_mismatch`). Result: `InPlaceWritten`.
///
/// # Safety
/// As [`pgt_decode`].
#[no_mangle]
pub unsafe extern "C" fn pgt_receiver_in_place_written(
    handle: u32,
    ptr: *const u8,
    len: usize,
) -> *const u8 {
    // SAFETY: the caller's contract.
    let storages = unsafe { u32_list(ptr, len, "storages are not postcard Vec<u32>") };
    run(|| Ok(receiver(handle)?.in_place_written(&storages?)))
}

/// Whether a storage's digest mismatched so far (pgt-core's `Receiver::digest_mismatch`): once the
/// receiver is done, the one thing `pgt_receiver_finish` refuses. Result: `bool`.
#[no_mangle]
pub extern "C" fn pgt_receiver_digest_mismatch(handle: u32) -> *const u8 {
    respond(receiver(handle).map(|r| r.digest_mismatch().is_some()))
}

/// After an error: the next message the failed transfer's plan still says is coming, which the host
/// receives and discards (pgt-core's `Receiver::leftover`; the first call ends the transfer). Result:
/// `Option<RecvOp>`.
#[no_mangle]
pub extern "C" fn pgt_receiver_leftover(handle: u32) -> *const u8 {
    run(|| Ok(receiver(handle)?.leftover()))
}

/// The verified result; frees the receiver whatever the outcome. Result: `Received`.
#[no_mangle]
pub extern "C" fn pgt_receiver_finish(handle: u32) -> *const u8 {
    run(|| {
        let r = slot(&mut state().receivers, handle)?
            .take()
            .ok_or_else(bad_handle)?;
        Ok(r.finish()?)
    })
}

/// Frees a receiver. Result: `()`.
#[no_mangle]
pub extern "C" fn pgt_receiver_drop(handle: u32) -> *const u8 {
    respond(slot(&mut state().receivers, handle).map(|s| *s = None))
}

//! `WasmEngine`: pgt-core inside a wasmtime sandbox, behind the same engine traits as
//! [`crate::engine::NativeEngine`], so a [`crate::transport::Transport`] runs unchanged with every
//! protocol decision — decoding untrusted metadata, validation, the plan, the state machines — made by
//! the guest. The host only moves bytes: tensor bytes never enter the guest's memory.
//!
//! The module is pgt-wasm's raw ABI (`wasm/ABI.md`), built by `scripts/build-wasm.sh` and embedded at
//! build time (see `host/build.rs`). It is compiled once per [`WasmEngine`]; every sender, receiver and
//! one-off call gets a fresh instance in its own [`Store`] with:
//! - **fuel**: each call into the guest may run at most [`WasmLimits::fuel_per_call`] units (about one per
//!   wasm instruction); running out is [`SandboxError::OutOfFuel`];
//! - **memory**: the guest's linear memory may not grow past [`WasmLimits::max_memory_bytes`]
//!   ([`SandboxError::OutOfMemory`]), one instance, one memory, one table of bounded size.
//!
//! A guest that traps is poisoned ([`SandboxError::Poisoned`] from then on) and dropped with its transfer;
//! the engine and later transfers are unaffected. Protocol errors come back as the very
//! `pgt_core::Error` a native core returns (it crosses the boundary as itself), so callers match errors
//! the same way with either engine. The exports are typed once, in `Exports`: a wrong signature fails
//! when the module is loaded, a wrong name does not compile.

use std::borrow::Cow;
use std::path::Path;

use pgt_core::engine::{ReceiveEngine, SendEngine};
use pgt_core::header::Limits;
use pgt_core::plan::Plan;
use pgt_core::receiver::{
    Binding, InPlace, InPlaceWritten, Incoming, Received, ReceiverOptions, RecvOp, RecvPoll,
};
use pgt_core::schema::Metadata;
use pgt_core::sender::{DestinationOutcome, SendPoll};
use pgt_core::tree::{KeyPath, Node};
use pgt_wasm::types::{status, Encoded, ErrorInfo, SenderCreated, Summary};
use serde::de::DeserializeOwned;
use wasmtime::{
    Config, Engine, InstancePre, Linker, Memory, Module, ResourceLimiter, Store, StoreLimits,
    StoreLimitsBuilder, Trap, TypedFunc,
};

use crate::engine::{EngineError, EngineFactory, ReceiverEngine, SenderEngine};

/// The module embedded at build time (empty when it was not built).
static EMBEDDED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pgt_wasm.wasm"));
/// Where build.rs found the module, or where it looked.
const EMBEDDED_SOURCE: &str = env!("PGT_WASM_MODULE_SOURCE");
/// The command that builds the module.
pub const BUILD_COMMAND: &str = "scripts/build-wasm.sh";

/// The module embedded in this binary at build time, if it was built (`scripts/build-wasm.sh`).
pub fn embedded_module() -> Option<&'static [u8]> {
    (!EMBEDDED.is_empty()).then_some(EMBEDDED)
}

/// Caps on each guest instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WasmLimits {
    /// Fuel for one call into the guest (about one unit per wasm instruction). The default leaves room
    /// for decoding metadata at `Limits::default()`'s maximum size; one poll costs a few thousand.
    pub fuel_per_call: u64,
    /// Largest linear memory of a guest, in bytes (the module starts at about 1.1 MiB).
    pub max_memory_bytes: usize,
    /// Largest table of a guest, in elements.
    pub max_table_elements: usize,
}

impl Default for WasmLimits {
    fn default() -> WasmLimits {
        WasmLimits {
            fuel_per_call: 50_000_000_000,
            max_memory_bytes: 2 << 30,
            max_table_elements: 10_000,
        }
    }
}

/// Why the sandbox, not the protocol, failed a call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// The call ran out of fuel.
    #[error("wasm guest ran out of fuel (limit: {limit} per call)")]
    OutOfFuel {
        /// The fuel limit per call.
        limit: u64,
    },
    /// The guest's memory would have grown past the cap.
    #[error("wasm guest ran out of memory (limit: {limit} bytes of linear memory)")]
    OutOfMemory {
        /// The memory cap.
        limit: usize,
    },
    /// The guest trapped for another reason (a bug in the guest).
    #[error("wasm guest trapped: {0}")]
    Trap(String),
    /// An earlier call trapped; this instance is not used again.
    #[error("wasm guest is unusable after an earlier trap")]
    Poisoned,
}

/// pgt-core in wasmtime. Cheap to clone (the compiled module is shared).
#[derive(Clone)]
pub struct WasmEngine {
    engine: Engine,
    pre: InstancePre<GuestData>,
    limits: WasmLimits,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl WasmEngine {
    /// The embedded module (or, if this binary was built without it, the file named by
    /// `$PGT_WASM_MODULE`) with default limits.
    pub fn new() -> Result<WasmEngine, EngineError> {
        WasmEngine::with_limits(WasmLimits::default())
    }

    /// As [`WasmEngine::new`], with these caps.
    pub fn with_limits(limits: WasmLimits) -> Result<WasmEngine, EngineError> {
        if !EMBEDDED.is_empty() {
            return WasmEngine::from_bytes(EMBEDDED, limits);
        }
        if let Some(path) = std::env::var_os("PGT_WASM_MODULE") {
            return WasmEngine::from_file(Path::new(&path), limits);
        }
        Err(EngineError::Module(format!(
            "pgt's wasm module is not built into this binary ({EMBEDDED_SOURCE}); build it with \
             `{BUILD_COMMAND}` and rebuild, or set PGT_WASM_MODULE to a pgt_wasm.wasm"
        )))
    }

    /// The module in file `path`.
    pub fn from_file(path: &Path, limits: WasmLimits) -> Result<WasmEngine, EngineError> {
        let bytes = std::fs::read(path).map_err(|e| {
            EngineError::Module(format!("reading the wasm module {}: {e}", path.display()))
        })?;
        WasmEngine::from_bytes(&bytes, limits)
    }

    /// The module `bytes` (a pgt-wasm raw-ABI build), compiled now.
    pub fn from_bytes(bytes: &[u8], limits: WasmLimits) -> Result<WasmEngine, EngineError> {
        let mut config = Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(|e| module_error("wasmtime", e))?;
        let module =
            Module::new(&engine, bytes).map_err(|e| module_error("compiling the module", e))?;
        if let Some(import) = module.imports().next() {
            return Err(EngineError::Module(format!(
                "the module imports {}::{}: not a pgt raw-ABI module",
                import.module(),
                import.name()
            )));
        }
        let linker = Linker::new(&engine);
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| module_error("preparing the module", e))?;
        let engine = WasmEngine {
            engine,
            pre,
            limits,
        };
        // Instantiating checks every export's signature (see `Exports::load`).
        let mut guest = engine.instantiate()?;
        let abi = guest.abi_version()?;
        if abi != pgt_wasm::types::ABI_VERSION {
            return Err(EngineError::Module(format!(
                "the module speaks ABI version {abi}, this host {}: rebuild it with `{BUILD_COMMAND}`",
                pgt_wasm::types::ABI_VERSION
            )));
        }
        Ok(engine)
    }

    /// The caps of each guest.
    pub fn limits(&self) -> WasmLimits {
        self.limits
    }

    /// The same compiled module with other caps.
    pub fn with_other_limits(&self, limits: WasmLimits) -> WasmEngine {
        WasmEngine {
            limits,
            ..self.clone()
        }
    }

    /// The compiled module (e.g. to inspect its imports and exports).
    pub fn module(&self) -> &Module {
        self.pre.module()
    }

    /// Decodes and validates a header + metadata in a fresh guest.
    pub fn decode(
        &self,
        header: &[u8],
        metadata: &[u8],
        limits: &Limits,
    ) -> Result<Summary, EngineError> {
        self.instantiate()?
            .decode_like(|e| &e.decode, header, metadata, limits)
    }

    /// The transfer plan of a header + metadata, computed in a fresh guest.
    pub fn plan(
        &self,
        header: &[u8],
        metadata: &[u8],
        limits: &Limits,
    ) -> Result<Plan, EngineError> {
        self.instantiate()?
            .decode_like(|e| &e.plan, header, metadata, limits)
    }

    /// Validates and encodes metadata for transfer `transfer_id` in a fresh guest: the header and
    /// metadata messages.
    pub fn encode(
        &self,
        metadata: &Metadata,
        digests: bool,
        limits: &Limits,
        transfer_id: u64,
    ) -> Result<Encoded, EngineError> {
        self.instantiate()?
            .metadata_call(|e| &e.encode, metadata, digests, limits, transfer_id)
    }

    fn instantiate(&self) -> Result<Guest, EngineError> {
        let limiter = StoreLimitsBuilder::new()
            .memory_size(self.limits.max_memory_bytes)
            .table_elements(self.limits.max_table_elements)
            .instances(1)
            .tables(1)
            .memories(1)
            .build();
        let mut store = Store::new(
            &self.engine,
            GuestData {
                limiter,
                memory_denied: false,
            },
        );
        store.limiter(|d| d as &mut dyn ResourceLimiter);
        store
            .set_fuel(self.limits.fuel_per_call)
            .map_err(|e| module_error("wasmtime fuel", e))?;
        let instance = match self.pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => return Err(sandbox_error(&store, self.limits, e).into()),
        };
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| EngineError::Module("the module exports no memory".into()))?;
        let exports = Exports::load(&instance, &mut store)?;
        Ok(Guest {
            store,
            memory,
            exports,
            limits: self.limits,
            poisoned: false,
        })
    }
}

impl EngineFactory for WasmEngine {
    fn sender(
        &self,
        metadata: Metadata,
        digests: bool,
        limits: &Limits,
        transfer_id: u64,
    ) -> Result<SenderEngine, EngineError> {
        let mut guest = self.instantiate()?;
        let created: SenderCreated =
            guest.metadata_call(|e| &e.sender_new, &metadata, digests, limits, transfer_id)?;
        Ok(SenderEngine::Wasm(Box::new(WasmSender {
            guest,
            handle: created.handle,
            plan: created.plan,
            bytes: Vec::new(),
        })))
    }

    fn receiver(&self, options: ReceiverOptions) -> Result<ReceiverEngine, EngineError> {
        let opts =
            postcard::to_allocvec(&options).map_err(|e| module_error("encoding options", e))?;
        let mut guest = self.instantiate()?;
        let handle: u32 = guest.with_inputs(&[&opts], |g, a| {
            g.call(|e| &e.receiver_new, (a[0].0, a[0].1))
        })?;
        Ok(ReceiverEngine::Wasm(Box::new(WasmReceiver {
            guest,
            handle,
        })))
    }
}

fn module_error(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::Module(format!("{what}: {e:?}"))
}

fn limits_bytes(limits: &Limits) -> Vec<u8> {
    postcard::to_allocvec(limits).expect("Limits always encodes")
}

/// A wasmtime error of a call as a [`SandboxError`].
fn sandbox_error(store: &Store<GuestData>, limits: WasmLimits, e: wasmtime::Error) -> SandboxError {
    if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
        SandboxError::OutOfFuel {
            limit: limits.fuel_per_call,
        }
    } else if store.data().memory_denied {
        SandboxError::OutOfMemory {
            limit: limits.max_memory_bytes,
        }
    } else {
        SandboxError::Trap(format!("{e:?}"))
    }
}

// ---- one guest instance ----

struct GuestData {
    limiter: StoreLimits,
    /// Set when the limiter refused a memory growth: a trap that follows is reported as out of memory.
    memory_denied: bool,
}

impl ResourceLimiter for GuestData {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.limiter.memory_growing(current, desired, maximum)?;
        self.memory_denied |= !ok;
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limiter.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limiter.instances()
    }

    fn tables(&self) -> usize {
        self.limiter.tables()
    }

    fn memories(&self) -> usize {
        self.limiter.memories()
    }
}

/// The arguments of `pgt_encode` and `pgt_sender_new`: metadata (pointer, length), the digests flag,
/// limits (pointer, length), the transfer id's low and high halves.
type MetadataArgs = (u32, u32, u32, u32, u32, u32, u32);

/// Every export of the raw ABI, typed once (`wasm/ABI.md`; pointers and lengths are wasm32 `i32`s, and
/// every export but the first three returns a result block's address). Loading checks each signature.
struct Exports {
    abi_version: TypedFunc<(), u32>,
    alloc: TypedFunc<u32, u32>,
    free: TypedFunc<(u32, u32), ()>,
    decode: TypedFunc<(u32, u32, u32, u32, u32, u32), u32>,
    plan: TypedFunc<(u32, u32, u32, u32, u32, u32), u32>,
    encode: TypedFunc<MetadataArgs, u32>,
    sender_new: TypedFunc<MetadataArgs, u32>,
    sender_poll: TypedFunc<u32, u32>,
    sender_bytes: TypedFunc<(u32, u32), u32>,
    sender_digests: TypedFunc<(u32, u32, u32, u32), u32>,
    sender_destination_outcome: TypedFunc<(u32, u32, u32), u32>,
    sender_drop: TypedFunc<u32, u32>,
    receiver_new: TypedFunc<(u32, u32), u32>,
    receiver_poll: TypedFunc<u32, u32>,
    receiver_header: TypedFunc<(u32, u32, u32), u32>,
    receiver_metadata: TypedFunc<(u32, u32, u32), u32>,
    receiver_tree: TypedFunc<u32, u32>,
    receiver_paths: TypedFunc<u32, u32>,
    receiver_bind: TypedFunc<(u32, u32, u32), u32>,
    receiver_data: TypedFunc<(u32, u32), u32>,
    receiver_digests: TypedFunc<(u32, u32, u32, u32), u32>,
    receiver_trailer: TypedFunc<(u32, u32, u32), u32>,
    receiver_forwarded: TypedFunc<(u32, u32), u32>,
    receiver_in_place_written: TypedFunc<(u32, u32, u32), u32>,
    receiver_digest_mismatch: TypedFunc<u32, u32>,
    receiver_leftover: TypedFunc<u32, u32>,
    receiver_finish: TypedFunc<u32, u32>,
    receiver_drop: TypedFunc<u32, u32>,
}

impl Exports {
    fn load(
        instance: &wasmtime::Instance,
        store: &mut Store<GuestData>,
    ) -> Result<Exports, EngineError> {
        macro_rules! exports {
            ($($field:ident),* $(,)?) => {
                Exports {
                    $($field: instance
                        .get_typed_func(&mut *store, concat!("pgt_", stringify!($field)))
                        .map_err(|e| module_error(concat!("export pgt_", stringify!($field)), e))?,)*
                }
            };
        }
        Ok(exports!(
            abi_version,
            alloc,
            free,
            decode,
            plan,
            encode,
            sender_new,
            sender_poll,
            sender_bytes,
            sender_digests,
            sender_destination_outcome,
            sender_drop,
            receiver_new,
            receiver_poll,
            receiver_header,
            receiver_metadata,
            receiver_tree,
            receiver_paths,
            receiver_bind,
            receiver_data,
            receiver_digests,
            receiver_trailer,
            receiver_forwarded,
            receiver_in_place_written,
            receiver_digest_mismatch,
            receiver_leftover,
            receiver_finish,
            receiver_drop,
        ))
    }
}

/// One export, picked from [`Exports`].
type Pick<P> = fn(&Exports) -> &TypedFunc<P, u32>;

struct Guest {
    store: Store<GuestData>,
    memory: Memory,
    exports: Exports,
    limits: WasmLimits,
    poisoned: bool,
}

impl Guest {
    fn refuel(&mut self) -> Result<(), EngineError> {
        self.store
            .set_fuel(self.limits.fuel_per_call)
            .map_err(|e| module_error("wasmtime fuel", e))
    }

    /// Turns a wasmtime error of a call into a [`SandboxError`] and poisons the instance.
    fn fail(&mut self, e: wasmtime::Error) -> EngineError {
        self.poisoned = true;
        sandbox_error(&self.store, self.limits, e).into()
    }

    fn check(&self) -> Result<(), EngineError> {
        if self.poisoned {
            return Err(SandboxError::Poisoned.into());
        }
        Ok(())
    }

    fn abi_version(&mut self) -> Result<u32, EngineError> {
        self.check()?;
        self.refuel()?;
        let f = self.exports.abi_version.clone();
        f.call(&mut self.store, ()).map_err(|e| self.fail(e))
    }

    /// Copies `bytes` into a fresh guest buffer: `(ptr, len)`.
    fn put(&mut self, bytes: &[u8]) -> Result<(u32, u32), EngineError> {
        self.check()?;
        let len = u32::try_from(bytes.len())
            .map_err(|_| EngineError::Module("an input larger than 4 GiB".into()))?;
        self.refuel()?;
        let alloc = self.exports.alloc.clone();
        let ptr = alloc.call(&mut self.store, len).map_err(|e| self.fail(e))?;
        if ptr == 0 {
            self.poisoned = true;
            return Err(SandboxError::OutOfMemory {
                limit: self.limits.max_memory_bytes,
            }
            .into());
        }
        if len > 0 {
            self.memory
                .write(&mut self.store, ptr as usize, bytes)
                .map_err(|e| module_error("writing into the guest", e))?;
        }
        Ok((ptr, len))
    }

    fn release(&mut self, (ptr, len): (u32, u32)) {
        if self.poisoned || len == 0 || self.refuel().is_err() {
            return;
        }
        let free = self.exports.free.clone();
        if let Err(e) = free.call(&mut self.store, (ptr, len)) {
            let _ = self.fail(e);
        }
    }

    /// Copies inputs in, runs `f` with their `(ptr, len)`, frees them.
    fn with_inputs<T>(
        &mut self,
        inputs: &[&[u8]],
        f: impl FnOnce(&mut Guest, &[(u32, u32)]) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut placed = Vec::with_capacity(inputs.len());
        for input in inputs {
            match self.put(input) {
                Ok(p) => placed.push(p),
                Err(e) => {
                    for p in placed {
                        self.release(p);
                    }
                    return Err(e);
                }
            }
        }
        let r = f(self, &placed);
        for p in placed {
            self.release(p);
        }
        r
    }

    /// Calls the export `pick` chooses and decodes its result block.
    fn call<P: wasmtime::WasmParams, T: DeserializeOwned>(
        &mut self,
        pick: Pick<P>,
        args: P,
    ) -> Result<T, EngineError> {
        self.check()?;
        self.refuel()?;
        let f = pick(&self.exports).clone();
        let ptr = f.call(&mut self.store, args).map_err(|e| self.fail(e))?;
        let data = self.memory.data(&self.store);
        let block = data
            .get(ptr as usize..)
            .filter(|b| b.len() >= 8)
            .ok_or_else(|| EngineError::Module("result block out of bounds".into()))?;
        let code = u32::from_le_bytes(block[0..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(block[4..8].try_into().expect("4 bytes")) as usize;
        let payload = block
            .get(8..8 + len)
            .ok_or_else(|| EngineError::Module("result payload out of bounds".into()))?;
        match code {
            status::OK => {
                postcard::from_bytes(payload).map_err(|e| module_error("result does not decode", e))
            }
            status::ERROR | status::ABI_ERROR => {
                let info: ErrorInfo = postcard::from_bytes(payload)
                    .map_err(|e| module_error("error does not decode", e))?;
                Err(match info.error {
                    Some(e) => EngineError::Protocol(e),
                    None => EngineError::Module(format!("{}: {}", info.name, info.message)),
                })
            }
            other => Err(EngineError::Module(format!("unknown status {other}"))),
        }
    }

    /// Calls an export that takes metadata, a digests flag, limits and a transfer id in two 32-bit
    /// halves (`pgt_encode`, `pgt_sender_new`).
    fn metadata_call<T: DeserializeOwned>(
        &mut self,
        pick: Pick<MetadataArgs>,
        metadata: &Metadata,
        digests: bool,
        limits: &Limits,
        transfer_id: u64,
    ) -> Result<T, EngineError> {
        let meta =
            postcard::to_allocvec(metadata).map_err(|e| module_error("encoding metadata", e))?;
        let (lo, hi) = (transfer_id as u32, (transfer_id >> 32) as u32);
        self.with_inputs(&[&meta, &limits_bytes(limits)], |g, a| {
            let args = (a[0].0, a[0].1, u32::from(digests), a[1].0, a[1].1, lo, hi);
            g.call(pick, args)
        })
    }

    fn decode_like<T: DeserializeOwned>(
        &mut self,
        pick: Pick<(u32, u32, u32, u32, u32, u32)>,
        header: &[u8],
        metadata: &[u8],
        limits: &Limits,
    ) -> Result<T, EngineError> {
        self.with_inputs(&[header, metadata, &limits_bytes(limits)], |g, a| {
            g.call(pick, (a[0].0, a[0].1, a[1].0, a[1].1, a[2].0, a[2].1))
        })
    }

    /// Calls an export that takes a handle and one byte input.
    fn bytes_call<T: DeserializeOwned>(
        &mut self,
        pick: Pick<(u32, u32, u32)>,
        handle: u32,
        bytes: &[u8],
    ) -> Result<T, EngineError> {
        self.with_inputs(&[bytes], |g, a| g.call(pick, (handle, a[0].0, a[0].1)))
    }

    /// Calls an export that takes a handle, a message and digests (8 little-endian bytes each).
    fn digests_call(
        &mut self,
        pick: Pick<(u32, u32, u32, u32)>,
        handle: u32,
        message: u32,
        digests: &[u64],
    ) -> Result<(), EngineError> {
        let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
        self.with_inputs(&[&bytes], |g, a| {
            g.call(pick, (handle, message, a[0].0, a[0].1))
        })
    }
}

// ---- the engines ----

/// A sender in a guest: the plan is fetched once, at creation.
pub struct WasmSender {
    guest: Guest,
    handle: u32,
    plan: Plan,
    /// The last header/metadata/trailer bytes fetched (lent out by `message_bytes`).
    bytes: Vec<u8>,
}

impl std::fmt::Debug for WasmSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmSender")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl SendEngine for WasmSender {
    type Error = EngineError;

    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn poll(&mut self) -> Result<SendPoll, EngineError> {
        self.guest.call(|e| &e.sender_poll, self.handle)
    }

    fn message_bytes(&mut self, message: u32) -> Result<Cow<'_, [u8]>, EngineError> {
        self.bytes = self
            .guest
            .call(|e| &e.sender_bytes, (self.handle, message))?;
        Ok(Cow::Borrowed(&self.bytes))
    }

    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), EngineError> {
        self.guest
            .digests_call(|e| &e.sender_digests, self.handle, message, digests)
    }

    fn destination_outcome(&mut self, failed: &[u32]) -> Result<DestinationOutcome, EngineError> {
        let failed =
            postcard::to_allocvec(failed).map_err(|e| module_error("encoding ranks", e))?;
        self.guest
            .bytes_call(|e| &e.sender_destination_outcome, self.handle, &failed)
    }
}

impl Drop for WasmSender {
    fn drop(&mut self) {
        if !self.guest.poisoned {
            let _: Result<(), _> = self.guest.call(|e| &e.sender_drop, self.handle);
        }
    }
}

/// A receiver in a guest.
pub struct WasmReceiver {
    guest: Guest,
    handle: u32,
}

impl std::fmt::Debug for WasmReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmReceiver")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl ReceiveEngine for WasmReceiver {
    type Error = EngineError;

    fn poll(&mut self) -> Result<RecvPoll, EngineError> {
        self.guest.call(|e| &e.receiver_poll, self.handle)
    }

    fn handle_header(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.guest
            .bytes_call(|e| &e.receiver_header, self.handle, bytes)
    }

    fn handle_metadata(&mut self, bytes: &[u8]) -> Result<Incoming, EngineError> {
        self.guest
            .bytes_call(|e| &e.receiver_metadata, self.handle, bytes)
    }

    fn tree(&mut self) -> Result<Vec<Node>, EngineError> {
        self.guest.call(|e| &e.receiver_tree, self.handle)
    }

    fn paths(&mut self) -> Result<Vec<KeyPath>, EngineError> {
        self.guest.call(|e| &e.receiver_paths, self.handle)
    }

    fn finish_bindings(&mut self, in_place: &[InPlace]) -> Result<Vec<Binding>, EngineError> {
        let targets =
            postcard::to_allocvec(in_place).map_err(|e| module_error("encoding targets", e))?;
        self.guest
            .bytes_call(|e| &e.receiver_bind, self.handle, &targets)
    }

    fn handle_data(&mut self, message: u32) -> Result<(), EngineError> {
        self.guest
            .call(|e| &e.receiver_data, (self.handle, message))
    }

    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), EngineError> {
        self.guest
            .digests_call(|e| &e.receiver_digests, self.handle, message, digests)
    }

    fn handle_trailer(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.guest
            .bytes_call(|e| &e.receiver_trailer, self.handle, bytes)
    }

    fn handle_forwarded(&mut self, message: u32) -> Result<(), EngineError> {
        self.guest
            .call(|e| &e.receiver_forwarded, (self.handle, message))
    }

    fn in_place_written(&mut self, not_in_target: &[u32]) -> Result<InPlaceWritten, EngineError> {
        let storages = postcard::to_allocvec(not_in_target)
            .map_err(|e| module_error("encoding storages", e))?;
        self.guest
            .bytes_call(|e| &e.receiver_in_place_written, self.handle, &storages)
    }

    fn has_digest_mismatch(&mut self) -> Result<bool, EngineError> {
        self.guest
            .call(|e| &e.receiver_digest_mismatch, self.handle)
    }

    fn leftover(&mut self) -> Result<Option<RecvOp>, EngineError> {
        self.guest.call(|e| &e.receiver_leftover, self.handle)
    }

    fn finish(mut self) -> Result<Received, EngineError> {
        // pgt_receiver_finish frees the receiver whatever the outcome.
        let handle = std::mem::take(&mut self.handle);
        self.guest.call(|e| &e.receiver_finish, handle)
    }
}

impl Drop for WasmReceiver {
    fn drop(&mut self) {
        if self.handle != 0 && !self.guest.poisoned {
            let _: Result<(), _> = self.guest.call(|e| &e.receiver_drop, self.handle);
        }
    }
}

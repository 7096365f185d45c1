//! `WasmEngine`: pgt-core inside a wasmtime sandbox, behind the same [`EngineFactory`] traits as
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
//! the engine and later transfers are unaffected. Protocol errors come back as the same
//! `pgt_core::Error` a native core returns (rebuilt from the guest's `ErrorInfo::detail` and checked
//! against its Debug form), so callers match errors the same way with either engine; misuse of the ABI
//! and errors the host cannot rebuild exactly come back as [`pgt_wasm::types::ErrorInfo`].

use std::path::Path;

use anyhow::{anyhow, Context};
use pgt_core::codec::{Limits, Metadata, StorageRef};
use pgt_core::dtype::DType;
use pgt_core::receiver::{Binding, ReceiverOptions};
use pgt_wasm::types::{
    segments_from_w, status, BindingW, Encoded, ErrorInfo, ForwardStepW, LimitsW, PayloadW, PlanW,
    ReceivedW, ReceiverOptionsW, RecvNextW, SendNextW, SenderCreated, Summary,
};
use serde::de::DeserializeOwned;
use wasmtime::{
    Config, Engine, InstancePre, Linker, Memory, Module, ResourceLimiter, Store, StoreLimits,
    StoreLimitsBuilder, Trap, TypedFunc,
};

use crate::engine::{
    EngineError, EngineFactory, ForwardStep, IncomingManifest, OwnedPayload, ReceivedTree,
    ReceiverEngine, RecvNext, RecvStep, SendNext, SendStep, SenderEngine,
};

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
    pub fn new() -> anyhow::Result<WasmEngine> {
        WasmEngine::with_limits(WasmLimits::default())
    }

    /// As [`WasmEngine::new`], with these caps.
    pub fn with_limits(limits: WasmLimits) -> anyhow::Result<WasmEngine> {
        if !EMBEDDED.is_empty() {
            return WasmEngine::from_bytes(EMBEDDED, limits);
        }
        if let Some(path) = std::env::var_os("PGT_WASM_MODULE") {
            return WasmEngine::from_file(Path::new(&path), limits);
        }
        Err(anyhow!(
            "pgt's wasm module is not built into this binary ({EMBEDDED_SOURCE}); build it with \
             `{BUILD_COMMAND}` and rebuild, or set PGT_WASM_MODULE to a pgt_wasm.wasm"
        ))
    }

    /// The module in file `path`.
    pub fn from_file(path: &Path, limits: WasmLimits) -> anyhow::Result<WasmEngine> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the wasm module {}", path.display()))?;
        WasmEngine::from_bytes(&bytes, limits)
    }

    /// The module `bytes` (a pgt-wasm raw-ABI build), compiled now.
    pub fn from_bytes(bytes: &[u8], limits: WasmLimits) -> anyhow::Result<WasmEngine> {
        let mut config = Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(|e| anyhow!("wasmtime: {e:?}"))?;
        let module =
            Module::new(&engine, bytes).map_err(|e| anyhow!("compiling the wasm module: {e:?}"))?;
        if let Some(import) = module.imports().next() {
            return Err(anyhow!(
                "the wasm module imports {}::{}: not a pgt raw-ABI module",
                import.module(),
                import.name()
            ));
        }
        let linker = Linker::new(&engine);
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| anyhow!("preparing the wasm module: {e:?}"))?;
        let engine = WasmEngine {
            engine,
            pre,
            limits,
        };
        let mut guest = engine.instantiate()?;
        let abi = guest.abi_version()?;
        if abi != pgt_wasm::types::ABI_VERSION {
            return Err(anyhow!(
                "the wasm module speaks ABI version {abi}, this host {}: rebuild it with `{BUILD_COMMAND}`",
                pgt_wasm::types::ABI_VERSION
            ));
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
    ) -> anyhow::Result<Summary> {
        self.instantiate()?
            .decode_like("pgt_decode", header, metadata, limits)
    }

    /// The transfer plan of a header + metadata, computed in a fresh guest.
    pub fn plan(&self, header: &[u8], metadata: &[u8], limits: &Limits) -> anyhow::Result<PlanW> {
        self.instantiate()?
            .decode_like("pgt_plan", header, metadata, limits)
    }

    /// Validates and encodes metadata in a fresh guest: the header and metadata messages.
    pub fn encode(
        &self,
        metadata: &Metadata,
        digests: bool,
        limits: &Limits,
    ) -> anyhow::Result<Encoded> {
        self.instantiate()?
            .metadata_call("pgt_encode", metadata, digests, limits)
    }

    fn instantiate(&self) -> anyhow::Result<Guest> {
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
        let mut guest = Guest {
            store,
            memory: None,
            funcs: Funcs::default(),
            limits: self.limits,
            poisoned: false,
        };
        guest.refuel()?;
        let instance = self
            .pre
            .instantiate(&mut guest.store)
            .map_err(|e| guest.sandbox_error(e))?;
        guest.memory = Some(
            instance
                .get_memory(&mut guest.store, "memory")
                .ok_or_else(|| anyhow!("the wasm module exports no memory"))?,
        );
        guest.funcs = Funcs::load(&instance, &mut guest.store)?;
        Ok(guest)
    }
}

impl EngineFactory for WasmEngine {
    fn sender(
        &self,
        metadata: Metadata,
        digests: bool,
        limits: &Limits,
    ) -> Result<Box<dyn SenderEngine>, EngineError> {
        let mut guest = self.instantiate()?;
        let created: SenderCreated =
            guest.metadata_call("pgt_sender_new", &metadata, digests, limits)?;
        Ok(Box::new(WasmSender {
            guest,
            handle: created.handle,
            storages: created.storages.into_iter().map(Into::into).collect(),
        }))
    }

    fn receiver(&self, options: ReceiverOptions) -> Result<Box<dyn ReceiverEngine>, EngineError> {
        let opts = postcard::to_allocvec(&ReceiverOptionsW::from(options))
            .context("encoding receiver options for the guest")?;
        let mut guest = self.instantiate()?;
        let handle: u32 = guest.with_inputs(&[&opts], |g, a| {
            g.call("pgt_receiver_new", (a[0].0, a[0].1))
        })?;
        Ok(Box::new(WasmReceiver { guest, handle }))
    }
}

fn limits_bytes(limits: &Limits) -> Vec<u8> {
    postcard::to_allocvec(&LimitsW::from(*limits)).expect("LimitsW always encodes")
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

// Export signatures (pointers and lengths are wasm32 `i32`s) and tables of exports by name.
type Fn1 = TypedFunc<u32, u32>;
type Fn2 = TypedFunc<(u32, u32), u32>;
type Fn3 = TypedFunc<(u32, u32, u32), u32>;
type FnDigest = TypedFunc<(u32, u32, u64), u32>;
type Fn5 = TypedFunc<(u32, u32, u32, u32, u32), u32>;
type Fn6 = TypedFunc<(u32, u32, u32, u32, u32, u32), u32>;
type FnBind = TypedFunc<(u32, u32, u64, u32, u64), u32>;
type Table<F> = std::collections::HashMap<&'static str, F>;

/// The exports, looked up once per instance.
#[derive(Default)]
struct Funcs {
    abi_version: Option<TypedFunc<(), u32>>,
    alloc: Option<Fn1>,
    free: Option<TypedFunc<(u32, u32), ()>>,
    by_handle: Table<Fn1>,
    decode: Table<Fn6>,
    new5: Table<Fn5>,
    bytes: Table<Fn3>,
    index: Table<Fn2>,
    digest: Table<FnDigest>,
    bind: Option<FnBind>,
}

impl Funcs {
    fn load(instance: &wasmtime::Instance, store: &mut Store<GuestData>) -> anyhow::Result<Funcs> {
        macro_rules! get {
            ($name:expr) => {
                instance
                    .get_typed_func(&mut *store, $name)
                    .map_err(|e| anyhow!("wasm module export {}: {e:?}", $name))?
            };
        }
        let mut f = Funcs {
            abi_version: Some(get!("pgt_abi_version")),
            alloc: Some(get!("pgt_alloc")),
            free: Some(get!("pgt_free")),
            bind: Some(get!("pgt_receiver_bind")),
            ..Funcs::default()
        };
        for name in [
            "pgt_sender_poll",
            "pgt_sender_drop",
            "pgt_receiver_poll",
            "pgt_receiver_finish_bindings",
            "pgt_receiver_finish",
            "pgt_receiver_drop",
        ] {
            f.by_handle.insert(name, get!(name));
        }
        for name in ["pgt_decode", "pgt_plan"] {
            f.decode.insert(name, get!(name));
        }
        for name in ["pgt_encode", "pgt_sender_new"] {
            f.new5.insert(name, get!(name));
        }
        for name in [
            "pgt_receiver_header",
            "pgt_receiver_metadata",
            "pgt_receiver_trailer",
        ] {
            f.bytes.insert(name, get!(name));
        }
        for name in [
            "pgt_receiver_new",
            "pgt_receiver_data",
            "pgt_receiver_forwarded",
        ] {
            f.index.insert(name, get!(name));
        }
        for name in ["pgt_sender_digest", "pgt_receiver_digest"] {
            f.digest.insert(name, get!(name));
        }
        Ok(f)
    }
}

/// Parameters of one export call, by signature.
trait Call {
    fn invoke(self, g: &mut Guest, name: &'static str) -> wasmtime::Result<u32>;
}

impl Call for u32 {
    fn invoke(self, g: &mut Guest, name: &'static str) -> wasmtime::Result<u32> {
        g.funcs.by_handle[name].call(&mut g.store, self)
    }
}

impl Call for (u32, u32) {
    fn invoke(self, g: &mut Guest, name: &'static str) -> wasmtime::Result<u32> {
        g.funcs.index[name].call(&mut g.store, self)
    }
}

impl Call for (u32, u32, u32) {
    fn invoke(self, g: &mut Guest, name: &'static str) -> wasmtime::Result<u32> {
        g.funcs.bytes[name].call(&mut g.store, self)
    }
}

impl Call for (u32, u32, u64) {
    fn invoke(self, g: &mut Guest, name: &'static str) -> wasmtime::Result<u32> {
        g.funcs.digest[name].call(&mut g.store, self)
    }
}

impl Call for (u32, u32, u32, u32, u32) {
    fn invoke(self, g: &mut Guest, name: &'static str) -> wasmtime::Result<u32> {
        g.funcs.new5[name].call(&mut g.store, self)
    }
}

impl Call for (u32, u32, u32, u32, u32, u32) {
    fn invoke(self, g: &mut Guest, name: &'static str) -> wasmtime::Result<u32> {
        g.funcs.decode[name].call(&mut g.store, self)
    }
}

impl Call for (u32, u32, u64, u32, u64) {
    fn invoke(self, g: &mut Guest, _: &'static str) -> wasmtime::Result<u32> {
        let f = g.funcs.bind.clone().expect("loaded");
        f.call(&mut g.store, self)
    }
}

struct Guest {
    store: Store<GuestData>,
    memory: Option<Memory>,
    funcs: Funcs,
    limits: WasmLimits,
    poisoned: bool,
}

impl Guest {
    fn refuel(&mut self) -> anyhow::Result<()> {
        self.store
            .set_fuel(self.limits.fuel_per_call)
            .map_err(|e| anyhow!("wasmtime fuel: {e:?}"))
    }

    /// Turns a wasmtime error of a call into a [`SandboxError`] and poisons the instance.
    fn sandbox_error(&mut self, e: wasmtime::Error) -> anyhow::Error {
        self.poisoned = true;
        let err = if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
            SandboxError::OutOfFuel {
                limit: self.limits.fuel_per_call,
            }
        } else if self.store.data().memory_denied {
            SandboxError::OutOfMemory {
                limit: self.limits.max_memory_bytes,
            }
        } else {
            SandboxError::Trap(format!("{e:?}"))
        };
        anyhow::Error::new(err)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.poisoned {
            return Err(anyhow::Error::new(SandboxError::Poisoned));
        }
        Ok(())
    }

    fn abi_version(&mut self) -> anyhow::Result<u32> {
        self.check()?;
        self.refuel()?;
        let f = self.funcs.abi_version.clone().expect("loaded");
        f.call(&mut self.store, ())
            .map_err(|e| self.sandbox_error(e))
    }

    /// Copies `bytes` into a fresh guest buffer: `(ptr, len)`.
    fn put(&mut self, bytes: &[u8]) -> anyhow::Result<(u32, u32)> {
        self.check()?;
        let len = u32::try_from(bytes.len()).context("input larger than 4 GiB")?;
        self.refuel()?;
        let alloc = self.funcs.alloc.clone().expect("loaded");
        let ptr = alloc
            .call(&mut self.store, len)
            .map_err(|e| self.sandbox_error(e))?;
        if ptr == 0 {
            self.poisoned = true;
            return Err(anyhow::Error::new(SandboxError::OutOfMemory {
                limit: self.limits.max_memory_bytes,
            }));
        }
        if len > 0 {
            let memory = self.memory.expect("instantiated");
            memory
                .write(&mut self.store, ptr as usize, bytes)
                .map_err(|e| anyhow!("writing into the guest: {e}"))?;
        }
        Ok((ptr, len))
    }

    fn release(&mut self, (ptr, len): (u32, u32)) {
        if self.poisoned || len == 0 || self.refuel().is_err() {
            return;
        }
        let free = self.funcs.free.clone().expect("loaded");
        if let Err(e) = free.call(&mut self.store, (ptr, len)) {
            let _ = self.sandbox_error(e);
        }
    }

    /// Copies inputs in, runs `f` with their `(ptr, len)`, frees them.
    fn with_inputs<T>(
        &mut self,
        inputs: &[&[u8]],
        f: impl FnOnce(&mut Guest, &[(u32, u32)]) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
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

    /// Calls export `name` and decodes its result block.
    fn call<T: DeserializeOwned>(
        &mut self,
        name: &'static str,
        args: impl Call,
    ) -> anyhow::Result<T> {
        self.check()?;
        self.refuel()?;
        let ptr = args.invoke(self, name).map_err(|e| self.sandbox_error(e))?;
        let memory = self.memory.expect("instantiated");
        let data = memory.data(&self.store);
        let block = data
            .get(ptr as usize..)
            .filter(|b| b.len() >= 8)
            .ok_or_else(|| anyhow!("{name}: result block out of bounds"))?;
        let code = u32::from_le_bytes(block[0..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(block[4..8].try_into().expect("4 bytes")) as usize;
        let payload = block
            .get(8..8 + len)
            .ok_or_else(|| anyhow!("{name}: result payload out of bounds"))?;
        match code {
            status::OK => postcard::from_bytes(payload)
                .with_context(|| format!("{name}: result does not decode")),
            status::ERROR | status::ABI_ERROR => {
                let info: ErrorInfo = postcard::from_bytes(payload)
                    .with_context(|| format!("{name}: error does not decode"))?;
                Err(guest_error(info))
            }
            other => Err(anyhow!("{name}: unknown status {other}")),
        }
    }

    /// Calls an export that takes metadata, a digests flag and limits (`pgt_encode`, `pgt_sender_new`).
    fn metadata_call<T: DeserializeOwned>(
        &mut self,
        name: &'static str,
        metadata: &Metadata,
        digests: bool,
        limits: &Limits,
    ) -> anyhow::Result<T> {
        let meta = postcard::to_allocvec(metadata).context("encoding metadata for the guest")?;
        self.with_inputs(&[&meta, &limits_bytes(limits)], |g, a| {
            g.call(name, (a[0].0, a[0].1, u32::from(digests), a[1].0, a[1].1))
        })
    }

    fn decode_like<T: DeserializeOwned>(
        &mut self,
        name: &'static str,
        header: &[u8],
        metadata: &[u8],
        limits: &Limits,
    ) -> anyhow::Result<T> {
        self.with_inputs(&[header, metadata, &limits_bytes(limits)], |g, a| {
            g.call(name, (a[0].0, a[0].1, a[1].0, a[1].1, a[2].0, a[2].1))
        })
    }
}

/// A protocol error from the guest as the `pgt_core::Error` it is — so callers match errors the same
/// way with either engine — when the guest sent it in full and it reads back exactly (same Debug form:
/// a module built from other sources cannot pass off another error); else the [`ErrorInfo`].
fn guest_error(info: ErrorInfo) -> anyhow::Error {
    if let Some(detail) = info.detail.clone() {
        let core = detail.into_core(intern);
        if format!("{core:?}") == info.debug && core.to_string() == info.message {
            return anyhow::Error::new(core);
        }
    }
    anyhow::Error::new(info)
}

/// `pgt_core::Error::ProtocolState` holds a `&'static str`: the guest's texts are interned, each leaked
/// once; past a bound (a misbehaving guest) they are not, and the error stays an [`ErrorInfo`].
fn intern(text: String) -> &'static str {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static TEXTS: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut texts = TEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = texts.get(text.as_str()) {
        return t;
    }
    if texts.len() >= 256 || text.len() > 200 {
        return "(a protocol state the wasm guest reported)";
    }
    let t: &'static str = Box::leak(text.into_boxed_str());
    texts.insert(t);
    t
}

// ---- the engines ----

fn payload(p: PayloadW) -> OwnedPayload {
    match p {
        PayloadW::Bytes(b) => OwnedPayload::Bytes(b),
        PayloadW::Storages(s) => OwnedPayload::Storages(segments_from_w(s)),
    }
}

fn index(message: u64) -> anyhow::Result<usize> {
    usize::try_from(message).context("message index out of range")
}

struct WasmSender {
    guest: Guest,
    handle: u32,
    storages: Vec<StorageRef>,
}

impl SenderEngine for WasmSender {
    fn storages(&self) -> Vec<StorageRef> {
        self.storages.clone()
    }

    fn poll(&mut self) -> Result<SendNext, EngineError> {
        let next: SendNextW = self.guest.call("pgt_sender_poll", self.handle)?;
        Ok(match next {
            SendNextW::Send(op) => SendNext::Send(SendStep {
                to: op.to,
                message: index(op.message)?,
                tag: op.tag,
                len: op.len,
                payload: payload(op.payload),
                hash: op.hash,
            }),
            SendNextW::WaitDigests => SendNext::WaitDigests,
            SendNextW::Done => SendNext::Done,
        })
    }

    fn handle_storage_digest(&mut self, storage: u32, digest: u64) -> Result<(), EngineError> {
        self.guest
            .call("pgt_sender_digest", (self.handle, storage, digest))
    }
}

struct WasmReceiver {
    guest: Guest,
    handle: u32,
}

impl WasmReceiver {
    fn bytes_call<T: DeserializeOwned>(
        &mut self,
        name: &'static str,
        bytes: &[u8],
    ) -> anyhow::Result<T> {
        let handle = self.handle;
        self.guest
            .with_inputs(&[bytes], |g, a| g.call(name, (handle, a[0].0, a[0].1)))
    }
}

fn message_arg(message: usize) -> anyhow::Result<u32> {
    u32::try_from(message).context("message index out of range")
}

impl ReceiverEngine for WasmReceiver {
    fn poll(&mut self) -> Result<RecvNext, EngineError> {
        let next: RecvNextW = self.guest.call("pgt_receiver_poll", self.handle)?;
        Ok(match next {
            RecvNextW::Recv(op) => RecvNext::Recv(RecvStep {
                from: op.from,
                message: index(op.message)?,
                kind: op.kind.into(),
                tag: op.tag,
                len: op.len,
                segments: segments_from_w(op.segments),
                hash: op.hash,
            }),
            RecvNextW::NeedBindings => RecvNext::NeedBindings,
            RecvNextW::Forward(ForwardStepW {
                to,
                message,
                tag,
                len,
                payload: p,
            }) => RecvNext::Forward(ForwardStep {
                to,
                message: index(message)?,
                tag,
                len,
                payload: payload(p),
            }),
            RecvNextW::Wait => RecvNext::Wait,
            RecvNextW::Done => RecvNext::Done,
        })
    }

    fn handle_header(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.bytes_call("pgt_receiver_header", bytes)
    }

    fn handle_metadata(&mut self, bytes: &[u8]) -> Result<IncomingManifest, EngineError> {
        let m: pgt_wasm::types::IncomingW = self.bytes_call("pgt_receiver_metadata", bytes)?;
        Ok(IncomingManifest {
            step: m.step,
            paths: m.paths,
            storages: m.storages.into_iter().map(Into::into).collect(),
            total_bytes: m.total_bytes,
        })
    }

    fn bind_in_place(
        &mut self,
        storage: usize,
        id: u64,
        dtype: DType,
        nbytes: u64,
    ) -> Result<(), EngineError> {
        let storage = u32::try_from(storage).context("storage index out of range")?;
        let dtype = DType::ALL
            .iter()
            .position(|&d| d == dtype)
            .expect("every dtype is in DType::ALL") as u32;
        self.guest.call(
            "pgt_receiver_bind",
            (self.handle, storage, id, dtype, nbytes),
        )
    }

    fn finish_bindings(&mut self) -> Result<Vec<Binding>, EngineError> {
        let b: Vec<BindingW> = self
            .guest
            .call("pgt_receiver_finish_bindings", self.handle)?;
        Ok(b.into_iter().map(Into::into).collect())
    }

    fn handle_data(&mut self, message: usize) -> Result<(), EngineError> {
        let m = message_arg(message)?;
        self.guest.call("pgt_receiver_data", (self.handle, m))
    }

    fn handle_trailer(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.bytes_call("pgt_receiver_trailer", bytes)
    }

    fn handle_storage_digest(&mut self, storage: u32, digest: u64) -> Result<(), EngineError> {
        self.guest
            .call("pgt_receiver_digest", (self.handle, storage, digest))
    }

    fn handle_forwarded(&mut self, message: usize) -> Result<(), EngineError> {
        let m = message_arg(message)?;
        self.guest.call("pgt_receiver_forwarded", (self.handle, m))
    }

    fn finish(mut self: Box<Self>) -> Result<ReceivedTree, EngineError> {
        let r: ReceivedW = self.guest.call("pgt_receiver_finish", self.handle)?;
        Ok(ReceivedTree {
            step: r.step,
            tree: r.tree,
            leaves: r.leaves,
            bindings: r.bindings.into_iter().map(Into::into).collect(),
        })
    }
}

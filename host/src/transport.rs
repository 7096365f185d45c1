//! `Transport`: PGTransport's API over any [`ProcessGroup`]. It executes what the protocol engine
//! (pgt-core, native or sandboxed) asks for — sends, receives into final buffers, forwards, hashing —
//! and owns no protocol decisions.
//!
//! Threads: the sender runs one thread per destination, so destinations proceed in parallel; the
//! first destination's thread hashes each message right before sending it, which leaves the bytes in
//! cache for the kernel's copy. The receiver receives on the calling thread straight into
//! the destination buffers; a second thread hashes (and casts) what has landed, and a third forwards it
//! in chain fan-out, so neither delays the next receive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver as Rx, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pgt_core::codec::{Limits, Metadata, StorageRef};
use pgt_core::dtype::convert;
use pgt_core::plan::{MessageKind, PlanParams, Segment};
use pgt_core::receiver::{Binding, Dest, ReceiverOptions};
use pgt_core::tree::KeyPath;
use tracing::{debug, info_span};

use crate::engine::{EngineFactory, NativeEngine, OwnedPayload, RecvNext, SendNext, SendStep};
use crate::memory::{Buffer, BufferPool, Prefaulter, MMAP_THRESHOLD};
use crate::pg::ProcessGroup;
use crate::state_dict::{Entry, StateDict, Storage, Tensor};

/// Progress callback: `(bytes done, bytes total)`.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Transfer settings.
#[derive(Clone)]
pub struct TransportOptions {
    /// Per-operation timeout: a stalled peer fails the transfer within this (plus ~1 s).
    pub timeout: Duration,
    /// Fan-out, bucket size and chunk size (sender side; receivers follow the metadata).
    pub plan: PlanParams,
    /// Send a digest trailer and verify it.
    pub digests: bool,
    /// Caps on untrusted metadata (receiver side).
    pub limits: Limits,
    /// If set, a received checkpoint must carry this step.
    pub expected_step: Option<u64>,
    /// The protocol engine: native pgt-core by default.
    pub engine: Arc<dyn EngineFactory>,
    /// Called as storage bytes move.
    pub progress: Option<Progress>,
    /// Receiver side: take fresh storages (and cast staging) from this pool when it keeps a buffer of
    /// the exact size — touched memory, so no page faults — and return staging to it afterwards.
    /// Give checkpoints you are done with back with [`BufferPool::recycle`] and
    /// [`StateDict::into_buffers`]. Without a pool, fresh buffers are new mappings, pre-faulted on
    /// another thread.
    pub pool: Option<Arc<BufferPool>>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            timeout: Duration::from_secs(300),
            plan: PlanParams::default(),
            digests: true,
            limits: Limits::default(),
            expected_step: None,
            engine: Arc::new(NativeEngine),
            progress: None,
            pool: None,
        }
    }
}

impl std::fmt::Debug for TransportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportOptions")
            .field("timeout", &self.timeout)
            .field("plan", &self.plan)
            .field("digests", &self.digests)
            .field("limits", &self.limits)
            .field("expected_step", &self.expected_step)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// Figures of one transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TransferStats {
    /// Storage bytes moved.
    pub bytes: u64,
    /// Storages (tensors and shards) moved.
    pub tensors: u64,
    /// Wall time of the whole transfer.
    pub seconds: f64,
    /// Time until the metadata was handled.
    pub metadata_seconds: f64,
}

/// Moves state dicts between ranks of a process group.
pub struct Transport<P: ProcessGroup> {
    pg: P,
    options: TransportOptions,
}

impl<P: ProcessGroup> std::fmt::Debug for Transport<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("rank", &self.pg.rank())
            .field("options", &self.options)
            .finish()
    }
}

/// First error wins; everyone else stops.
#[derive(Default)]
struct Abort {
    flag: AtomicBool,
    error: Mutex<Option<anyhow::Error>>,
}

impl Abort {
    fn fail(&self, e: anyhow::Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.flag.store(true, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn take(&self) -> Option<anyhow::Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// XXH3-64 of a storage's bytes, streamed: the same digest as [`pgt_core::digest`], computed with
/// the SIMD path the CPU has (chosen at run time).
#[derive(Default)]
struct StorageHasher(twox_hash::XxHash3_64);

impl StorageHasher {
    fn update(&mut self, bytes: &[u8]) {
        std::hash::Hasher::write(&mut self.0, bytes);
    }

    fn finish(&self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

/// Messages queued per worker: small descriptors, so memory stays flat whatever the transfer size.
const QUEUE_DEPTH: usize = 256;
/// How often a wait for workers looks at the abort flag.
const ABORT_POLL: Duration = Duration::from_millis(20);

impl<P: ProcessGroup> Transport<P> {
    /// A transport over `pg`.
    pub fn new(pg: P, options: TransportOptions) -> Self {
        Transport { pg, options }
    }

    /// The process group.
    pub fn process_group(&self) -> &P {
        &self.pg
    }

    /// The options.
    pub fn options(&self) -> &TransportOptions {
        &self.options
    }

    /// Sends `state_dict` to `dst_ranks`: metadata first, then every storage's bytes, per the plan.
    pub fn send_checkpoint(
        &self,
        dst_ranks: &[u32],
        state_dict: &StateDict<'_>,
    ) -> Result<TransferStats> {
        let span = info_span!("send_checkpoint", rank = self.pg.rank(), dsts = ?dst_ranks);
        let _enter = span.enter();
        let start = Instant::now();
        let (nodes, entries) = state_dict.flatten();
        let storages: Vec<&[u8]> = entries
            .iter()
            .flat_map(|e| e.tensors())
            .map(|t| t.storage.bytes())
            .collect();
        let metadata = Metadata {
            step: state_dict.step,
            source: self.pg.rank(),
            destinations: dst_ranks.to_vec(),
            plan: self.options.plan,
            tree: nodes,
            leaves: entries.iter().map(|e| e.to_leaf()).collect(),
        };
        let encode_span = info_span!("encode").entered();
        let mut engine = self
            .options
            .engine
            .sender(metadata, self.options.digests, &self.options.limits)
            .context("invalid state dict")?;
        let refs = engine.storages();
        let total: u64 = refs.iter().map(|s| s.nbytes).sum();
        let timeout = self.options.timeout;
        let abort = Abort::default();
        let progress = self.options.progress.clone();
        let sent = std::sync::atomic::AtomicU64::new(0);

        drop(encode_span);
        let _data_span = info_span!("data", bytes = total).entered();
        std::thread::scope(|scope| -> Result<()> {
            let (digest_tx, digest_rx) = mpsc::channel::<(u32, u64)>();
            let storages = &storages;
            let refs = &refs;
            let abort = &abort;
            let mut workers: HashMap<u32, SyncSender<SendStep>> = HashMap::new();
            for (i, &dst) in dst_ranks.iter().enumerate() {
                let (tx, rx) = mpsc::sync_channel::<SendStep>(QUEUE_DEPTH);
                workers.insert(dst, tx);
                let pg = &self.pg;
                let progress = progress.clone();
                let sent = &sent;
                let digest_tx = digest_tx.clone();
                // Progress counts the first destination's bytes: one copy of the checkpoint.
                let counts = i == 0;
                scope.spawn(move || {
                    // The core asks for every storage byte to be hashed exactly once, on the sends to
                    // one destination, in order (so one thread sees all of a storage). Hashing right
                    // before the send also pulls the bytes into cache for the kernel's copy.
                    let mut hashers = StorageHashers::new(refs);
                    for step in rx {
                        if abort.is_set() {
                            break;
                        }
                        let result = match &step.payload {
                            OwnedPayload::Bytes(b) => pg.send(step.to, step.tag, &[b], timeout),
                            OwnedPayload::Storages(segs) => {
                                let parts = storage_parts(storages, segs);
                                if step.hash {
                                    for (seg, bytes) in segs.iter().zip(&parts) {
                                        if let Some(d) = hashers.update(seg, bytes) {
                                            let _ = digest_tx.send(d);
                                        }
                                    }
                                }
                                pg.send(step.to, step.tag, &parts, timeout)
                            }
                        };
                        if let Err(e) = result {
                            abort.fail(anyhow!(e).context(format!(
                                "sending message {} to rank {}",
                                step.message, step.to
                            )));
                            break;
                        }
                        if counts && matches!(step.payload, OwnedPayload::Storages(_)) {
                            let done = sent.fetch_add(step.len, Ordering::Relaxed) + step.len;
                            if let Some(p) = &progress {
                                p(done, total);
                            }
                        }
                    }
                });
            }
            drop(digest_tx);
            let result = (|| -> Result<()> {
                loop {
                    if abort.is_set() {
                        return Ok(());
                    }
                    while let Ok((s, d)) = digest_rx.try_recv() {
                        engine.handle_storage_digest(s, d)?;
                    }
                    match engine.poll()? {
                        SendNext::Send(step) => {
                            let to = step.to;
                            workers
                                .get(&to)
                                .context("engine named an unknown destination")?
                                .send(step)
                                .map_err(|_| anyhow!("sender to rank {to} stopped"))?;
                        }
                        // Waits in short slices, so that a failed destination thread (whose error is in
                        // `abort`) ends the wait at once.
                        SendNext::WaitDigests => {
                            let deadline = Instant::now() + timeout;
                            loop {
                                match digest_rx.recv_timeout(ABORT_POLL) {
                                    Ok((s, d)) => {
                                        engine.handle_storage_digest(s, d)?;
                                        break;
                                    }
                                    Err(RecvTimeoutError::Timeout) if abort.is_set() => {
                                        return Ok(())
                                    }
                                    Err(RecvTimeoutError::Timeout) => {
                                        if Instant::now() >= deadline {
                                            bail!("timed out waiting for storage digests")
                                        }
                                    }
                                    Err(RecvTimeoutError::Disconnected) => {
                                        bail!("hashing stopped before every digest was reported")
                                    }
                                }
                            }
                        }
                        SendNext::Done => return Ok(()),
                    }
                }
            })();
            drop(workers);
            if let Err(e) = result {
                abort.fail(e);
            }
            Ok(())
        })?;
        if let Some(e) = abort.take() {
            return Err(e);
        }
        Ok(TransferStats {
            bytes: total,
            tensors: refs.len() as u64,
            seconds: start.elapsed().as_secs_f64(),
            metadata_seconds: 0.0,
        })
    }

    /// Receives a checkpoint from `src` into fresh buffers.
    pub fn recv_checkpoint(&self, src: u32) -> Result<StateDict<'static>> {
        let mut sd = StateDict::new();
        self.receive(src, &mut sd, false)?;
        Ok(sd)
    }

    /// Receives a checkpoint from `src` in place: every tensor whose key path exists in `state_dict` with
    /// an owned storage is written straight into that storage (sizes must match; float dtypes are cast
    /// on receive). Afterwards `state_dict` holds exactly the received tree. On error its structure is
    /// unchanged, though in-place buffers may hold partly received bytes.
    pub fn recv_checkpoint_into(
        &self,
        src: u32,
        state_dict: &mut StateDict<'static>,
    ) -> Result<TransferStats> {
        self.receive(src, state_dict, true)
    }

    fn receive(
        &self,
        src: u32,
        target: &mut StateDict<'static>,
        in_place: bool,
    ) -> Result<TransferStats> {
        let span = info_span!("recv_checkpoint", rank = self.pg.rank(), src);
        let _enter = span.enter();
        let start = Instant::now();
        let timeout = self.options.timeout;
        let mut engine = self.options.engine.receiver(ReceiverOptions {
            rank: self.pg.rank(),
            source: src,
            expected_step: self.options.expected_step,
            limits: self.options.limits,
        })?;
        // Header and metadata.
        let metadata_span = info_span!("metadata").entered();
        let mut manifest = None;
        loop {
            match engine.poll()? {
                RecvNext::Recv(step)
                    if step.kind == MessageKind::Header || step.kind == MessageKind::Metadata =>
                {
                    let bytes = self
                        .pg
                        .recv_vec(step.from, step.tag, step.len as usize, timeout)
                        .with_context(|| {
                            format!("receiving the {:?} from rank {}", step.kind, step.from)
                        })?;
                    if step.kind == MessageKind::Header {
                        engine.handle_header(&bytes)?;
                    } else {
                        manifest = Some(engine.handle_metadata(&bytes)?);
                    }
                }
                RecvNext::NeedBindings => break,
                other => bail!("protocol engine asked for {other:?} before bindings"),
            }
        }
        let manifest = manifest.context("no metadata")?;
        let metadata_seconds = start.elapsed().as_secs_f64();
        drop(metadata_span);
        let bind_span = info_span!("bind").entered();
        debug!(
            storages = manifest.storages.len(),
            bytes = manifest.total_bytes,
            "metadata received"
        );

        // Bind in-place destinations by key path. A target usually has the received tree's shape, so
        // received leaf i is the target's leaf i; a map of the target's paths is built only if not.
        // `in_place_origin[s]` remembers (target leaf, shard) so assembling needs no lookups.
        // By storage index, which is also the id each in-place binding carries.
        let mut in_place_buffers: Vec<Option<&mut Buffer>> =
            (0..manifest.storages.len()).map(|_| None).collect();
        let mut in_place_origin: Vec<Option<(usize, usize)>> = vec![None; manifest.storages.len()];
        if in_place {
            let (target_paths, mut target_tensors): (Vec<KeyPath>, Vec<Vec<Option<&mut Tensor>>>) =
                target
                    .entries_mut()
                    .into_iter()
                    .map(|(path, entry)| {
                        let tensors = StateDict::entry_tensors_mut(entry);
                        (path, tensors.into_iter().map(Some).collect())
                    })
                    .unzip();
            let mut by_path: Option<HashMap<&KeyPath, usize>> = None;
            let mut find = |leaf: usize, path: &KeyPath| -> Option<usize> {
                if target_paths.get(leaf) == Some(path) {
                    return Some(leaf);
                }
                by_path
                    .get_or_insert_with(|| target_paths.iter().zip(0..).collect())
                    .get(path)
                    .copied()
            };
            for (s, r) in manifest.storages.iter().enumerate() {
                let Some(leaf) = find(r.leaf as usize, &manifest.paths[r.leaf as usize]) else {
                    continue;
                };
                let shard = r.shard as usize;
                let slot = target_tensors[leaf].get_mut(shard).and_then(Option::take);
                let Some(Tensor { layout, storage }) = slot else {
                    continue;
                };
                if let Storage::Owned(buf) = storage {
                    engine.bind_in_place(s, s as u64, layout.dtype, buf.len() as u64)?;
                    in_place_buffers[s] = Some(buf);
                    in_place_origin[s] = Some((leaf, shard));
                }
            }
        }
        let bindings = engine.finish_bindings()?;
        // Final buffers: in place (bound above), or fresh; cast storages also get a staging buffer
        // for wire bytes.
        let FreshBuffers {
            mut fresh,
            mut staging,
            reused,
        } = FreshBuffers::allocate(&bindings, &manifest.storages, self.options.pool.as_deref())?;
        let mut regions = Vec::with_capacity(bindings.len());
        for (s, b) in bindings.iter().enumerate() {
            let dest: &mut [u8] = match b.dest {
                Dest::Fresh => fresh[s].as_mut().context("fresh buffer")?,
                Dest::InPlace(id) => in_place_buffers
                    .get_mut(id as usize)
                    .and_then(Option::as_deref_mut)
                    .context("in-place buffer")?,
            };
            let dest = Region::new(dest);
            let wire = match staging[s].as_mut() {
                Some(st) => Region::new(st),
                None => dest,
            };
            regions.push(StorageRegions { wire, dest });
        }
        // Fresh wire targets (fresh buffers, and staging of cast storages) go to a prefaulter that maps
        // their pages on another thread ahead of the receiver, in receive (= storage) order, so the
        // receiving thread mostly writes into memory that is already mapped. The regions above keep
        // pointing at the same bytes: buffers are heap/mmap allocations that do not move. Reused
        // buffers are mapped already.
        let mut prefault_index: Vec<Option<usize>> = vec![None; bindings.len()];
        let mut prefault_buffers = Vec::new();
        for s in 0..bindings.len() {
            if reused[s] {
                continue;
            }
            let owned = match staging[s].take() {
                Some(st) => Some((st, true)),
                None => fresh[s].take().map(|f| (f, false)),
            };
            if let Some((buf, is_staging)) = owned {
                prefault_index[s] = Some(prefault_buffers.len());
                prefault_buffers.push((s, is_staging, buf));
            }
        }
        let placement: Vec<(usize, bool)> = prefault_buffers
            .iter()
            .map(|(s, st, _)| (*s, *st))
            .collect();
        let prefaulter =
            Prefaulter::start(prefault_buffers.into_iter().map(|(_, _, b)| b).collect());

        let total = manifest.total_bytes;
        let abort = Abort::default();
        drop(bind_span);
        let data_span = info_span!("data", bytes = total).entered();
        let received_tree = std::thread::scope(|scope| -> Result<crate::engine::ReceivedTree> {
            let (event_tx, event_rx) = mpsc::channel::<Event>();
            let (post_tx, post_rx) = mpsc::sync_channel::<(Vec<Segment>, bool)>(QUEUE_DEPTH);
            let (fwd_tx, fwd_rx) = mpsc::sync_channel::<crate::engine::ForwardStep>(QUEUE_DEPTH);
            let regions = &regions;
            let refs = &manifest.storages;
            let bindings = &bindings;
            let abort = &abort;
            {
                let event_tx = event_tx.clone();
                scope.spawn(move || post_worker(post_rx, regions, refs, bindings, event_tx, abort));
            }
            {
                let event_tx = event_tx.clone();
                let pg = &self.pg;
                scope.spawn(move || {
                    for step in fwd_rx {
                        if abort.is_set() {
                            break;
                        }
                        let result = match &step.payload {
                            OwnedPayload::Bytes(b) => pg.send(step.to, step.tag, &[b], timeout),
                            OwnedPayload::Storages(segs) => {
                                let parts: Vec<&[u8]> = segs
                                    .iter()
                                    // SAFETY: see `Region`: these bytes landed before the engine asked
                                    // to forward them, and nothing writes wire bytes again.
                                    .map(|s| unsafe {
                                        regions[s.storage as usize].wire.slice(s.offset, s.len)
                                    })
                                    .collect();
                                pg.send(step.to, step.tag, &parts, timeout)
                            }
                        };
                        match result {
                            Ok(()) => {
                                let _ = event_tx.send(Event::Forwarded(step.message));
                            }
                            Err(e) => {
                                abort.fail(anyhow!(e).context(format!(
                                    "forwarding message {} to rank {}",
                                    step.message, step.to
                                )));
                                let _ = event_tx.send(Event::Stopped);
                                break;
                            }
                        }
                    }
                });
            }
            drop(event_tx);
            let progress = self.options.progress.clone();
            let mut received = 0u64;
            let result = (|| -> Result<()> {
                let handle = |engine: &mut Box<dyn crate::engine::ReceiverEngine>,
                              ev: Event|
                 -> Result<()> {
                    match ev {
                        Event::Digest(s, d) => engine.handle_storage_digest(s, d)?,
                        Event::Forwarded(m) => engine.handle_forwarded(m)?,
                        Event::Stopped => bail!("a worker stopped"),
                    }
                    Ok(())
                };
                loop {
                    if abort.is_set() {
                        return Ok(());
                    }
                    while let Ok(ev) = event_rx.try_recv() {
                        handle(&mut engine, ev)?;
                    }
                    match engine.poll()? {
                        RecvNext::Recv(step) => match step.kind {
                            MessageKind::Data => {
                                let mut parts: Vec<&mut [u8]> = step
                                    .segments
                                    .iter()
                                    .map(|s| match prefault_index[s.storage as usize] {
                                        Some(i) => prefaulter.claim(
                                            i,
                                            s.offset as usize..(s.offset + s.len) as usize,
                                        ),
                                        // SAFETY: see `Region`: the plan's segments of one message
                                        // are disjoint from every other message's, and no other
                                        // thread touches a message's bytes before it has landed.
                                        None => unsafe {
                                            regions[s.storage as usize]
                                                .wire
                                                .slice_mut(s.offset, s.len)
                                        },
                                    })
                                    .collect();
                                self.pg
                                    .recv_into(step.from, step.tag, &mut parts, timeout)
                                    .with_context(|| {
                                        format!(
                                            "receiving message {} from rank {}",
                                            step.message, step.from
                                        )
                                    })?;
                                received += step.len;
                                if let Some(p) = &progress {
                                    p(received, total);
                                }
                                let needs_post = step.hash
                                    || step
                                        .segments
                                        .iter()
                                        .any(|s| bindings[s.storage as usize].cast_from.is_some());
                                if needs_post {
                                    post_tx
                                        .send((step.segments, step.hash))
                                        .map_err(|_| anyhow!("hashing stopped"))?;
                                }
                                engine.handle_data(step.message)?;
                            }
                            MessageKind::Trailer => {
                                let bytes = self
                                    .pg
                                    .recv_vec(step.from, step.tag, step.len as usize, timeout)
                                    .with_context(|| {
                                        format!(
                                            "receiving the digest trailer from rank {}",
                                            step.from
                                        )
                                    })?;
                                engine.handle_trailer(&bytes)?;
                            }
                            kind => bail!("unexpected {kind:?} receive while streaming"),
                        },
                        RecvNext::Forward(step) => {
                            fwd_tx
                                .send(step)
                                .map_err(|_| anyhow!("forwarding stopped"))?;
                        }
                        RecvNext::Wait => match event_rx.recv_timeout(timeout) {
                            Ok(ev) => handle(&mut engine, ev)?,
                            Err(RecvTimeoutError::Timeout) => {
                                bail!("timed out waiting for hashing/forwarding")
                            }
                            Err(RecvTimeoutError::Disconnected) => {
                                bail!("workers stopped before the transfer completed")
                            }
                        },
                        RecvNext::NeedBindings => bail!("protocol engine asked for bindings twice"),
                        RecvNext::Done => return Ok(()),
                    }
                }
            })();
            drop(post_tx);
            drop(fwd_tx);
            if let Err(e) = result {
                abort.fail(e);
            }
            // Let the workers drain before the result is taken.
            while event_rx.recv().is_ok() {}
            if let Some(e) = abort.take() {
                return Err(e);
            }
            engine.finish()
        })?;
        drop(regions);
        for ((s, is_staging), buf) in placement.into_iter().zip(prefaulter.finish()) {
            if is_staging {
                staging[s] = Some(buf);
            } else {
                fresh[s] = Some(buf);
            }
        }

        drop(data_span);
        let _assemble_span = info_span!("assemble").entered();
        // Assemble the received tree: fresh buffers move in; in-place ones move out of the old tree,
        // from where binding found them.
        drop(in_place_buffers);
        let mut old_entries = if in_place {
            target.take_entries()
        } else {
            Vec::new()
        };
        let mut storages = Vec::with_capacity(received_tree.bindings.len());
        for (s, b) in received_tree.bindings.iter().enumerate() {
            let buf = match b.dest {
                Dest::Fresh => fresh[s].take().context("fresh buffer")?,
                Dest::InPlace(id) => {
                    let (leaf, shard) = in_place_origin
                        .get(id as usize)
                        .copied()
                        .flatten()
                        .with_context(|| format!("in-place buffer {id} was never bound"))?;
                    let storage = old_entries.get_mut(leaf).and_then(|entry| {
                        let tensor = StateDict::entry_tensors_mut(entry).into_iter().nth(shard)?;
                        Some(std::mem::replace(
                            &mut tensor.storage,
                            Storage::Borrowed(&[]),
                        ))
                    });
                    match storage {
                        Some(Storage::Owned(buf)) => buf,
                        _ => bail!("in-place buffer {id} vanished"),
                    }
                }
            };
            storages.push(Storage::Owned(buf));
        }
        let mut storages = storages.into_iter();
        let entries = received_tree
            .leaves
            .into_iter()
            .map(|leaf| Entry::from_leaf(leaf, &mut storages))
            .collect::<crate::Result<Vec<_>>>()?;
        *target = StateDict::unflatten(&received_tree.tree, entries, received_tree.step)?;
        if let Some(pool) = &self.options.pool {
            // Staging held wire bytes only until the cast; the next receive can reuse it.
            pool.recycle(staging.into_iter().flatten());
        }
        Ok(TransferStats {
            bytes: total,
            tensors: manifest.storages.len() as u64,
            seconds: start.elapsed().as_secs_f64(),
            metadata_seconds,
        })
    }
}

/// The buffers a receive allocates, by storage: fresh destinations, staging for cast storages.
struct FreshBuffers {
    fresh: Vec<Option<Buffer>>,
    staging: Vec<Option<Buffer>>,
    /// Whether a storage's wire target (staging if cast, else its fresh buffer) came from the pool.
    reused: Vec<bool>,
}

impl FreshBuffers {
    /// Buffers come from `pool` when it keeps one of the size (pages touched, bytes stale — every
    /// byte is received or cast over them); the other small destinations are carved from one new
    /// mapping (allocating them touches nothing), the rest are allocated each.
    fn allocate(
        bindings: &[Binding],
        storages: &[StorageRef],
        pool: Option<&BufferPool>,
    ) -> Result<FreshBuffers> {
        let n = bindings.len();
        let mut fresh: Vec<Option<Buffer>> = (0..n).map(|_| None).collect();
        let mut staging: Vec<Option<Buffer>> = (0..n).map(|_| None).collect();
        let mut reused = vec![false; n];
        // Small fresh destinations, as (storage, length).
        let mut to_carve: Vec<(usize, usize)> = Vec::new();
        for (s, (b, r)) in bindings.iter().zip(storages).enumerate() {
            let mut wanted = Vec::with_capacity(2);
            if b.dest == Dest::Fresh {
                wanted.push((false, b.nbytes as usize));
            }
            if b.cast_from.is_some() {
                wanted.push((true, r.nbytes as usize));
            }
            for (is_staging, len) in wanted {
                let is_wire = is_staging || b.cast_from.is_none();
                let buf = match pool.and_then(|p| p.take(len)) {
                    Some(buf) => {
                        reused[s] |= is_wire;
                        buf
                    }
                    // Staging is temporary (and may go to the pool): carving it would keep the
                    // destinations' shared mapping alive with it.
                    None if len < MMAP_THRESHOLD && !is_staging => {
                        to_carve.push((s, len));
                        continue;
                    }
                    None => Buffer::try_zeroed(len)
                        .with_context(|| format!("allocating {len} bytes for storage {s}"))?,
                };
                *(if is_staging {
                    &mut staging[s]
                } else {
                    &mut fresh[s]
                }) = Some(buf);
            }
        }
        let carve_lens: Vec<usize> = to_carve.iter().map(|&(_, len)| len).collect();
        let carved = Buffer::zeroed_many(&carve_lens).with_context(|| {
            let total: usize = carve_lens.iter().sum();
            format!("allocating {total} bytes for small storages")
        })?;
        for ((s, _), buf) in to_carve.into_iter().zip(carved) {
            fresh[s] = Some(buf);
        }
        Ok(FreshBuffers {
            fresh,
            staging,
            reused,
        })
    }
}

enum Event {
    Digest(u32, u64),
    Forwarded(usize),
    Stopped,
}

fn storage_parts<'a>(storages: &[&'a [u8]], segs: &[Segment]) -> Vec<&'a [u8]> {
    segs.iter()
        .map(|s| &storages[s.storage as usize][s.offset as usize..(s.offset + s.len) as usize])
        .collect()
}

/// One running hash per storage whose bytes are arriving in order, segment by segment.
struct StorageHashers<'a> {
    refs: &'a [StorageRef],
    running: HashMap<u32, StorageHasher>,
}

impl<'a> StorageHashers<'a> {
    fn new(refs: &'a [StorageRef]) -> Self {
        StorageHashers {
            refs,
            running: HashMap::new(),
        }
    }

    /// Feeds one segment's bytes; returns `(storage, digest)` once the storage's last byte is in.
    fn update(&mut self, seg: &Segment, bytes: &[u8]) -> Option<(u32, u64)> {
        let h = self.running.entry(seg.storage).or_default();
        h.update(bytes);
        if seg.offset + seg.len != self.refs[seg.storage as usize].nbytes {
            return None;
        }
        let d = h.finish();
        self.running.remove(&seg.storage);
        Some((seg.storage, d))
    }
}

/// Hashes (when the message's `bool` says so) and casts what has landed, storage by storage.
fn post_worker(
    rx: Rx<(Vec<Segment>, bool)>,
    regions: &[StorageRegions],
    refs: &[StorageRef],
    bindings: &[Binding],
    tx: mpsc::Sender<Event>,
    abort: &Abort,
) {
    let mut hashers = StorageHashers::new(refs);
    for (segs, hash) in rx {
        for s in segs {
            let r = &regions[s.storage as usize];
            let digest = if hash {
                // SAFETY: see `Region`: the message has landed; the receiving thread no longer
                // writes it.
                let bytes = unsafe { r.wire.slice(s.offset, s.len) };
                match hashers.update(&s, bytes) {
                    Some((_, d)) => Some(d),
                    None => continue,
                }
            } else if s.offset + s.len == refs[s.storage as usize].nbytes {
                None
            } else {
                continue;
            };
            let b = &bindings[s.storage as usize];
            if let Some(from) = b.cast_from {
                // SAFETY: a cast storage's wire bytes are all in staging now; its destination is written
                // only here, once.
                let (wire, dest) =
                    unsafe { (r.wire.slice(0, r.wire.len), r.dest.slice_mut(0, r.dest.len)) };
                if let Err(e) = convert(from, wire, b.dtype, dest) {
                    abort.fail(anyhow!(e));
                    let _ = tx.send(Event::Stopped);
                    return;
                }
            }
            if let Some(d) = digest {
                if tx.send(Event::Digest(s.storage, d)).is_err() {
                    return;
                }
            }
        }
    }
}

/// A raw view of one buffer, shared by the receiving thread (which writes each message's segments once)
/// and the workers (which read a message's segments only after it landed, and write a cast storage's
/// destination only after all its wire bytes landed). The plan guarantees segments never overlap, so
/// no byte is ever accessed mutably by two threads, or read while being written.
#[derive(Clone, Copy)]
struct Region {
    ptr: *mut u8,
    len: u64,
}

// SAFETY: the access discipline above makes cross-thread use data-race free.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(bytes: &mut [u8]) -> Region {
        Region {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len() as u64,
        }
    }

    /// # Safety
    /// The range must be in bounds (the plan's segments are, by validation) and not written concurrently.
    unsafe fn slice<'a>(&self, offset: u64, len: u64) -> &'a [u8] {
        assert!(offset + len <= self.len, "segment out of bounds");
        // SAFETY: in bounds (checked), and the caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset as usize), len as usize) }
    }

    /// # Safety
    /// The range must be in bounds and accessed by no other thread while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut<'a>(&self, offset: u64, len: u64) -> &'a mut [u8] {
        assert!(offset + len <= self.len, "segment out of bounds");
        // SAFETY: in bounds (checked), and the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset as usize), len as usize) }
    }
}

struct StorageRegions {
    wire: Region,
    dest: Region,
}

#[cfg(test)]
mod tests {
    use super::StorageHasher;

    #[test]
    fn host_hasher_equals_the_core_digest() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 + i / 977) as u8).collect();
        for len in [0, 1, 16, 17, 128, 129, 240, 241, 1024, 100_000, 300_000] {
            for split in [1, 7, 4096, 65_536] {
                let mut h = StorageHasher::default();
                for part in data[..len].chunks(split) {
                    h.update(part);
                }
                assert_eq!(
                    h.finish(),
                    pgt_core::digest::digest(&data[..len]),
                    "len {len} split {split}"
                );
            }
        }
    }
}

//! safetensors files in and out of [`StateDict`]s.
//!
//! # Loading ([`load`])
//! The file is memory-mapped and its header parsed by the `safetensors` crate; every tensor becomes a
//! [`Storage::Shared`] range of the one shared mapping, so no tensor byte is copied (sending a loaded
//! file reads it straight from the page cache). The file must not be modified while the state dict
//! (or anything cloned from it) is alive.
//!
//! - **Names.** The state dict is flat, as PyTorch's `model.state_dict()`: one top-level dict whose
//!   string keys are the tensor names byte for byte, dots included (`"model.layers.0.weight"` is one
//!   key), so [`save`] writes the same names back and a Python rank receives the dict that
//!   `load_state_dict` expects.
//! - **Order.** Tensors appear in the order of their bytes in the file, so a loaded file is sent
//!   front to back.
//! - **`__metadata__`.** The file's string→string metadata map, if present (even if empty), becomes a
//!   dict under the reserved top-level key [`METADATA_KEY`] (`"__metadata__"`, first in the root
//!   dict) whose entries are [`Value::Str`], sorted by key. If it has a [`STEP_KEY`] (`"pgt.step"`)
//!   entry holding an integer, that is also the state dict's [`StateDict::step`].
//! - **dtypes.** Mapped by [`DType::from_safetensors_name`]; a safetensors dtype that pgt has no
//!   dtype for (`F4`, `F6_E2M3`, `F6_E3M2`, `F8_E8M0`) is an error naming the tensor.
//!
//! # Saving ([`save`])
//! Every leaf is written under its [`dotted_name`]: a flat dict's keys as they are (so a loaded file
//! saves back under the same names), and the keys of nested dicts, int keys and list indices joined
//! with dots (`{"model": {"layers": [{"w": …}]}}` → `model.layers.0.w`; a root that is itself a leaf
//! is named `<root>`). Nested and flat names can meet (`{"a": {"b": …}}` and `{"a.b": …}`): that is
//! an error naming the key path, never a silent overwrite.
//! - a **tensor** by its view's elements in row-major order: a dense tensor's bytes are written from
//!   its storage as they are, a strided or offset view as its contiguous elements
//!   ([`Tensor::contiguous_bytes`], one tensor at a time); zero-size and 0-dim tensors are fine;
//! - a **DTensor** as its local tensor, under its path; its spec is summarized as JSON in the metadata
//!   entry `pgt.dtensor.<path>` (`global_shape`, `mesh`, `placements`);
//! - a **ShardedTensor** as one tensor per local shard, `<path>.shard<i>` (`i` = index among the local
//!   shards, in order); the global metadata goes in the entry `pgt.sharded.<path>` as JSON
//!   (`global_size`, `dtype`, and `offsets`/`sizes`/`placement` of every local shard);
//! - a **plain value** into `__metadata__`, keyed by its dotted path — except the values of a top-level
//!   [`METADATA_KEY`] dict, which are keyed by their path *inside* that dict, so a loaded file's
//!   metadata is written back unchanged. Strings are written as they are; `None`, bools, ints and
//!   floats as JSON (`null`, `true`, `3`, `-2.5`; non-finite floats as `NaN`, `inf`, `-inf`); bytes as
//!   `0x`-prefixed lowercase hex. Loading gives every entry back as a string (types do not survive).
//! - the **step**, if any, as the metadata entry [`STEP_KEY`].
//!
//! `__metadata__` is written when the root dict has a [`METADATA_KEY`] entry or anything above adds
//! an entry. Two leaves (or metadata entries) with the same dotted name, and tensors whose dtype has no
//! safetensors name (complex types, the `fnuz` float8 variants), are errors naming the key path.
//!
//! The file is written to a temporary file in the destination's directory, synced, then renamed over
//! the destination, so readers see the old file or the whole new one, never a part. Tensor bytes are
//! streamed to the file from the state dict's own storages: no second copy of the checkpoint is made
//! in memory (only one strided view at a time is gathered).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::Mmap;
use pgt_core::dtype::DType;
use pgt_core::layout::{TensorLayout, MAX_VIEW_EXPANSION};
use pgt_core::tree::{Key, KeyPath, PathElem, Value};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::state_dict::{Entry, SharedBytes, StateDict, Storage, Tensor, Tree};
use crate::{Error, Result};

/// The reserved top-level key under which a file's `__metadata__` map lives in a loaded state dict.
pub const METADATA_KEY: &str = "__metadata__";

/// The metadata entry that carries [`StateDict::step`].
pub const STEP_KEY: &str = "pgt.step";

/// The name a leaf at `path` is saved under: its keys and indices joined with dots (decimal numbers
/// for int keys and indices), `<root>` for the empty path.
pub fn dotted_name(path: &KeyPath) -> String {
    if path.0.is_empty() {
        return "<root>".into();
    }
    let mut name = String::new();
    for (i, e) in path.0.iter().enumerate() {
        if i > 0 {
            name.push('.');
        }
        match e {
            PathElem::Key(Key::Str(s)) => name.push_str(s),
            PathElem::Key(Key::Int(n)) => name.push_str(&n.to_string()),
            PathElem::Index(n) => name.push_str(&n.to_string()),
        }
    }
    name
}

/// Loads a safetensors file without copying its tensor bytes (see the [module docs](self) for names,
/// `__metadata__` and dtypes).
pub fn load(path: impl AsRef<Path>) -> Result<StateDict<'static>> {
    let path = path.as_ref();
    let file =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?
        .len();
    if len < 8 {
        return Err(Error::safetensors(
            path,
            format!("not a safetensors file: {len} bytes (the header size alone takes 8)"),
        ));
    }
    // SAFETY: the mapping is read-only; like every reader of a mapped file we rely on nobody truncating
    // or rewriting the file while it is mapped (documented on the module).
    let mmap = unsafe { Mmap::map(&file) }
        .map_err(|e| Error::io(format!("cannot memory-map {}", path.display()), e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::safetensors(path, format!("not a valid safetensors file: {e}")))?;
    let data_start = 8 + header_len;
    let shared: SharedBytes = Arc::new(mmap);

    let mut tensors = Vec::new();
    for name in metadata.offset_keys() {
        let info = metadata
            .info(&name)
            .ok_or_else(|| Error::safetensors(path, format!("tensor {name:?} vanished")))?;
        let st_name = info.dtype.to_string();
        let dtype = DType::from_safetensors_name(&st_name).ok_or_else(|| {
            Error::safetensors(
                path,
                format!("tensor {name:?} has dtype {st_name}, which pgt does not support"),
            )
        })?;
        let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
        let (start, end) = info.data_offsets;
        let tensor = Tensor::new(
            TensorLayout::contiguous(dtype, &shape),
            Storage::Shared(shared.clone(), data_start + start..data_start + end),
        )
        .map_err(|e| Error::safetensors(path, format!("tensor {name:?}: {e}")))?;
        tensors.push((name, tensor));
    }

    let mut root: Vec<(Key, Tree<'static>)> = tensors
        .into_iter()
        .map(|(name, t)| (Key::Str(name), Tree::Leaf(Entry::Tensor(t))))
        .collect();
    let mut step = None;
    if let Some(map) = metadata.metadata() {
        let sorted: BTreeMap<&String, &String> = map.iter().collect();
        if let Some(s) = sorted.get(&STEP_KEY.to_string()) {
            step = s.trim().parse::<u64>().ok();
        }
        let items = sorted
            .into_iter()
            .map(|(k, v)| {
                (
                    Key::Str(k.clone()),
                    Tree::Leaf(Entry::Value(Value::Str(v.clone()))),
                )
            })
            .collect();
        root.insert(0, (Key::Str(METADATA_KEY.into()), Tree::Dict(items)));
    }
    Ok(StateDict {
        root: Tree::Dict(root),
        step,
    })
}

/// A tensor as the `safetensors` crate's [`View`]: bytes borrowed from the state dict's storage (dense
/// views), or gathered when the serializer asks for them (strided views). [`View::data`] cannot fail:
/// a gather that does (memory) leaves its error in `failed` and the file is not committed.
struct TensorData<'s, 'a> {
    tensor: &'s Tensor<'a>,
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
    name: String,
    failed: &'s std::cell::RefCell<Option<pgt_core::Error>>,
}

impl View for TensorData<'_, '_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let l = &self.tensor.layout;
        if l.is_contiguous() {
            if let Ok(range) = l.byte_range() {
                let bytes = self.tensor.storage.bytes();
                if let Some(b) = bytes.get(range.start as usize..range.end as usize) {
                    if b.len() == self.len {
                        return Cow::Borrowed(b);
                    }
                }
            }
        }
        // At most `len` bytes: `save` has checked that against the expansion budget.
        match l.gather(self.tensor.storage.bytes(), self.len as u64) {
            Ok(b) => Cow::Owned(b),
            Err(e) => {
                let e = match e {
                    pgt_core::Error::ViewTooLarge { bytes, max, .. } => {
                        pgt_core::Error::ViewTooLarge {
                            path: self.name.clone(),
                            bytes,
                            max,
                        }
                    }
                    e => e,
                };
                self.failed.borrow_mut().get_or_insert(e);
                Cow::Borrowed(&[])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.len
    }
}

fn st_dtype(dtype: DType, name: &str) -> Result<Dtype> {
    let st = dtype.safetensors_name().ok_or_else(|| {
        Error::state_dict(
            name,
            format!("dtype {dtype} cannot be stored in a safetensors file"),
        )
    })?;
    serde_json::from_value(serde_json::Value::String(st.into()))
        .map_err(|e| Error::state_dict(name, format!("safetensors does not know dtype {st}: {e}")))
}

fn tensor_data<'s, 'a>(
    t: &'s Tensor<'a>,
    name: &str,
    failed: &'s std::cell::RefCell<Option<pgt_core::Error>>,
) -> Result<TensorData<'s, 'a>> {
    let l = &t.layout;
    let numel = l
        .numel()
        .ok_or_else(|| Error::state_dict(name, "element count overflows"))?;
    let len = numel
        .checked_mul(l.dtype.element_size())
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::state_dict(name, "byte size overflows"))?;
    Ok(TensorData {
        tensor: t,
        dtype: st_dtype(l.dtype, name)?,
        shape: l.shape.iter().map(|&d| d as usize).collect(),
        len,
        name: name.to_string(),
        failed,
    })
}

/// The largest header the `safetensors` library loads: its `MAX_HEADER_SIZE` (private; 100,000,000 bytes
/// in `safetensors` 0.6's `tensor.rs`, which the Python package runs too). It refuses a longer one as
/// "header too large", so [`save`] refuses to write one ([`Error::SafetensorsHeaderTooLarge`]).
pub const SAFETENSORS_MAX_HEADER: u64 = 100_000_000;

/// The length of the header `safetensors::serialize_to_file` writes for `views` and `metadata`: the
/// JSON of `__metadata__` and of every tensor's info (dtype, shape, data offsets, with the tensors
/// laid out as the writer lays them out: by descending dtype, then name), padded with spaces to a
/// multiple of 8. Counted without building it.
fn header_len(
    views: &[(String, TensorData<'_, '_>)],
    metadata: Option<&HashMap<String, String>>,
) -> Result<u64> {
    use safetensors::tensor::TensorInfo;

    let mut order: Vec<&(String, TensorData<'_, '_>)> = views.iter().collect();
    order.sort_by(|(ln, l), (rn, r)| r.dtype.cmp(&l.dtype).then(ln.cmp(rn)));
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(order.len());
    for (name, v) in order {
        let end = offset
            .checked_add(v.len)
            .ok_or_else(|| Error::state_dict(name, "file size overflows"))?;
        infos.push((
            name.as_str(),
            TensorInfo {
                dtype: v.dtype,
                shape: v.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // serde_json's compact map: `{` + `"key":value` entries joined by `,` + `}`.
    let mut count = Count(0);
    let mut entries = 0u64;
    let json =
        |e: serde_json::Error| Error::state_dict("", format!("cannot encode the header: {e}"));
    if let Some(m) = metadata {
        serde_json::to_writer(&mut count, "__metadata__").map_err(json)?;
        serde_json::to_writer(&mut count, m).map_err(json)?;
        entries += 1;
    }
    for (name, info) in &infos {
        serde_json::to_writer(&mut count, name).map_err(json)?;
        serde_json::to_writer(&mut count, info).map_err(json)?;
        entries += 1;
    }
    count.0 += 2 + entries + entries.saturating_sub(1);
    Ok(count.0.next_multiple_of(8))
}

/// A value as a metadata string (see the module docs).
pub fn value_repr(v: &Value) -> String {
    match v {
        Value::None => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) if f.is_nan() => "NaN".into(),
        Value::Float(f) if f.is_infinite() => if *f > 0.0 { "inf" } else { "-inf" }.into(),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(|n| n.to_string())
            .unwrap_or_else(|| f.to_string()),
        Value::Str(s) => s.clone(),
        Value::Bytes(b) => {
            let mut s = String::with_capacity(2 + 2 * b.len());
            s.push_str("0x");
            for x in b {
                s.push_str(&format!("{x:02x}"));
            }
            s
        }
    }
}

fn is_metadata_key(e: &PathElem) -> bool {
    matches!(e, PathElem::Key(Key::Str(s)) if s == METADATA_KEY)
}

/// Saves `state_dict` as a safetensors file at `path`, atomically (see the [module docs](self) for how
/// each kind of leaf is written).
pub fn save(state_dict: &StateDict<'_>, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let mut metadata: HashMap<String, String> = HashMap::new();
    let mut write_metadata = matches!(&state_dict.root, Tree::Dict(items)
        if items.iter().any(|(k, _)| matches!(k, Key::Str(s) if s == METADATA_KEY)));
    let mut meta = |key: String, value: String| -> Result<()> {
        if metadata.contains_key(&key) {
            return Err(Error::state_dict(
                key,
                "two values would share this __metadata__ entry",
            ));
        }
        metadata.insert(key, value);
        Ok(())
    };
    // Values, and what the file can't say about DTensors and ShardedTensors, go to the metadata.
    for (kp, entry) in state_dict.entries() {
        let name = dotted_name(&kp);
        match entry {
            Entry::Value(v) => {
                let key = match kp.0.split_first() {
                    Some((first, rest)) if is_metadata_key(first) && !rest.is_empty() => {
                        dotted_name(&KeyPath(rest.to_vec()))
                    }
                    _ => name,
                };
                meta(key, value_repr(v))?;
            }
            Entry::Tensor(_) => {}
            Entry::DTensor { spec, .. } => {
                let summary = serde_json::json!({
                    "global_shape": spec.global_shape,
                    "mesh": spec.mesh.shape,
                    "placements": spec.placements.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>(),
                });
                meta(format!("pgt.dtensor.{name}"), summary.to_string())?;
            }
            Entry::Sharded {
                local_shards,
                global,
            } => {
                let shards: Vec<serde_json::Value> = local_shards
                    .iter()
                    .map(|(_, m)| {
                        serde_json::json!({
                            "offsets": m.offsets, "sizes": m.sizes, "placement": m.placement,
                        })
                    })
                    .collect();
                let summary = serde_json::json!({
                    "global_size": global.global_size,
                    "dtype": global.dtype.torch_name(),
                    "local_shards": shards,
                });
                meta(format!("pgt.sharded.{name}"), summary.to_string())?;
            }
        }
    }
    // The tensors, named as `tensor_names` says. Views that repeat storage elements (stride 0,
    // overlapping strides) take more bytes written out than their storage: at most
    // MAX_VIEW_EXPANSION more in all, checked before anything is gathered or written.
    let failed = std::cell::RefCell::new(None);
    let mut names: HashSet<String> = HashSet::new();
    let mut views: Vec<(String, TensorData<'_, '_>)> = Vec::new();
    let mut expansion = 0u64;
    for (name, t) in tensor_names(state_dict) {
        if !names.insert(name.clone()) {
            return Err(Error::state_dict(name, "two tensors would share this name"));
        }
        let bytes = t
            .layout
            .view_nbytes()
            .map_err(|_| Error::state_dict(&name, "byte size overflows"))?;
        let extra = bytes.saturating_sub(t.layout.nbytes);
        let left = MAX_VIEW_EXPANSION - expansion;
        if extra > left {
            return Err(pgt_core::Error::ViewTooLarge {
                path: name,
                bytes,
                max: t.layout.nbytes.saturating_add(left),
            }
            .into());
        }
        expansion += extra;
        let view = tensor_data(t, &name, &failed)?;
        views.push((name, view));
    }
    if let Some(step) = state_dict.step {
        metadata.insert(STEP_KEY.into(), step.to_string());
    }
    write_metadata |= !metadata.is_empty();
    let metadata = write_metadata.then_some(metadata);
    let header = header_len(&views, metadata.as_ref())?;
    if header > SAFETENSORS_MAX_HEADER {
        return Err(Error::SafetensorsHeaderTooLarge {
            file: path.to_path_buf(),
            bytes: header,
            max: SAFETENSORS_MAX_HEADER,
        });
    }

    let tmp = TempFile::new(path)?;
    safetensors::tensor::serialize_to_file(views, metadata, &tmp.path)
        .map_err(|e| Error::safetensors(&tmp.path, format!("cannot write: {e}")))?;
    if let Some(e) = failed.into_inner() {
        return Err(e.into());
    }
    tmp.commit(path)
}

/// A temporary file next to the destination, removed unless committed.
struct TempFile {
    path: PathBuf,
    committed: bool,
}

impl TempFile {
    fn new(dest: &Path) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let file_name = dest
            .file_name()
            .ok_or_else(|| Error::safetensors(dest, "not a file path"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(TempFile {
            path: dest.with_file_name(tmp_name),
            committed: false,
        })
    }

    /// Syncs the file and renames it to `dest` (then syncs the directory, best effort).
    fn commit(mut self, dest: &Path) -> Result<()> {
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(format!("cannot sync {}", self.path.display()), e))?;
        std::fs::rename(&self.path, dest).map_err(|e| {
            let context = format!(
                "cannot rename {} to {}",
                self.path.display(),
                dest.display()
            );
            Error::io(context, e)
        })?;
        self.committed = true;
        if let Some(dir) = dest.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Every tensor a [`save`] of `state_dict` would write, by name, in depth-first order (without
/// writing anything): for tools that compare a file with a state dict.
pub fn tensor_names<'s, 'a>(state_dict: &'s StateDict<'a>) -> Vec<(String, &'s Tensor<'a>)> {
    let mut out = Vec::new();
    for (kp, entry) in state_dict.entries() {
        let name = dotted_name(&kp);
        match entry {
            Entry::Value(_) => {}
            Entry::Tensor(t) | Entry::DTensor { local: t, .. } => out.push((name, t)),
            Entry::Sharded { local_shards, .. } => {
                for (i, (t, _)) in local_shards.iter().enumerate() {
                    out.push((format!("{name}.shard{i}"), t));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement};
    use pgt_core::sharded::{ShardMetadata, ShardedTensorMetadata};

    use crate::memory::Buffer;

    /// A fresh, empty directory for one test.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pgt-safetensors-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn f32s(shape: &[u64], start: f32) -> Tensor<'static> {
        let n: u64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| start + i as f32).collect();
        Tensor::from_values(shape, &v).expect("tensor")
    }

    fn str_key(s: &str) -> Key {
        Key::Str(s.into())
    }

    /// Name → (dtype, shape, bytes) of every tensor of a file.
    type RawTensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

    /// A file's tensors and metadata, read with the safetensors crate alone.
    fn read_raw(path: &Path) -> (RawTensors, Option<HashMap<String, String>>) {
        let bytes = std::fs::read(path).expect("read");
        let st = SafeTensors::deserialize(&bytes).expect("valid file");
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("metadata");
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect();
        (tensors, meta.metadata().clone())
    }

    #[test]
    fn round_trip_keeps_tensors_bytes_shapes_dtypes() {
        let dir = temp_dir("round-trip");
        let mut sd = StateDict::new();
        sd.insert("w", Entry::Tensor(f32s(&[2, 3], 1.0))).unwrap();
        let bf: Vec<half::bf16> = [1.5f32, -2.0, 3.25]
            .iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect();
        sd.insert("b", Entry::Tensor(Tensor::from_values(&[3], &bf).unwrap()))
            .unwrap();
        sd.insert(
            "step_t",
            Entry::Tensor(Tensor::from_values::<i64>(&[], &[-7]).unwrap()),
        )
        .unwrap();
        sd.insert(
            "empty",
            Entry::Tensor(Tensor::from_bytes(DType::UInt8, &[0, 4], &[]).unwrap()),
        )
        .unwrap();
        sd.insert(
            "mask",
            Entry::Tensor(Tensor::from_bytes(DType::Bool, &[4], &[1, 0, 0, 1]).unwrap()),
        )
        .unwrap();
        sd.insert(
            "f8",
            Entry::Tensor(Tensor::from_bytes(DType::Float8E4M3Fn, &[2], &[7, 9]).unwrap()),
        )
        .unwrap();
        let path = dir.join("model.safetensors");
        save(&sd, &path).unwrap();
        let back = load(&path).unwrap();
        let before = tensor_names(&sd);
        let after = tensor_names(&back);
        assert_eq!(before.len(), after.len());
        for (name, t) in &before {
            let u = back
                .tensor(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(u.dtype(), t.dtype(), "{name}");
            assert_eq!(u.shape(), t.shape(), "{name}");
            assert_eq!(
                u.contiguous_bytes().unwrap(),
                t.contiguous_bytes().unwrap(),
                "{name}"
            );
            assert!(
                matches!(u.storage, Storage::Shared(..)),
                "{name} is not mapped"
            );
        }
        assert_eq!(
            back.tensor("w").unwrap().to_vec::<f32>().unwrap(),
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!(back.step, None);
        // No metadata was written: nothing asked for it.
        assert!(read_raw(&path).1.is_none());
        // No temp file is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("model.safetensors")]);
        // Saving what was loaded writes the same tensors.
        let again = dir.join("again.safetensors");
        save(&back, &again).unwrap();
        assert_eq!(read_raw(&path).0, read_raw(&again).0);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn loaded_tensors_share_one_mapping() {
        let dir = temp_dir("shared");
        let mut sd = StateDict::new();
        sd.insert("a", Entry::Tensor(f32s(&[4], 0.0))).unwrap();
        sd.insert("b", Entry::Tensor(f32s(&[4], 10.0))).unwrap();
        let path = dir.join("x.safetensors");
        save(&sd, &path).unwrap();
        let back = load(&path).unwrap();
        let (Storage::Shared(a, ra), Storage::Shared(b, rb)) = (
            &back.tensor("a").unwrap().storage,
            &back.tensor("b").unwrap().storage,
        ) else {
            panic!("not shared");
        };
        assert!(Arc::ptr_eq(a, b));
        assert_eq!(ra.len(), 16);
        assert_eq!(rb.len(), 16);
        assert_eq!(
            a.as_ref().as_ref().len() as u64,
            std::fs::metadata(&path).unwrap().len()
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn names_load_as_flat_keys_and_save_back_byte_for_byte() {
        let dir = temp_dir("flat");
        // Torch-shaped names, including ones that are prefixes of others at a dot and odd bytes.
        let names = [
            "net1.weight",
            "net1.bias",
            "layers.0.bias",
            "a",
            "a.b",
            "..",
            "größe.0",
            "__metadata__.x",
        ];
        let sd: StateDict = names
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, f32s(&[2], i as f32)))
            .collect();
        let path = dir.join("f.safetensors");
        save(&sd, &path).unwrap();
        let back = load(&path).unwrap();
        let Tree::Dict(root) = &back.root else {
            panic!("root is not a dict")
        };
        // One flat key per name, in the order of the file's bytes (as written: by name).
        let mut sorted = names.to_vec();
        sorted.sort();
        let keys: Vec<&Key> = root.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            sorted
                .iter()
                .map(|n| str_key(n))
                .collect::<Vec<_>>()
                .iter()
                .collect::<Vec<_>>()
        );
        for (i, n) in names.iter().enumerate() {
            assert_eq!(
                back.tensor(*n).unwrap().to_vec::<f32>().unwrap(),
                [i as f32, i as f32 + 1.0],
                "{n}"
            );
        }
        assert!(back.tensor(&["net1", "weight"]).is_none(), "not nested");
        let again = dir.join("again.safetensors");
        save(&back, &again).unwrap();
        let saved: Vec<String> = read_raw(&again).0.into_keys().collect();
        assert_eq!(saved, sorted);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn nested_dicts_save_under_dotted_names_and_clashes_are_errors() {
        let dir = temp_dir("nested");
        let mut sd = StateDict::new();
        sd.insert_path(&["model", "layers", "0", "weight"], f32s(&[2, 2], 0.0))
            .unwrap();
        sd.insert("lm_head.weight", f32s(&[3], 9.0)).unwrap();
        let path = dir.join("n.safetensors");
        save(&sd, &path).unwrap();
        let names: Vec<String> = read_raw(&path).0.into_keys().collect();
        assert_eq!(names, ["lm_head.weight", "model.layers.0.weight"]);
        // Loaded back flat: the nesting was the user's, the file has names.
        let back = load(&path).unwrap();
        assert!(back.tensor("model.layers.0.weight").is_some());
        // A nested and a flat key with the same dotted name cannot share the file.
        sd.insert("model.layers.0.weight", f32s(&[1], 1.0)).unwrap();
        let err = save(&sd, &path).unwrap_err().to_string();
        assert!(err.contains("two tensors would share this name"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn metadata_values_and_step_travel() {
        let dir = temp_dir("metadata");
        // A file with metadata, written by the safetensors crate directly.
        let path = dir.join("m.safetensors");
        let data = [0u8; 8];
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &data).unwrap();
        let meta: HashMap<String, String> = [
            ("format".to_string(), "pt".to_string()),
            (STEP_KEY.to_string(), "42".to_string()),
        ]
        .into_iter()
        .collect();
        safetensors::tensor::serialize_to_file([("x", view)], Some(meta.clone()), &path).unwrap();
        let sd = load(&path).unwrap();
        assert_eq!(sd.step, Some(42));
        let Tree::Dict(root) = &sd.root else { panic!() };
        assert_eq!(root[0].0, str_key(METADATA_KEY), "__metadata__ comes first");
        assert!(matches!(
            sd.get(&["__metadata__", "format"]),
            Some(Entry::Value(Value::Str(s))) if s == "pt"
        ));
        // Saved back unchanged.
        let again = dir.join("again.safetensors");
        save(&sd, &again).unwrap();
        assert_eq!(read_raw(&again).1, Some(meta));

        // Plain values elsewhere go into __metadata__ by their dotted path, as JSON-ish strings.
        let mut sd = StateDict::new();
        sd.insert("w", Entry::Tensor(f32s(&[1], 0.0))).unwrap();
        sd.insert("opt.lr", Entry::Value(Value::Float(0.5)))
            .unwrap();
        sd.insert("opt.nan", Entry::Value(Value::Float(f64::NAN)))
            .unwrap();
        sd.insert("opt.epoch", Entry::Value(Value::Int(-3)))
            .unwrap();
        sd.insert("opt.name", Entry::Value(Value::Str("adam".into())))
            .unwrap();
        sd.insert("opt.flag", Entry::Value(Value::Bool(true)))
            .unwrap();
        sd.insert("opt.none", Entry::Value(Value::None)).unwrap();
        sd.insert("opt.raw", Entry::Value(Value::Bytes(vec![1, 0xab])))
            .unwrap();
        sd.insert_path(&["__metadata__", "format"], Value::Str("pt".into()))
            .unwrap();
        sd.step = Some(7);
        let path = dir.join("v.safetensors");
        save(&sd, &path).unwrap();
        let got = read_raw(&path).1.expect("metadata written");
        let want: HashMap<String, String> = [
            ("opt.lr", "0.5"),
            ("opt.nan", "NaN"),
            ("opt.epoch", "-3"),
            ("opt.name", "adam"),
            ("opt.flag", "true"),
            ("opt.none", "null"),
            ("opt.raw", "0x01ab"),
            ("format", "pt"),
            (STEP_KEY, "7"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
        assert_eq!(load(&path).unwrap().step, Some(7));

        // Two values that would share an entry are an error naming it.
        sd.insert("format", Entry::Value(Value::Int(1))).unwrap();
        let err = save(&sd, dir.join("dup.safetensors")).unwrap_err();
        assert!(format!("{err:#}").contains("format"), "{err:#}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn strided_views_are_saved_contiguous() {
        let dir = temp_dir("strided");
        // A [3, 2] transposed view (stride [1, 3]) of a 6-element bfloat16 storage [[0,1,2],[3,4,5]].
        let vals: Vec<half::bf16> = (0..6).map(|i| half::bf16::from_f32(i as f32)).collect();
        let storage = Buffer::from_slice(bytemuck::cast_slice(&vals));
        let layout = TensorLayout {
            dtype: DType::BFloat16,
            shape: vec![3, 2],
            stride: vec![1, 3],
            storage_offset: 0,
            nbytes: 12,
        };
        let t = Tensor::new(layout, Storage::Owned(storage)).unwrap();
        // An offset view: elements 3..5 of a 6-element int64 storage.
        let longs: Vec<i64> = (10..16).collect();
        let off = Tensor::new(
            TensorLayout {
                dtype: DType::Int64,
                shape: vec![2],
                stride: vec![1],
                storage_offset: 3,
                nbytes: 48,
            },
            Storage::Borrowed(bytemuck::cast_slice(&longs)),
        )
        .unwrap();
        let mut sd = StateDict::new();
        sd.insert("t", Entry::Tensor(t)).unwrap();
        sd.insert("off", Entry::Tensor(off)).unwrap();
        let path = dir.join("s.safetensors");
        save(&sd, &path).unwrap();
        let back = load(&path).unwrap();
        let t = back.tensor("t").unwrap();
        assert_eq!(t.shape(), [3, 2]);
        assert!(t.layout.is_dense());
        let got: Vec<f32> = t
            .to_vec::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert_eq!(got, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(
            back.tensor("off").unwrap().to_vec::<i64>().unwrap(),
            [13, 14]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn dtensors_and_sharded_tensors_are_saved_by_their_local_tensors() {
        let dir = temp_dir("dist");
        let spec = DTensorSpec {
            mesh: DeviceMesh {
                shape: vec![2],
                ranks: vec![0, 1],
                dim_names: None,
                device_type: "cpu".into(),
            },
            placements: vec![Placement::Shard(0)],
            global_shape: vec![4, 2],
            global_stride: vec![2, 1],
            dtype: DType::Float32,
        };
        let shard = |row: u64| ShardMetadata {
            offsets: vec![row, 0],
            sizes: vec![2, 2],
            placement: "rank:0/cpu".into(),
        };
        let mut sd = StateDict::new();
        sd.insert(
            "d",
            Entry::DTensor {
                local: f32s(&[2, 2], 0.0),
                spec,
            },
        )
        .unwrap();
        sd.insert(
            "s",
            Entry::Sharded {
                local_shards: vec![
                    (f32s(&[2, 2], 10.0), shard(0)),
                    (f32s(&[2, 2], 20.0), shard(4)),
                ],
                global: ShardedTensorMetadata {
                    shards: vec![shard(0), shard(2), shard(4), shard(6)],
                    global_size: vec![8, 2],
                    dtype: DType::Float32,
                },
            },
        )
        .unwrap();
        let path = dir.join("d.safetensors");
        save(&sd, &path).unwrap();
        let (tensors, meta) = read_raw(&path);
        let names: Vec<&String> = tensors.keys().collect();
        assert_eq!(names, ["d", "s.shard0", "s.shard1"]);
        let meta = meta.unwrap();
        let d: serde_json::Value = serde_json::from_str(&meta["pgt.dtensor.d"]).unwrap();
        assert_eq!(d["global_shape"], serde_json::json!([4, 2]));
        let s: serde_json::Value = serde_json::from_str(&meta["pgt.sharded.s"]).unwrap();
        assert_eq!(s["local_shards"][1]["offsets"], serde_json::json!([4, 0]));
        let back = load(&path).unwrap();
        assert_eq!(
            back.tensor("s.shard1").unwrap().to_vec::<f32>().unwrap(),
            [20.0, 21.0, 22.0, 23.0]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn dtypes_without_a_safetensors_name_are_errors_naming_the_key() {
        let dir = temp_dir("dtype");
        let mut sd = StateDict::new();
        sd.insert("ok", Entry::Tensor(f32s(&[1], 0.0))).unwrap();
        sd.insert(
            "layer.c",
            Entry::Tensor(Tensor::from_bytes(DType::Complex64, &[1], &[0; 8]).unwrap()),
        )
        .unwrap();
        let path = dir.join("c.safetensors");
        let err = format!("{:#}", save(&sd, &path).unwrap_err());
        assert!(
            err.contains("layer.c") && err.contains("complex64"),
            "{err}"
        );
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "no temp file left"
        );

        // And a file whose dtype pgt lacks names the tensor.
        let data = [0u8; 4];
        let view = safetensors::tensor::TensorView::new(Dtype::F8_E8M0, vec![4], &data).unwrap();
        let path = dir.join("e8m0.safetensors");
        safetensors::tensor::serialize_to_file([("scales.x", view)], None, &path).unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("scales.x") && err.contains("F8_E8M0"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        let dir = temp_dir("malformed");
        let mut sd = StateDict::new();
        sd.insert("w", Entry::Tensor(f32s(&[4], 0.0))).unwrap();
        let good = dir.join("good.safetensors");
        save(&sd, &good).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "not a safetensors file"),
            ("short", vec![1, 2, 3], "not a safetensors file"),
            (
                "truncated",
                bytes[..bytes.len() - 1].to_vec(),
                "not a valid safetensors file",
            ),
            (
                "longer",
                [&bytes[..], &[0]].concat(),
                "not a valid safetensors file",
            ),
            (
                "huge-header",
                u64::MAX.to_le_bytes().to_vec(),
                "not a valid safetensors file",
            ),
            (
                "garbage",
                b"\x10\0\0\0\0\0\0\0not json at all!".to_vec(),
                "invalid JSON",
            ),
            (
                "pgt-blob",
                b"PGT\0\x01\0\x01\0 and so on".to_vec(),
                "not a valid safetensors file",
            ),
        ];
        for (name, content, want) in cases {
            let p = dir.join(format!("{name}.safetensors"));
            std::fs::write(&p, content).unwrap();
            let err = format!("{:#}", load(&p).expect_err(name));
            assert!(err.contains(want) && err.contains(name), "{name}: {err}");
        }
        let err = format!("{:#}", load(dir.join("missing.safetensors")).unwrap_err());
        assert!(
            err.contains("cannot open") && err.contains("missing.safetensors"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn save_replaces_an_existing_file() {
        let dir = temp_dir("replace");
        let path = dir.join("r.safetensors");
        std::fs::write(&path, b"old contents").unwrap();
        let mut sd = StateDict::new();
        sd.insert("w", Entry::Tensor(f32s(&[2], 1.0))).unwrap();
        save(&sd, &path).unwrap();
        assert_eq!(
            load(&path)
                .unwrap()
                .tensor("w")
                .unwrap()
                .to_vec::<f32>()
                .unwrap(),
            [1.0, 2.0]
        );
        // A root that is itself a tensor is named <root>.
        let root = StateDict {
            root: Tree::Leaf(Entry::Tensor(f32s(&[1], 3.0))),
            step: None,
        };
        save(&root, &path).unwrap();
        assert!(load(&path).unwrap().tensor("<root>").is_some());
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The files in `dir`, sorted.
    fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A float32 tensor of `shape` whose every element is the one element of a 4-byte storage.
    fn broadcast(shape: &[u64], value: f32) -> Tensor<'static> {
        let layout = TensorLayout {
            dtype: DType::Float32,
            shape: shape.to_vec(),
            stride: vec![0; shape.len()],
            storage_offset: 0,
            nbytes: 4,
        };
        Tensor::new(
            layout,
            Storage::Owned(Buffer::from_slice(&value.to_le_bytes())),
        )
        .unwrap()
    }

    #[test]
    fn views_that_repeat_their_storage_are_bounded() {
        let dir = temp_dir("broadcast");
        let path = dir.join("b.safetensors");
        // 4 bytes broadcast to [2^20, 2^20]: 4 TiB written out. Refused before anything is
        // gathered or a file created.
        let mut sd = StateDict::new();
        sd.insert("w", Entry::Tensor(f32s(&[2], 0.0))).unwrap();
        sd.insert(
            "model.bias",
            Entry::Tensor(broadcast(&[1 << 20, 1 << 20], 1.0)),
        )
        .unwrap();
        let err = save(&sd, &path).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Protocol(pgt_core::Error::ViewTooLarge { path, bytes, max })
                    if path == "model.bias" && *bytes == 1 << 42 && *max == 4 + MAX_VIEW_EXPANSION
            ),
            "{err:?}"
        );
        assert!(format!("{err:#}").starts_with("model.bias: "), "{err:#}");
        assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
        // A smaller broadcast (16 MiB) is written out expanded, as torch's `contiguous()`.
        let mut sd = StateDict::new();
        sd.insert("b", Entry::Tensor(broadcast(&[1 << 11, 1 << 11], 2.5)))
            .unwrap();
        save(&sd, &path).unwrap();
        let back = load(&path).unwrap();
        let b = back.tensor("b").unwrap();
        assert_eq!(b.shape(), &[1 << 11, 1 << 11]);
        assert!(b.storage_as::<f32>().unwrap().iter().all(|&x| x == 2.5));
        // The budget is for the whole file: two broadcasts of 40 MiB each are one too many.
        let mut sd = StateDict::new();
        sd.insert("a", Entry::Tensor(broadcast(&[10 << 20], 1.0)))
            .unwrap();
        sd.insert("c", Entry::Tensor(broadcast(&[10 << 20], 1.0)))
            .unwrap();
        let err = save(&sd, &path).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Protocol(pgt_core::Error::ViewTooLarge { path, bytes, max })
                    if path == "c"
                        && *bytes == 40 << 20
                        && *max == 4 + MAX_VIEW_EXPANSION - ((40 << 20) - 4)
            ),
            "{err:?}"
        );
        // The earlier file is untouched and nothing else was left behind.
        assert_eq!(files_in(&dir), ["b.safetensors"]);
        assert_eq!(
            load(&path).unwrap().tensor("b").unwrap().shape(),
            &[1 << 11, 1 << 11]
        );
        // And reading such a view as values is bounded the same way.
        let huge = broadcast(&[1 << 20, 1 << 20], 1.0);
        assert!(matches!(
            huge.to_vec::<f32>().unwrap_err(),
            Error::Protocol(pgt_core::Error::ViewTooLarge { bytes, .. }) if bytes == 1 << 42
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A state dict with one tensor and a plain string value `v`.
    fn with_value(v: String) -> StateDict<'static> {
        let mut sd = StateDict::new();
        sd.insert("w", Entry::Tensor(f32s(&[2], 0.0))).unwrap();
        sd.insert("note", Entry::Value(Value::Str(v))).unwrap();
        sd
    }

    #[test]
    fn headers_the_library_would_refuse_are_not_written() {
        let dir = temp_dir("header");
        let path = dir.join("h.safetensors");
        // The header's JSON without the value's characters.
        save(&with_value(String::new()), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let base = std::str::from_utf8(&bytes[8..8 + n])
            .unwrap()
            .trim_end()
            .len() as u64;
        std::fs::remove_file(&path).unwrap();

        // A value that makes the header exactly the library's limit: written, and the library loads
        // it.
        let fits = "x".repeat((SAFETENSORS_MAX_HEADER - base) as usize);
        save(&with_value(fits.clone()), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            u64::from_le_bytes(bytes[..8].try_into().unwrap()),
            SAFETENSORS_MAX_HEADER
        );
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("the library loads it");
        assert_eq!(meta.metadata().as_ref().unwrap()["note"], fits);
        drop(bytes);
        std::fs::remove_file(&path).unwrap();

        // One character more: refused, and no file. The library itself would refuse that file.
        let over = format!("{fits}x");
        let err = save(&with_value(over.clone()), &path).unwrap_err();
        let want = SAFETENSORS_MAX_HEADER + 8;
        assert!(
            matches!(
                &err,
                Error::SafetensorsHeaderTooLarge { file, bytes, max }
                    if *bytes == want && *max == SAFETENSORS_MAX_HEADER && file == &path
            ),
            "{err:#}"
        );
        assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
        let raw = dir.join("raw.safetensors");
        let data = [0u8; 8];
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &data).unwrap();
        let meta = HashMap::from([("note".to_string(), over)]);
        safetensors::tensor::serialize_to_file([("w", view)], Some(meta), &raw).unwrap();
        let bytes = std::fs::read(&raw).unwrap();
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()), want);
        assert!(matches!(
            SafeTensors::read_metadata(&bytes),
            Err(safetensors::SafeTensorError::HeaderTooLarge)
        ));
        drop(bytes);
        std::fs::remove_file(&raw).unwrap();

        // 20 MB of control characters: JSON escapes each as 6 bytes, 120 MB of header.
        let err = save(&with_value("\u{1}".repeat(20_000_000)), &path).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("safetensors header would be 1200000") && msg.contains("h.safetensors"),
            "{msg}"
        );
        assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
        std::fs::remove_dir_all(&dir).ok();
    }
}

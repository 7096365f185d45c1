//! safetensors files in and out of [`StateDict`]s.
//!
//! # Loading ([`load`])
//! The file is memory-mapped and its header parsed by the `safetensors` crate; every tensor becomes a
//! [`Storage::Shared`] range of the one shared mapping, so no tensor byte is copied (sending a loaded
//! file reads it straight from the page cache). The file must not be modified while the state dict
//! (or anything cloned from it) is alive.
//!
//! - **Names.** A tensor name with dots becomes a path of nested dicts with string keys:
//!   `model.layers.0.weight` → `model` → `layers` → `"0"` → `weight` (every key stays a string, so
//!   [`save`] writes the same name back). If one name is a prefix of another at a dot (`a` and `a.b`),
//!   or a name's first part is [`METADATA_KEY`], the names cannot all be nested: the **whole file** is
//!   then loaded flat — one top-level dict whose keys are the full names, dots included.
//! - **Order.** Tensors appear in the order of their bytes in the file (dicts in the order of their
//!   first tensor), so a loaded file is sent front to back.
//! - **`__metadata__`.** The file's string→string metadata map, if present (even if empty), becomes a
//!   dict under the reserved top-level key [`METADATA_KEY`] (`"__metadata__"`, first in the root
//!   dict) whose entries are [`Value::Str`], sorted by key. If it has a [`STEP_KEY`] (`"pgt.step"`)
//!   entry holding an integer, that is also the state dict's [`StateDict::step`].
//! - **dtypes.** Mapped by [`DType::from_safetensors_name`]; a safetensors dtype that pgt has no
//!   dtype for (`F4`, `F6_E2M3`, `F6_E3M2`, `F8_E8M0`) is an error naming the tensor.
//!
//! # Saving ([`save`])
//! Every leaf is written under its key path joined with dots ([`KeyPath`]'s display: int keys and
//! list indices as decimal numbers; a root that is itself a leaf is named `<root>`):
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
use pgt_core::layout::TensorLayout;
use pgt_core::tree::{Key, KeyPath, PathElem, Value};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::state_dict::{Entry, SharedBytes, StateDict, Storage, Tensor, Tree};
use crate::{Error, Result};

/// The reserved top-level key under which a file's `__metadata__` map lives in a loaded state dict.
pub const METADATA_KEY: &str = "__metadata__";

/// The metadata entry that carries [`StateDict::step`].
pub const STEP_KEY: &str = "pgt.step";

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

    let mut root = match nest(&mut tensors) {
        Some(dict) => dict,
        None => tensors
            .into_iter()
            .map(|(name, t)| (Key::Str(name), Tree::Leaf(Entry::Tensor(t))))
            .collect(),
    };
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

/// A dict being built: items in insertion order, plus an index by key.
#[derive(Default)]
struct DictBuilder {
    items: Vec<(String, Slot)>,
    index: HashMap<String, usize>,
}

enum Slot {
    Leaf(Tensor<'static>),
    Dict(DictBuilder),
}

impl DictBuilder {
    /// Inserts a tensor at `parts`; false on a conflict (a name that is a prefix of another).
    fn insert(&mut self, parts: &[&str], tensor: Tensor<'static>) -> bool {
        let (first, rest) = match parts.split_first() {
            Some(x) => x,
            None => return false,
        };
        let existing = self.index.get(*first).copied();
        if rest.is_empty() {
            if existing.is_some() {
                return false;
            }
            self.index.insert(first.to_string(), self.items.len());
            self.items.push((first.to_string(), Slot::Leaf(tensor)));
            return true;
        }
        let at = match existing {
            Some(i) => i,
            None => {
                self.index.insert(first.to_string(), self.items.len());
                self.items
                    .push((first.to_string(), Slot::Dict(DictBuilder::default())));
                self.items.len() - 1
            }
        };
        match &mut self.items[at].1 {
            Slot::Dict(d) => d.insert(rest, tensor),
            Slot::Leaf(_) => false,
        }
    }

    fn build(self) -> Vec<(Key, Tree<'static>)> {
        self.items
            .into_iter()
            .map(|(k, slot)| {
                let tree = match slot {
                    Slot::Leaf(t) => Tree::Leaf(Entry::Tensor(t)),
                    Slot::Dict(d) => Tree::Dict(d.build()),
                };
                (Key::Str(k), tree)
            })
            .collect()
    }
}

/// The tensors as nested dicts, or `None` (tensors untouched) if the names conflict.
fn nest(tensors: &mut Vec<(String, Tensor<'static>)>) -> Option<Vec<(Key, Tree<'static>)>> {
    if tensors
        .iter()
        .any(|(name, _)| name.split('.').next() == Some(METADATA_KEY))
    {
        return None;
    }
    // Check for conflicts first, on names alone, so the tensors can be moved in afterwards.
    let names: HashSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    for (name, _) in tensors.iter() {
        for (i, b) in name.bytes().enumerate() {
            if b == b'.' && names.contains(&name[..i]) {
                return None;
            }
        }
    }
    let mut root = DictBuilder::default();
    for (name, tensor) in std::mem::take(tensors) {
        let parts: Vec<&str> = name.split('.').collect();
        // Unreachable after the check above (names are unique in a safetensors file), but a conflict
        // must never lose a tensor: assert rather than drop it silently.
        assert!(
            root.insert(&parts, tensor),
            "tensor name conflict on {name:?}"
        );
    }
    Some(root.build())
}

/// A tensor as the `safetensors` crate's [`View`]: bytes borrowed from the state dict's storage (dense
/// views), or gathered when the serializer asks for them (strided views).
struct TensorData<'s, 'a> {
    tensor: &'s Tensor<'a>,
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
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
        Cow::Owned(self.tensor.contiguous_bytes())
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

fn tensor_data<'s, 'a>(t: &'s Tensor<'a>, name: &str) -> Result<TensorData<'s, 'a>> {
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
    })
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
        let name = kp.to_string();
        match entry {
            Entry::Value(v) => {
                let key = match kp.0.split_first() {
                    Some((first, rest)) if is_metadata_key(first) && !rest.is_empty() => {
                        KeyPath(rest.to_vec()).to_string()
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
    // The tensors, named as `tensor_names` says.
    let mut names: HashSet<String> = HashSet::new();
    let mut views: Vec<(String, TensorData<'_, '_>)> = Vec::new();
    for (name, t) in tensor_names(state_dict) {
        if !names.insert(name.clone()) {
            return Err(Error::state_dict(name, "two tensors would share this name"));
        }
        let view = tensor_data(t, &name)?;
        views.push((name, view));
    }
    if let Some(step) = state_dict.step {
        metadata.insert(STEP_KEY.into(), step.to_string());
    }
    write_metadata |= !metadata.is_empty();
    let metadata = write_metadata.then_some(metadata);

    let tmp = TempFile::new(path)?;
    safetensors::tensor::serialize_to_file(views, metadata, &tmp.path)
        .map_err(|e| Error::safetensors(&tmp.path, format!("cannot write: {e}")))?;
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
        let name = kp.to_string();
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
            assert_eq!(u.contiguous_bytes(), t.contiguous_bytes(), "{name}");
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
    fn dotted_names_nest_and_save_back_to_the_same_names() {
        let dir = temp_dir("nested");
        let mut sd = StateDict::new();
        sd.insert("model.layers.0.weight", Entry::Tensor(f32s(&[2, 2], 0.0)))
            .unwrap();
        sd.insert("model.layers.0.bias", Entry::Tensor(f32s(&[2], 5.0)))
            .unwrap();
        sd.insert("model.layers.1.weight", Entry::Tensor(f32s(&[2, 2], 7.0)))
            .unwrap();
        sd.insert("lm_head.weight", Entry::Tensor(f32s(&[3], 9.0)))
            .unwrap();
        let path = dir.join("n.safetensors");
        save(&sd, &path).unwrap();
        let back = load(&path).unwrap();
        let Tree::Dict(root) = &back.root else {
            panic!("root is not a dict")
        };
        let keys: HashSet<&Key> = root.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [str_key("model"), str_key("lm_head")].iter().collect()
        );
        let Tree::Dict(model) = &root.iter().find(|(k, _)| *k == str_key("model")).unwrap().1
        else {
            panic!("model is not a dict")
        };
        let Tree::Dict(layers) = &model[0].1 else {
            panic!("layers is not a dict")
        };
        // Keys stay strings: "0", not the int 0.
        assert!(layers.iter().any(|(k, _)| *k == str_key("0")));
        assert_eq!(
            back.tensor("model.layers.1.weight")
                .unwrap()
                .to_vec::<f32>()
                .unwrap(),
            [7.0, 8.0, 9.0, 10.0]
        );
        let again = dir.join("again.safetensors");
        save(&back, &again).unwrap();
        let names: Vec<String> = read_raw(&again).0.into_keys().collect();
        assert_eq!(
            names,
            [
                "lm_head.weight",
                "model.layers.0.bias",
                "model.layers.0.weight",
                "model.layers.1.weight"
            ]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn prefix_conflicts_load_flat() {
        let dir = temp_dir("flat");
        let mut sd = StateDict::new();
        // Flat keys with dots in them: "a" and "a.b" cannot both be nested.
        sd.root = Tree::Dict(vec![
            (str_key("a"), Tree::Leaf(Entry::Tensor(f32s(&[1], 1.0)))),
            (str_key("a.b"), Tree::Leaf(Entry::Tensor(f32s(&[1], 2.0)))),
            (str_key("c.d"), Tree::Leaf(Entry::Tensor(f32s(&[1], 3.0)))),
        ]);
        let path = dir.join("f.safetensors");
        save(&sd, &path).unwrap();
        let back = load(&path).unwrap();
        let Tree::Dict(root) = &back.root else {
            panic!("root is not a dict")
        };
        let keys: HashSet<&Key> = root.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [str_key("a"), str_key("a.b"), str_key("c.d")]
                .iter()
                .collect()
        );
        let get = |k: &str| match &root.iter().find(|(key, _)| *key == str_key(k)).unwrap().1 {
            Tree::Leaf(Entry::Tensor(t)) => t.to_vec::<f32>().unwrap(),
            _ => panic!("{k} is not a tensor"),
        };
        assert_eq!(
            (get("a"), get("a.b"), get("c.d")),
            (vec![1.0], vec![2.0], vec![3.0])
        );
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
            sd.get_str("__metadata__.format"),
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
        sd.insert("__metadata__.format", Entry::Value(Value::Str("pt".into())))
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
}

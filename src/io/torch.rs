//! Reading PyTorch checkpoints written by `torch.save(state_dict, path)`:
//! the zip format used since torch 1.6, which is how state-spaces/mamba-*
//! and many other models publish `pytorch_model.bin`.
//!
//! # The file format
//!
//! The archive holds, under one top-level folder (the "prefix": the file
//! stem when saving to a path, `archive` when saving to a buffer):
//!
//! * `<prefix>/data.pkl`: the object graph, pickled (protocol 2). Tensors
//!   appear as calls of `torch._utils._rebuild_tensor_v2(storage, offset,
//!   size, stride, ...)`, the storage being a *persistent id*
//!   `('storage', torch.FloatStorage, key, location, numel)`;
//! * `<prefix>/data/<key>`: the raw bytes of each storage, little-endian,
//!   stored uncompressed;
//! * `<prefix>/byteorder` (`little` or `big`; absent in older files, which
//!   are little-endian), `<prefix>/version`, `.data/serialization_id`, ...
//!
//! # Safety of the reader
//!
//! [`TorchCheckpoint`] never runs code: it carries its own small pickle
//! interpreter that knows only the opcodes `torch.save` emits and only a
//! closed list of globals, each interpreted by hand:
//!
//! * `collections.OrderedDict` (built from no arguments, then filled by
//!   `SETITEMS`; a following `BUILD` with its `_metadata` is ignored);
//! * `torch._utils._rebuild_tensor`, `_rebuild_tensor_v2`,
//!   `_rebuild_tensor_v3` (the one with a dtype argument),
//!   `_rebuild_parameter`, `_rebuild_parameter_with_state` and
//!   `torch._tensor._rebuild_from_type_v2` (when the type is `torch.Tensor`
//!   or `torch.nn.parameter.Parameter`);
//! * the storage classes `torch.FloatStorage`, `HalfStorage`,
//!   `BFloat16Storage`, `DoubleStorage` (read), `LongStorage`, `IntStorage`,
//!   `ShortStorage`, `CharStorage`, `ByteStorage`, `BoolStorage`,
//!   `ComplexFloatStorage`, `ComplexDoubleStorage` (skipped, see below) and
//!   `torch.UntypedStorage` / `torch.storage.UntypedStorage`;
//! * the dtypes `torch.float32`, `float16`, `bfloat16`, `float64` (and the
//!   integer, bool and complex ones, whose tensors are skipped);
//! * `_codecs.encode(str, 'latin1')`, which is how protocol 2 spells `bytes`.
//!
//! Any other global, any other opcode, a malformed pickle, a tensor whose
//! elements fall outside its storage, a storage whose size disagrees with its
//! persistent id, a CRC-32 mismatch, a compressed entry or a big-endian
//! archive gives an [`Error::Format`] (or, for a tensor's data,
//! [`Error::Tensor`]) naming the file and what was found. Nothing panics on
//! malformed input.
//!
//! # Which objects become tensors, and their names
//!
//! The pickled root must be a dict (a state dict, usually an `OrderedDict`).
//!
//! * If any of its values is a tensor, the tensors among its values are the
//!   checkpoint's tensors, named by their keys; other values (ints, strings,
//!   nested dicts, lists, ...) are ignored.
//! * Otherwise (e.g. `{"model": state_dict, "epoch": 3}`) nested dicts are
//!   walked and their tensors named by joining the keys with `.`:
//!   `model.backbone.embedding.weight`. Lists and tuples are not walked.
//!
//! Integer keys are written in decimal. Two tensors ending up with the same
//! name is an error.
//!
//! Tensors of a non-float dtype (int64 buffers, bool masks, complex) are
//! **skipped**: [`TensorSource::names`] leaves them out, [`TorchCheckpoint::skipped`]
//! lists them, and asking for one by name gives an [`Error::Tensor`] that
//! says its dtype. Float tensors (F32, F16, BF16, F64) may have any strides
//! and storage offset (transposed views, slices, several tensors sharing one
//! storage such as a tied `lm_head.weight`): contiguous ones are returned as
//! borrowed bytes of the memory-mapped file, the others are gathered into
//! row-major order. Every index is checked against its storage when the file
//! is opened. Tensors with overlapping elements (more elements than their
//! storage, i.e. expanded with stride 0) are rejected.
//!
//! The device a storage was saved from (`cpu`, `cuda:0`, ...) does not
//! matter: the bytes are the same. The zip entries' CRC-32s are checked
//! (data.pkl when opening, each storage the first time one of its tensors is
//! read) unless they are 0, which is how `torch.save` marks records whose
//! CRC it did not compute.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Cursor;
use std::ops::Range;
use std::path::Path;
use std::rc::Rc;
use std::sync::OnceLock;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::io::safetensors::{DType, StoredTensor, TensorSource};

/// A `torch.save` zip checkpoint, memory-mapped, with its tensors indexed.
pub struct TorchCheckpoint {
    path: String,
    data: Backing,
    storages: Vec<StorageEntry>,
    tensors: BTreeMap<String, TensorEntry>,
    skipped: BTreeMap<String, &'static str>,
}

enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// One `<prefix>/data/<key>` entry.
struct StorageEntry {
    key: String,
    range: Range<usize>,
    crc: u32,
    /// Whether the entry's CRC-32 matched, computed on first use.
    crc_ok: OnceLock<bool>,
}

/// A float tensor: a strided view of one storage, checked to lie inside it.
#[derive(Clone, Debug)]
struct TensorEntry {
    dtype: DType,
    storage: usize,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl TorchCheckpoint {
    /// Opens and indexes `path`. The tensors' data is read lazily, by
    /// [`TensorSource::tensor`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path_ref = path.as_ref();
        let shown = path_ref.display().to_string();
        let file = File::open(path_ref).map_err(|e| Error::io(path_ref, e))?;
        let len = file.metadata().map_err(|e| Error::io(path_ref, e))?.len();
        if len == 0 {
            return Err(format_err(&shown, "empty file, not a PyTorch checkpoint"));
        }
        // SAFETY: the mapping is read-only; a file changed underneath us by
        // another process could give wrong numbers, as with any reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path_ref, e))?;
        Self::from_backing(shown, Backing::Mapped(mmap))
    }

    /// Reads a checkpoint held in memory; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        Self::from_backing(name.into(), Backing::Owned(bytes))
    }

    /// The non-float tensors that were skipped, with their dtypes
    /// (`int64`, `bool`, ...), sorted by name.
    pub fn skipped(&self) -> Vec<(String, String)> {
        self.skipped
            .iter()
            .map(|(n, d)| (n.clone(), (*d).to_string()))
            .collect()
    }

    fn from_backing(path: String, data: Backing) -> Result<Self> {
        let parsed = parse(data.bytes()).map_err(|message| Error::Format {
            file: path.clone(),
            message,
        })?;
        Ok(Self {
            path,
            data,
            storages: parsed.storages,
            tensors: parsed.tensors,
            skipped: parsed.skipped,
        })
    }

    fn storage_bytes(&self, name: &str, index: usize) -> Result<&[u8]> {
        let entry = &self.storages[index];
        let bytes = &self.data.bytes()[entry.range.clone()];
        let ok = *entry
            .crc_ok
            .get_or_init(|| entry.crc == 0 || crc32(bytes) == entry.crc);
        if !ok {
            return Err(Error::Tensor {
                file: self.path.clone(),
                tensor: name.into(),
                message: format!(
                    "its storage data/{} fails its CRC-32 check (corrupt file)",
                    entry.key
                ),
            });
        }
        Ok(bytes)
    }
}

impl TensorSource for TorchCheckpoint {
    fn file(&self) -> &str {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> Result<Option<StoredTensor<'_>>> {
        let Some(t) = self.tensors.get(name) else {
            if let Some(dtype) = self.skipped.get(name) {
                return Err(Error::Tensor {
                    file: self.path.clone(),
                    tensor: name.into(),
                    message: format!(
                        "has dtype {dtype}; only float tensors (F32, F16, BF16, F64) are read"
                    ),
                });
            }
            return Ok(None);
        };
        let storage = self.storage_bytes(name, t.storage)?;
        let es = t.dtype.size();
        let numel: usize = t.shape.iter().product();
        let internal = || Error::Tensor {
            file: self.path.clone(),
            tensor: name.into(),
            message: "index outside its storage (internal error)".into(),
        };
        let bytes = if numel == 0 {
            Cow::Borrowed(&storage[..0])
        } else if is_contiguous(&t.shape, &t.strides) {
            let range = t.offset * es..(t.offset + numel) * es;
            Cow::Borrowed(storage.get(range).ok_or_else(internal)?)
        } else {
            Cow::Owned(gather(storage, es, t.offset, &t.shape, &t.strides).ok_or_else(internal)?)
        };
        Ok(Some(StoredTensor {
            dtype: t.dtype,
            shape: t.shape.clone(),
            bytes,
        }))
    }
}

fn format_err(file: &str, message: impl Into<String>) -> Error {
    Error::Format {
        file: file.into(),
        message: message.into(),
    }
}

/// Row-major with no gaps (dimensions of size 1 may have any stride).
fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// Copies a strided view (indices in elements of `es` bytes) into row-major
/// order. `None` if an index falls outside `src` (checked beforehand, so
/// this would be an internal error).
fn gather(
    src: &[u8],
    es: usize,
    offset: usize,
    shape: &[usize],
    strides: &[usize],
) -> Option<Vec<u8>> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    if numel == 0 {
        return Some(out);
    }
    let nd = shape.len();
    if nd == 0 {
        out.extend_from_slice(src.get(offset * es..(offset + 1) * es)?);
        return Some(out);
    }
    let (inner_n, inner_s) = (shape[nd - 1], strides[nd - 1]);
    let outer = &shape[..nd - 1];
    let mut idx = vec![0usize; nd - 1];
    let mut base = offset;
    loop {
        if inner_s == 1 {
            out.extend_from_slice(src.get(base * es..(base + inner_n) * es)?);
        } else {
            for i in 0..inner_n {
                let p = (base + i * inner_s) * es;
                out.extend_from_slice(src.get(p..p + es)?);
            }
        }
        // Advance the outer multi-index, last dimension fastest.
        let mut d = nd - 1;
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            idx[d] += 1;
            base += strides[d];
            if idx[d] < outer[d] {
                break;
            }
            base -= strides[d] * outer[d];
            idx[d] = 0;
        }
    }
}

// ---------------------------------------------------------------------------
// The archive.

const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

struct Parsed {
    storages: Vec<StorageEntry>,
    tensors: BTreeMap<String, TensorEntry>,
    skipped: BTreeMap<String, &'static str>,
}

/// Where one stored (uncompressed) zip entry's bytes are.
#[derive(Clone)]
struct Entry {
    range: Range<usize>,
    crc: u32,
}

fn parse(data: &[u8]) -> std::result::Result<Parsed, String> {
    if data.starts_with(&LEGACY_MAGIC) {
        return Err(
            "legacy (pre-1.6, non-zip) torch.save format, which this reader does not \
                    support; re-save it with a current torch: torch.save(torch.load(f), f)"
                .into(),
        );
    }
    if data.get(257..262) == Some(b"ustar".as_slice()) {
        return Err(
            "tar archive (the oldest torch.save format), which this reader does not support".into(),
        );
    }
    if !data.starts_with(b"PK\x03\x04") && !data.starts_with(b"PK\x05\x06") {
        return Err(
            "not a zip archive, so not a PyTorch checkpoint as torch.save writes them".into(),
        );
    }
    let mut archive = zip::ZipArchive::new(Cursor::new(data))
        .map_err(|e| format!("not a valid zip archive (truncated or corrupt?): {e}"))?;

    // The single `<prefix>/data.pkl`.
    let mut pkl_names = (0..archive.len())
        .filter_map(|i| archive.name_for_index(i))
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1);
    let pkl_name = match (pkl_names.next(), pkl_names.next()) {
        (Some(n), None) => n.to_string(),
        (None, _) => {
            let names: Vec<&str> = (0..archive.len().min(5))
                .filter_map(|i| archive.name_for_index(i))
                .collect();
            let hint = if names.iter().any(|n| n.ends_with("constants.pkl")) {
                " (it looks like a TorchScript archive, which is not supported)"
            } else {
                ""
            };
            return Err(format!(
                "zip archive without a <prefix>/data.pkl entry, so not a torch.save checkpoint{hint}; \
                 first entries: {names:?}"
            ));
        }
        (Some(a), Some(b)) => {
            return Err(format!(
                "zip archive with several pickles ({a}, {b}, ...); expected one <prefix>/data.pkl"
            ))
        }
    };
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string(); // ends with '/'

    let mut entry = |name: &str| -> std::result::Result<Option<Entry>, String> {
        let Some(i) = archive.index_for_name(name) else {
            return Ok(None);
        };
        let f = archive
            .by_index_raw(i)
            .map_err(|e| format!("zip entry {name}: {e}"))?;
        if f.encrypted() {
            return Err(format!("zip entry {name} is encrypted"));
        }
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(format!(
                "zip entry {name} is compressed ({}); torch.save stores entries uncompressed",
                f.compression()
            ));
        }
        if f.compressed_size() != f.size() {
            return Err(format!("zip entry {name}: stored sizes disagree"));
        }
        let start = usize::try_from(f.data_start()).ok();
        let len = usize::try_from(f.size()).ok();
        let range = match (start, len) {
            (Some(s), Some(l)) => s.checked_add(l).filter(|&e| e <= data.len()).map(|e| s..e),
            _ => None,
        };
        let Some(range) = range else {
            return Err(format!(
                "zip entry {name} extends past the end of the file (truncated?)"
            ));
        };
        Ok(Some(Entry {
            range,
            crc: f.crc32(),
        }))
    };

    let read_checked = |e: &Entry, name: &str| -> std::result::Result<Vec<u8>, String> {
        let bytes = &data[e.range.clone()];
        if e.crc != 0 && crc32(bytes) != e.crc {
            return Err(format!(
                "zip entry {name} fails its CRC-32 check (corrupt file)"
            ));
        }
        Ok(bytes.to_vec())
    };

    let byteorder_name = format!("{prefix}byteorder");
    if let Some(e) = entry(&byteorder_name)? {
        let bytes = read_checked(&e, &byteorder_name)?;
        match std::str::from_utf8(&bytes).map(str::trim) {
            Ok("little") => {}
            Ok("big") => {
                return Err(
                    "big-endian checkpoint (byteorder = \"big\"), which this reader does not \
                     support; re-save it on a little-endian machine"
                        .into(),
                )
            }
            _ => return Err(format!("unexpected {byteorder_name} entry {bytes:?}")),
        }
    }

    let pkl_entry = entry(&pkl_name)?.ok_or("data.pkl entry vanished")?;
    let pkl = read_checked(&pkl_entry, &pkl_name)?;

    // Run the pickle, resolving storages to `<prefix>/data/<key>` entries.
    let mut storages: Vec<StorageEntry> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let root = {
        let mut load = |key: &str| -> std::result::Result<(usize, usize), String> {
            if let Some(&i) = by_key.get(key) {
                return Ok((i, storages[i].range.len()));
            }
            let name = format!("{prefix}data/{key}");
            let e = entry(&name)?.ok_or_else(|| {
                format!("data.pkl refers to storage {key:?} but the archive has no {name} entry")
            })?;
            let i = storages.len();
            storages.push(StorageEntry {
                key: key.to_string(),
                range: e.range.clone(),
                crc: e.crc,
                crc_ok: OnceLock::new(),
            });
            by_key.insert(key.to_string(), i);
            Ok((i, e.range.len()))
        };
        Machine::new(&pkl, &mut load)
            .run()
            .map_err(|m| format!("{pkl_name}: {m}"))?
    };
    let root = Graph(vec![root]);

    let mut tensors = BTreeMap::new();
    let mut skipped = BTreeMap::new();
    for (name, t) in collect_tensors(&root.0[0]).map_err(|m| format!("{pkl_name}: {m}"))? {
        if tensors.contains_key(&name) || skipped.contains_key(&name) {
            return Err(format!("{pkl_name}: two tensors named {name:?}"));
        }
        match t.elem.float {
            Some(dtype) => {
                let entry = check_tensor(&name, &t, dtype)?;
                tensors.insert(name, entry);
            }
            None => {
                skipped.insert(name, t.elem.name);
            }
        }
    }
    Ok(Parsed {
        storages,
        tensors,
        skipped,
    })
}

/// Checks that every element of `t` lies inside its storage.
fn check_tensor(
    name: &str,
    t: &TensorRef,
    dtype: DType,
) -> std::result::Result<TensorEntry, String> {
    let es = dtype.size();
    let bad = |what: String| {
        format!(
            "tensor {name:?} (size {:?}, stride {:?}, offset {}) {what}",
            t.size, t.stride, t.offset
        )
    };
    if t.size.len() != t.stride.len() {
        return Err(bad("has not as many sizes as strides".into()));
    }
    let numel = t
        .size
        .iter()
        .try_fold(1usize, |a, &n| a.checked_mul(n))
        .ok_or_else(|| bad("has too many elements".into()))?;
    let storage_elems = t.storage.nbytes / es;
    if numel > 0 {
        let mut last = t.offset;
        for (&n, &s) in t.size.iter().zip(&t.stride) {
            last = (n - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| bad("indexes past its storage".into()))?;
        }
        if last >= storage_elems {
            return Err(bad(format!(
                "reaches element {last} of its storage data/{}, which has only {storage_elems} {} elements",
                t.storage.key,
                dtype.name()
            )));
        }
        if numel > storage_elems {
            return Err(bad(format!(
                "has {numel} elements but its storage only {storage_elems}: overlapping (expanded) \
                 tensors are not supported"
            )));
        }
    }
    Ok(TensorEntry {
        dtype,
        storage: t.storage.index,
        offset: t.offset,
        shape: t.size.clone(),
        strides: t.stride.clone(),
    })
}

/// The tensors of the pickled root, named as the module docs describe.
fn collect_tensors(root: &Value) -> std::result::Result<Vec<(String, Rc<TensorRef>)>, String> {
    let Value::Dict(dict) = root else {
        return Err(format!(
            "the pickled object is a {}, not a dict (state dict)",
            root.type_name()
        ));
    };
    let dict = dict.borrow();
    let mut out = Vec::new();
    if dict
        .items
        .iter()
        .any(|(_, v)| matches!(v, Value::Tensor(_)))
    {
        for (k, v) in &dict.items {
            if let Value::Tensor(t) = v {
                out.push((key_name(k)?, t.clone()));
            }
        }
        return Ok(out);
    }
    let mut budget = 1_000_000usize;
    walk(&dict, "", 0, &mut budget, &mut out)?;
    Ok(out)
}

fn walk(
    dict: &Dict,
    prefix: &str,
    depth: usize,
    budget: &mut usize,
    out: &mut Vec<(String, Rc<TensorRef>)>,
) -> std::result::Result<(), String> {
    if depth > 64 {
        return Err("dicts nested more than 64 deep".into());
    }
    for (k, v) in &dict.items {
        *budget = budget
            .checked_sub(1)
            .ok_or("too many nested dict entries (more than a million)")?;
        match v {
            Value::Tensor(t) => out.push((format!("{prefix}{}", key_name(k)?), t.clone())),
            Value::Dict(d) => {
                let inner = d
                    .try_borrow()
                    .map_err(|_| "dict in use (internal error)".to_string())?;
                walk(
                    &inner,
                    &format!("{prefix}{}.", key_name(k)?),
                    depth + 1,
                    budget,
                    out,
                )?
            }
            _ => {}
        }
    }
    Ok(())
}

fn key_name(k: &Value) -> std::result::Result<String, String> {
    match k {
        Value::Str(s) => Ok(s.to_string()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(format!(
            "a tensor or dict is stored under a {} key; expected str",
            other.type_name()
        )),
    }
}

// ---------------------------------------------------------------------------
// CRC-32 (IEEE, as zip uses), slicing by 8.

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

fn crc32(data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

// ---------------------------------------------------------------------------
// The pickle interpreter.

/// An element type as torch names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Elem {
    name: &'static str,
    size: usize,
    float: Option<DType>,
}

const fn elem(name: &'static str, size: usize, float: Option<DType>) -> Elem {
    Elem { name, size, float }
}

const F32: Elem = elem("float32", 4, Some(DType::F32));
const F16: Elem = elem("float16", 2, Some(DType::F16));
const BF16: Elem = elem("bfloat16", 2, Some(DType::BF16));
const F64: Elem = elem("float64", 8, Some(DType::F64));
const U8: Elem = elem("uint8", 1, None);

/// `torch.<X>Storage` classes.
fn storage_class(name: &str) -> Option<Elem> {
    Some(match name {
        "FloatStorage" => F32,
        "HalfStorage" => F16,
        "BFloat16Storage" => BF16,
        "DoubleStorage" => F64,
        "LongStorage" => elem("int64", 8, None),
        "IntStorage" => elem("int32", 4, None),
        "ShortStorage" => elem("int16", 2, None),
        "CharStorage" => elem("int8", 1, None),
        "ByteStorage" => U8,
        "BoolStorage" => elem("bool", 1, None),
        "ComplexFloatStorage" => elem("complex64", 8, None),
        "ComplexDoubleStorage" => elem("complex128", 16, None),
        "UntypedStorage" => U8,
        _ => return None,
    })
}

/// `torch.<dtype>` globals.
fn dtype_global(name: &str) -> Option<Elem> {
    Some(match name {
        "float32" | "float" => F32,
        "float16" | "half" => F16,
        "bfloat16" => BF16,
        "float64" | "double" => F64,
        "int64" | "long" => elem("int64", 8, None),
        "int32" | "int" => elem("int32", 4, None),
        "int16" | "short" => elem("int16", 2, None),
        "int8" => elem("int8", 1, None),
        "uint8" => U8,
        "uint16" => elem("uint16", 2, None),
        "uint32" => elem("uint32", 4, None),
        "uint64" => elem("uint64", 8, None),
        "bool" => elem("bool", 1, None),
        "complex64" | "cfloat" => elem("complex64", 8, None),
        "complex128" | "cdouble" => elem("complex128", 16, None),
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    CodecsEncode,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    TensorClass,
    StorageClass(Elem),
    Dtype(Elem),
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "Tensor") | ("torch._tensor", "Tensor") | ("torch.nn.parameter", "Parameter") => {
            Global::TensorClass
        }
        ("torch.storage", "UntypedStorage") => Global::StorageClass(U8),
        ("torch", n) => match storage_class(n) {
            Some(e) => Global::StorageClass(e),
            None => Global::Dtype(dtype_global(n)?),
        },
        _ => return None,
    })
}

/// A storage as a persistent id names it.
#[derive(Debug)]
struct StorageRef {
    /// Index into the checkpoint's storages.
    index: usize,
    key: String,
    elem: Elem,
    nbytes: usize,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    elem: Elem,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    None,
    Int(i64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
}

/// A dict, keeping insertion order; keys that are not str/int/bytes/None
/// are kept but never deduplicated.
#[derive(Debug, Default)]
struct Dict {
    items: Vec<(Value, Value)>,
    index: HashMap<Key, usize>,
}

impl Dict {
    fn insert(&mut self, k: Value, v: Value) {
        match k.key() {
            Some(key) => match self.index.get(&key) {
                Some(&i) => self.items[i].1 = v,
                None => {
                    self.index.insert(key, self.items.len());
                    self.items.push((k, v));
                }
            },
            None => self.items.push((k, v)),
        }
    }
}

#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64 (value not kept).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Dict>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn type_name(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("global {g:?}"),
            Value::Storage(_) => "storage".into(),
            Value::Tensor(_) => "tensor".into(),
        }
    }

    fn key(&self) -> Option<Key> {
        match self {
            Value::None => Some(Key::None),
            Value::Bool(b) => Some(Key::Int(*b as i64)),
            Value::Int(i) => Some(Key::Int(*i)),
            // 1.0 and 1 are the same key in Python.
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => Some(Key::Int(*f as i64)),
            Value::Str(s) => Some(Key::Str(s.clone())),
            Value::Bytes(b) => Some(Key::Bytes(b.clone())),
            _ => None,
        }
    }
}

/// Frees a value graph without recursion (a hostile pickle can nest
/// containers deeply enough for recursive drops to overflow the stack).
/// Reference cycles, which only a hand-made pickle can build, are leaked.
fn dismantle(mut work: Vec<Value>) {
    while let Some(v) = work.pop() {
        match v {
            Value::Tuple(rc) => {
                if let Ok(items) = Rc::try_unwrap(rc) {
                    work.extend(items);
                }
            }
            Value::List(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    work.extend(cell.into_inner());
                }
            }
            Value::Dict(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    for (k, v) in cell.into_inner().items {
                        work.push(k);
                        work.push(v);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Values freed with [`dismantle`] when dropped.
struct Graph(Vec<Value>);

impl Drop for Graph {
    fn drop(&mut self) {
        dismantle(std::mem::take(&mut self.0));
    }
}

type PResult<T> = std::result::Result<T, String>;

/// Resolves a storage key to (storage index, entry length in bytes).
type LoadStorage<'l> = dyn FnMut(&str) -> PResult<(usize, usize)> + 'l;

struct Machine<'a, 'l> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    load: &'l mut LoadStorage<'l>,
}

impl Drop for Machine<'_, '_> {
    fn drop(&mut self) {
        let mut all = std::mem::take(&mut self.stack);
        all.extend(self.memo.drain().map(|(_, v)| v));
        dismantle(all);
    }
}

impl<'a, 'l> Machine<'a, 'l> {
    fn new(data: &'a [u8], load: &'l mut LoadStorage<'l>) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            load,
        }
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("unexpected end of pickle data (truncated?)")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> PResult<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "short read")?))
    }

    fn len_u64(&mut self) -> PResult<usize> {
        usize::try_from(self.u64()?).map_err(|_| "length too large".to_string())
    }

    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated line (truncated?)")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "line is not UTF-8".to_string())?;
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&mut self, n: usize) -> PResult<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "string is not valid UTF-8".to_string())?;
        Ok(Value::Str(s.into()))
    }

    fn latin1(&mut self, n: usize) -> PResult<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(
            b.iter().map(|&c| c as char).collect::<String>().into(),
        ))
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> PResult<Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow (corrupt pickle)".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> PResult<&Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow (corrupt pickle)".into());
        }
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let m = self.marks.pop().ok_or("MARK expected (corrupt pickle)")?;
        if m > self.stack.len() {
            return Err("mark past the stack (internal error)".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn top_list(&self) -> PResult<Rc<RefCell<Vec<Value>>>> {
        match self.top()? {
            Value::List(l) => Ok(l.clone()),
            other => Err(format!("append to a {}, not a list", other.type_name())),
        }
    }

    fn top_dict(&self) -> PResult<Rc<RefCell<Dict>>> {
        match self.top()? {
            Value::Dict(d) => Ok(d.clone()),
            other => Err(format!("set item of a {}, not a dict", other.type_name())),
        }
    }

    fn memo_get(&self, i: u32) -> PResult<Value> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} read before it was written"))
    }

    fn memo_put(&mut self, i: u32) -> PResult<()> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    /// Runs to STOP and returns the pickled object.
    fn run(mut self) -> PResult<Value> {
        loop {
            let at = self.pos;
            let op = self
                .byte()
                .map_err(|_| "pickle ends without STOP (truncated?)".to_string())?;
            match self.step(op) {
                Ok(true) => {}
                Ok(false) => return self.pop().map_err(|e| format!("at STOP: {e}")),
                Err(e) => return Err(format!("{e} (opcode 0x{op:02x} at byte {at})")),
            }
        }
    }

    /// Executes one opcode; false at STOP.
    fn step(&mut self, op: u8) -> PResult<bool> {
        match op {
            0x80 => {
                // PROTO
                let v = self.byte()?;
                if v > 5 {
                    return Err(format!("pickle protocol {v} is not supported"));
                }
            }
            0x95 => {
                // FRAME: a length prefix only; the frame's opcodes follow inline.
                self.u64()?;
            }
            b'.' => return Ok(false),
            b'}' => self.stack.push(Value::Dict(Default::default())),
            b']' => self.stack.push(Value::List(Default::default())),
            b')' => self.stack.push(Value::Tuple(Default::default())),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                // POP (a MARK if nothing is above it)
                if self.stack.len() > self.floor() {
                    self.stack.pop();
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                // POP_MARK
                let items = self.pop_mark()?;
                dismantle(items);
            }
            b'2' => {
                // DUP
                let v = self.top()?.clone();
                self.stack.push(v);
            }
            b'q' => {
                let i = self.byte()? as u32;
                self.memo_put(i)?;
            }
            b'r' => {
                let i = self.u32()?;
                self.memo_put(i)?;
            }
            0x94 => {
                // MEMOIZE
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo too large")?;
                self.memo_put(i)?;
            }
            b'h' => {
                let i = self.byte()? as u32;
                let v = self.memo_get(i)?;
                self.stack.push(v);
            }
            b'j' => {
                let i = self.u32()?;
                let v = self.memo_get(i)?;
                self.stack.push(v);
            }
            b'J' => {
                let v = self.u32()? as i32;
                self.stack.push(Value::Int(v as i64));
            }
            b'K' => {
                let v = self.byte()?;
                self.stack.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = self.u16()?;
                self.stack.push(Value::Int(v as i64));
            }
            0x8a => {
                // LONG1
                let n = self.byte()? as usize;
                let b = self.take(n)?;
                self.stack.push(long_value(b));
            }
            0x8b => {
                // LONG4
                let n = self.u32()? as i32;
                let n = usize::try_from(n).map_err(|_| "negative LONG4 length")?;
                let b = self.take(n)?;
                self.stack.push(long_value(b));
            }
            b'G' => {
                let b = self.take(8)?;
                let v = f64::from_be_bytes(b.try_into().map_err(|_| "short read")?);
                self.stack.push(Value::Float(v));
            }
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            0x8c => {
                let n = self.byte()? as usize;
                let v = self.utf8(n)?;
                self.stack.push(v);
            }
            b'X' => {
                let n = self.u32()? as usize;
                let v = self.utf8(n)?;
                self.stack.push(v);
            }
            0x8d => {
                let n = self.len_u64()?;
                let v = self.utf8(n)?;
                self.stack.push(v);
            }
            b'U' => {
                // SHORT_BINSTRING (Python 2 str)
                let n = self.byte()? as usize;
                let v = self.latin1(n)?;
                self.stack.push(v);
            }
            b'T' => {
                // BINSTRING
                let n = self.u32()? as i32;
                let n = usize::try_from(n).map_err(|_| "negative BINSTRING length")?;
                let v = self.latin1(n)?;
                self.stack.push(v);
            }
            b'C' => {
                let n = self.byte()? as usize;
                let b = self.take(n)?;
                self.stack.push(Value::Bytes(b.into()));
            }
            b'B' => {
                let n = self.u32()? as usize;
                let b = self.take(n)?;
                self.stack.push(Value::Bytes(b.into()));
            }
            0x8e => {
                let n = self.len_u64()?;
                let b = self.take(n)?;
                self.stack.push(Value::Bytes(b.into()));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                // TUPLE1, TUPLE2, TUPLE3
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.stack.push(Value::Tuple(Rc::new(items)));
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'a' => {
                let v = self.pop()?;
                let list = self.top_list()?;
                list.try_borrow_mut()
                    .map_err(|_| "list in use (internal error)")?
                    .push(v);
            }
            b'e' => {
                let items = self.pop_mark()?;
                let list = self.top_list()?;
                list.try_borrow_mut()
                    .map_err(|_| "list in use (internal error)")?
                    .extend(items);
            }
            b'd' => {
                let items = self.pop_mark()?;
                let dict = dict_from_pairs(items)?;
                self.stack.push(Value::Dict(Rc::new(RefCell::new(dict))));
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let dict = self.top_dict()?;
                dict.try_borrow_mut()
                    .map_err(|_| "dict in use (internal error)")?
                    .insert(k, v);
            }
            b'u' => {
                let items = self.pop_mark()?;
                if !items.len().is_multiple_of(2) {
                    return Err("SETITEMS with an odd number of items".into());
                }
                let dict = self.top_dict()?;
                let mut d = dict
                    .try_borrow_mut()
                    .map_err(|_| "dict in use (internal error)")?;
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.insert(k, v);
                }
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let g = global(module, name)?;
                self.stack.push(Value::Global(g));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = self.pop()?;
                let module = self.pop()?;
                match (&module, &name) {
                    (Value::Str(m), Value::Str(n)) => {
                        let g = global(m, n)?;
                        self.stack.push(Value::Global(g));
                    }
                    _ => return Err("STACK_GLOBAL without two strings".into()),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let Value::Tuple(args) = args else {
                    return Err(format!(
                        "REDUCE with {} arguments, not a tuple",
                        args.type_name()
                    ));
                };
                let Value::Global(g) = f else {
                    return Err(format!("REDUCE calls a {}", f.type_name()));
                };
                let v = call(g, &args)?;
                self.stack.push(v);
            }
            0x81 => {
                // NEWOBJ: cls.__new__(cls, *args)
                let _args = self.pop()?;
                let cls = self.pop()?;
                match cls {
                    Value::Global(Global::OrderedDict) => {
                        self.stack.push(Value::Dict(Default::default()))
                    }
                    other => return Err(format!("NEWOBJ of {}", other.type_name())),
                }
            }
            b'b' => {
                // BUILD: the state of an OrderedDict (its _metadata) or of a
                // tensor is of no use here.
                let _state = self.pop()?;
                match self.top()? {
                    Value::Dict(_) | Value::Tensor(_) => {}
                    other => return Err(format!("BUILD on a {}", other.type_name())),
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent_load(&pid)?;
                self.stack.push(v);
            }
            _ => {
                let shown = if op.is_ascii_graphic() {
                    format!(" ('{}')", op as char)
                } else {
                    String::new()
                };
                return Err(format!(
                    "unsupported pickle opcode 0x{op:02x}{shown}; this reader knows only the \
                     opcodes torch.save uses"
                ));
            }
        }
        Ok(true)
    }

    fn persistent_load(&mut self, pid: &Value) -> PResult<Value> {
        let bad = || {
            format!(
                "unsupported persistent id (a {}); expected ('storage', storage type, key, \
                 location, numel)",
                pid.type_name()
            )
        };
        let Value::Tuple(t) = pid else {
            return Err(bad());
        };
        let [Value::Str(kind), ty, key, _location, numel] = t.as_slice() else {
            return Err(bad());
        };
        if &**kind != "storage" {
            return Err(format!("unsupported persistent id kind {kind:?}"));
        }
        let elem = match ty {
            Value::Global(Global::StorageClass(e)) | Value::Global(Global::Dtype(e)) => *e,
            other => return Err(format!("storage of type {}", other.type_name())),
        };
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => return Err(format!("storage key is a {}", other.type_name())),
        };
        let numel = non_negative(numel, "storage numel")?;
        let (index, len) = (self.load)(&key)?;
        let nbytes = numel
            .checked_mul(elem.size)
            .ok_or("storage size overflows")?;
        if nbytes != len {
            return Err(format!(
                "storage data/{key} should hold {numel} {} elements ({nbytes} bytes) but its \
                 entry has {len} bytes",
                elem.name
            ));
        }
        Ok(Value::Storage(Rc::new(StorageRef {
            index,
            key,
            elem,
            nbytes,
        })))
    }
}

fn global(module: &str, name: &str) -> PResult<Global> {
    resolve_global(module, name).ok_or_else(|| {
        format!(
            "unknown global `{module}.{name}`: this reader only recognises the classes and \
             functions torch.save uses for tensors and state dicts"
        )
    })
}

/// A little-endian two's complement integer of any length.
fn long_value(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() > 8 {
        return Value::BigInt;
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    let mut full = [fill; 8];
    full[..b.len()].copy_from_slice(b);
    Value::Int(i64::from_le_bytes(full))
}

fn dict_from_pairs(items: Vec<Value>) -> PResult<Dict> {
    if !items.len().is_multiple_of(2) {
        return Err("DICT with an odd number of items".into());
    }
    let mut d = Dict::default();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.insert(k, v);
    }
    Ok(d)
}

fn non_negative(v: &Value, what: &str) -> PResult<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("{what} is negative ({i})")),
        Value::Bool(b) => Ok(*b as usize),
        other => Err(format!("{what} is a {}, not an int", other.type_name())),
    }
}

fn int_tuple(v: &Value, what: &str) -> PResult<Vec<usize>> {
    match v {
        Value::Tuple(t) => t.iter().map(|x| non_negative(x, what)).collect(),
        Value::List(l) => l
            .try_borrow()
            .map_err(|_| "list in use (internal error)")?
            .iter()
            .map(|x| non_negative(x, what))
            .collect(),
        other => Err(format!("{what} is a {}, not a tuple", other.type_name())),
    }
}

fn arity(g: Global, args: &[Value], allowed: &[usize]) -> PResult<()> {
    if allowed.contains(&args.len()) {
        Ok(())
    } else {
        Err(format!("{g:?} called with {} arguments", args.len()))
    }
}

/// Interprets a REDUCE of one of the known globals.
fn call(g: Global, args: &[Value]) -> PResult<Value> {
    match g {
        Global::OrderedDict => match args {
            [] => Ok(Value::Dict(Default::default())),
            [Value::List(pairs)] => {
                let mut d = Dict::default();
                for p in pairs
                    .try_borrow()
                    .map_err(|_| "list in use (internal error)")?
                    .iter()
                {
                    match p {
                        Value::Tuple(kv) if kv.len() == 2 => d.insert(kv[0].clone(), kv[1].clone()),
                        _ => return Err("OrderedDict built from a list of non-pairs".into()),
                    }
                }
                Ok(Value::Dict(Rc::new(RefCell::new(d))))
            }
            _ => Err("OrderedDict called with unsupported arguments".into()),
        },
        Global::CodecsEncode => match args {
            [Value::Str(s), Value::Str(enc)] if matches!(&**enc, "latin1" | "latin-1") => {
                let bytes: Option<Vec<u8>> = s.chars().map(|c| u8::try_from(c).ok()).collect();
                Ok(Value::Bytes(
                    bytes.ok_or("bytes out of the latin1 range")?.into(),
                ))
            }
            _ => Err("_codecs.encode called with unsupported arguments".into()),
        },
        Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
            let (n_fixed, with_dtype) = match g {
                Global::RebuildTensor => (4, false),
                Global::RebuildTensorV2 => (6, false),
                _ => (7, true),
            };
            arity(g, args, &[n_fixed, n_fixed + 1])?;
            let storage = match &args[0] {
                Value::Storage(s) => s.clone(),
                other => {
                    return Err(format!(
                        "tensor built on a {}, not a storage",
                        other.type_name()
                    ))
                }
            };
            let elem = if with_dtype {
                match &args[6] {
                    Value::Global(Global::Dtype(e)) => *e,
                    other => return Err(format!("tensor dtype is a {}", other.type_name())),
                }
            } else {
                storage.elem
            };
            if g != Global::RebuildTensor {
                if let Some(Value::Dict(meta)) = args.get(n_fixed) {
                    let meta = meta
                        .try_borrow()
                        .map_err(|_| "dict in use (internal error)")?;
                    let set = meta
                        .items
                        .iter()
                        .any(|(_, v)| !matches!(v, Value::Bool(false) | Value::None));
                    if set {
                        return Err("tensor with metadata (conj/neg bits) is not supported".into());
                    }
                }
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage,
                elem,
                offset: non_negative(&args[1], "storage offset")?,
                size: int_tuple(&args[2], "size")?,
                stride: int_tuple(&args[3], "stride")?,
            })))
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => {
            arity(
                g,
                args,
                if g == Global::RebuildParameter {
                    &[3]
                } else {
                    &[4]
                },
            )?;
            match &args[0] {
                Value::Tensor(t) => Ok(Value::Tensor(t.clone())),
                other => Err(format!("parameter built from a {}", other.type_name())),
            }
        }
        Global::RebuildFromTypeV2 => {
            arity(g, args, &[4])?;
            let (Value::Global(f), Value::Global(Global::TensorClass), Value::Tuple(inner)) =
                (&args[0], &args[1], &args[2])
            else {
                return Err(
                    "_rebuild_from_type_v2 with unsupported arguments (a tensor subclass?)".into(),
                );
            };
            match f {
                Global::RebuildTensor
                | Global::RebuildTensorV2
                | Global::RebuildTensorV3
                | Global::RebuildParameter
                | Global::RebuildParameterWithState => call(*f, inner),
                other => Err(format!("_rebuild_from_type_v2 of {other:?}")),
            }
        }
        Global::TensorClass | Global::StorageClass(_) | Global::Dtype(_) => {
            Err(format!("{g:?} is not callable here"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        // Bytewise reference.
        let mut c = !0u32;
        for &b in &long {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        assert_eq!(crc32(&long), !c);
    }

    fn run(pkl: &[u8]) -> PResult<Value> {
        let mut load = |_: &str| -> PResult<(usize, usize)> { Err("no storages".into()) };
        Machine::new(pkl, &mut load).run()
    }

    #[test]
    fn deep_nesting_drops_without_recursion() {
        // ((((...( ] l l l ... l .  -- a list nested 200k deep.
        let n = 200_000;
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat(b'(').take(n));
        p.push(b']');
        p.extend(std::iter::repeat(b'l').take(n));
        p.push(b'.');
        let v = run(&p).unwrap();
        dismantle(vec![v]);
    }

    #[test]
    fn shared_dict_sees_later_items() {
        // d = {}; memo[0] = d; t = (d,); then d['a'] = 1 through memo[0];
        // the result ((d,), d) must show the item in both places.
        let p = b"\x80\x02}q\x00\x85h\x00X\x01\x00\x00\x00aK\x01s\x86.".to_vec();
        let v = run(&p).unwrap();
        let Value::Tuple(t) = &v else { panic!() };
        let Value::Tuple(inner) = &t[0] else { panic!() };
        let Value::Dict(d) = &inner[0] else { panic!() };
        assert_eq!(d.borrow().items.len(), 1);
        dismantle(vec![v]);
    }

    #[test]
    fn errors_not_panics_on_bad_stack_use() {
        for p in [
            &b"\x80\x02."[..],
            b"\x80\x02(0a.",
            b"\x80\x02(K\x01(s.",
            b"\x80\x02K\x01(\x85.",
            b"\x80\x02]q\x00h\x01.",
            b"\x80\x02cos\nsystem\n.",
            b"\x80\x02\xff.",
            b"\x80\x02X\xff\xff\xff\xff",
        ] {
            assert!(run(p).is_err(), "{p:?}");
        }
    }

    #[test]
    fn gather_transposed() {
        // 2x3 storage [0..6) as f32 bytes of single byte ids, view .t()
        let src: Vec<u8> = (0u8..6).collect();
        let out = gather(&src, 1, 0, &[3, 2], &[1, 3]).unwrap();
        assert_eq!(out, vec![0, 3, 1, 4, 2, 5]);
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
    }
}

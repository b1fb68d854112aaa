//! The safetensors file format for KV caches: tensors `layers.{i}.key` / `layers.{i}.value` of
//! shape `[tokens, kv_heads, head_dim]` (F16, BF16 or F32), an optional `token_ids` tensor (U32,
//! I32 or I64, shape `[tokens]`) and free-form string metadata.
//!
//! A small, strict reader and writer: no memory mapping, every offset checked.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use serde_json::{Map, Value};

use crate::{DType, KvCache, LayerKv, Tensor, TensorError};

/// The largest JSON header accepted: larger ones are not KV files (safetensors uses 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Why a file could not be read or written as a KV cache.
#[derive(Debug, thiserror::Error)]
pub enum KvFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not a well-formed safetensors file.
    #[error("not a safetensors file: {0}")]
    Malformed(String),
    /// The tensors do not form a KV cache.
    #[error("not a KV cache: {0}")]
    NotKv(String),
    /// Tensors disagree with each other.
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// A KV cache with the file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct KvFile {
    /// The cache.
    pub cache: KvCache,
    /// The `__metadata__` map (string to string).
    pub metadata: BTreeMap<String, String>,
}

/// A tensor named in the header: dtype, shape and its byte range in the data section.
type Entry = (String, Vec<usize>, Range<usize>);
/// The header's tensors by name.
type Entries = BTreeMap<String, Entry>;
/// The header's `__metadata__` strings.
type Metadata = BTreeMap<String, String>;

impl KvFile {
    /// Reads a KV cache from a safetensors file: the header first, then each tensor straight
    /// into its own buffer (one copy, no whole-file buffer).
    pub fn read(path: &Path) -> Result<KvFile, KvFileError> {
        let io = |source| KvFileError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut first = [0u8; 8];
        let first = if file_len >= 8 {
            file.read_exact(&mut first).map_err(io)?;
            Some(first)
        } else {
            None
        };
        let header_len = header_len(first, file_len)?;
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let data_start = 8 + header_len;
        let (metadata, tensors) = parse_header(&header, file_len - data_start)?;
        assemble(metadata, tensors, &mut |r: Range<usize>| {
            let mut buf = vec![0u8; r.len()];
            file.seek(SeekFrom::Start(data_start + r.start as u64))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(io)?;
            Ok(buf)
        })
    }

    /// Writes the cache as a safetensors file.
    pub fn write(&self, path: &Path) -> Result<(), KvFileError> {
        std::fs::write(path, self.to_bytes()).map_err(|source| KvFileError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses safetensors bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<KvFile, KvFileError> {
        let first = bytes.get(..8).and_then(|b| b.try_into().ok());
        let header_end = 8 + header_len(first, bytes.len() as u64)? as usize;
        let data = &bytes[header_end..];
        let (metadata, tensors) = parse_header(&bytes[8..header_end], data.len() as u64)?;
        assemble(metadata, tensors, &mut |r| Ok(data[r].to_vec()))
    }

    /// Serializes to safetensors bytes (token ids as U32 when present).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut header = Map::new();
        if !self.metadata.is_empty() {
            let m: Map<String, Value> = self
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            header.insert("__metadata__".into(), Value::Object(m));
        }
        let mut data: Vec<u8> = Vec::with_capacity(self.cache.nbytes());
        let mut add = |name: String, dtype: &str, shape: Vec<usize>, bytes: &[u8]| {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name,
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        };
        for (i, l) in self.cache.layers().iter().enumerate() {
            for (kind, t) in [("key", &l.key), ("value", &l.value)] {
                add(
                    format!("layers.{i}.{kind}"),
                    t.dtype().safetensors_name(),
                    t.shape().to_vec(),
                    t.data(),
                );
            }
        }
        if let Some(ids) = self.cache.token_ids() {
            let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
            add("token_ids".into(), "U32", vec![ids.len()], &bytes);
        }
        let mut json = serde_json::to_vec(&Value::Object(header)).expect("a JSON map serializes");
        // Pad the header so tensor data starts 8-byte aligned, as the reference writer does.
        while !(8 + json.len()).is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + json.len() + data.len());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&data);
        out
    }
}

/// The JSON header's length from a file's first 8 bytes (`None`: the file is shorter than
/// that), checked against the file's `total` length.
fn header_len(first: Option<[u8; 8]>, total: u64) -> Result<u64, KvFileError> {
    let first = first
        .ok_or_else(|| KvFileError::Malformed("shorter than its 8-byte header length".into()))?;
    let len = u64::from_le_bytes(first);
    if len > MAX_HEADER || 8 + len > total {
        return Err(KvFileError::Malformed(
            "header length exceeds the file".into(),
        ));
    }
    Ok(len)
}

/// Checks the JSON header against a data section of `data_len` bytes: the metadata, and every
/// tensor's dtype, shape and byte range.
fn parse_header(json: &[u8], data_len: u64) -> Result<(Metadata, Entries), KvFileError> {
    let header: Map<String, Value> = serde_json::from_slice(json)
        .map_err(|e| KvFileError::Malformed(format!("header JSON: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for (name, entry) in &header {
        if name == "__metadata__" {
            if let Some(m) = entry.as_object() {
                for (k, v) in m {
                    metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        let bad = |what: &str| KvFileError::Malformed(format!("tensor {name}: {what}"));
        let dtype = entry["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let shape = entry["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("shape is not a list of integers"))?;
        let offs = entry["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad("bad data_offsets"))?;
        if offs.0 > offs.1 || offs.1 > data_len {
            return Err(bad("data_offsets outside the file"));
        }
        tensors.insert(
            name.clone(),
            (dtype.to_string(), shape, offs.0 as usize..offs.1 as usize),
        );
    }
    Ok((metadata, tensors))
}

/// Builds the cache from checked header entries, `fetch` giving each tensor's bytes.
fn assemble(
    metadata: Metadata,
    mut tensors: Entries,
    fetch: &mut dyn FnMut(Range<usize>) -> Result<Vec<u8>, KvFileError>,
) -> Result<KvFile, KvFileError> {
    let mut layers = Vec::new();
    loop {
        let i = layers.len();
        let (Some(k), Some(v)) = (
            tensors.remove(&format!("layers.{i}.key")),
            tensors.remove(&format!("layers.{i}.value")),
        ) else {
            break;
        };
        let key = kv_tensor(&format!("layers.{i}.key"), k, fetch)?;
        let value = kv_tensor(&format!("layers.{i}.value"), v, fetch)?;
        layers.push(LayerKv { key, value });
    }
    if layers.is_empty() {
        return Err(KvFileError::NotKv(
            "no tensors named layers.0.key and layers.0.value".into(),
        ));
    }
    let token_ids = match tensors.remove("token_ids") {
        Some((dtype, shape, r)) => Some(token_ids((dtype, shape, &fetch(r)?))?),
        None => None,
    };
    if let Some(extra) = tensors.keys().find(|k| k.starts_with("layers.")) {
        return Err(KvFileError::NotKv(format!(
            "tensor {extra} does not continue the layer sequence 0..{}",
            layers.len()
        )));
    }
    Ok(KvFile {
        cache: KvCache::new(layers, token_ids)?,
        metadata,
    })
}

fn kv_tensor(
    name: &str,
    (dtype, shape, range): Entry,
    fetch: &mut dyn FnMut(Range<usize>) -> Result<Vec<u8>, KvFileError>,
) -> Result<Tensor, KvFileError> {
    let dt = DType::from_safetensors_name(&dtype).ok_or_else(|| {
        KvFileError::NotKv(format!("{name} has dtype {dtype}; need F16, BF16 or F32"))
    })?;
    let shape: [usize; 3] = shape.try_into().map_err(|s: Vec<usize>| {
        KvFileError::NotKv(format!(
            "{name} has shape {s:?}; need [tokens, kv_heads, head_dim]"
        ))
    })?;
    // Checked before the bytes are read, so a bad header costs no allocation of its size.
    if shape.iter().try_fold(dt.size(), |n, &d| n.checked_mul(d)) != Some(range.len()) {
        return Err(KvFileError::NotKv(format!(
            "{name}: {} data bytes for shape {shape:?} of {dtype}",
            range.len()
        )));
    }
    Ok(Tensor::new(dt, shape, fetch(range)?)?)
}

fn token_ids((dtype, shape, bytes): (String, Vec<usize>, &[u8])) -> Result<Vec<u32>, KvFileError> {
    let bad = |m: String| KvFileError::NotKv(format!("token_ids: {m}"));
    if shape.len() != 1 {
        return Err(bad(format!("shape {shape:?} is not [tokens]")));
    }
    let width = match dtype.as_str() {
        "U32" | "I32" => 4,
        "I64" => 8,
        other => return Err(bad(format!("dtype {other}; need U32, I32 or I64"))),
    };
    if bytes.len() != shape[0] * width {
        return Err(bad("data size does not match its shape".into()));
    }
    bytes
        .chunks_exact(width)
        .map(|b| {
            let v = if width == 4 {
                i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            } else {
                i64::from_le_bytes(b.try_into().expect("8 bytes"))
            };
            let v = if dtype == "U32" { v as u32 as i64 } else { v };
            u32::try_from(v).map_err(|_| bad(format!("id {v} is not a u32")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KvFile {
        let t = |b: f32| {
            Tensor::from_f32(
                DType::BF16,
                [3, 1, 2],
                &[b, b + 1.0, b + 2.0, b + 3.0, b + 4.0, b + 5.0],
            )
            .unwrap()
        };
        let cache = KvCache::new(
            vec![
                LayerKv {
                    key: t(0.0),
                    value: t(10.0),
                },
                LayerKv {
                    key: t(20.0),
                    value: t(30.0),
                },
            ],
            Some(vec![7, 8, 9]),
        )
        .unwrap();
        KvFile {
            cache,
            metadata: [("model".to_string(), "test".to_string())].into(),
        }
    }

    #[test]
    fn round_trips() {
        let f = sample();
        assert_eq!(KvFile::from_bytes(&f.to_bytes()).unwrap(), f);
    }

    #[test]
    fn reads_the_shared_codelm_file() {
        let path = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
        let f = KvFile::read(&path).unwrap();
        assert_eq!(f.cache.num_layers(), 8);
        assert_eq!(f.cache.tokens(), 1024);
        assert_eq!((f.cache.kv_heads(), f.cache.head_dim()), (2, 128));
        assert_eq!(f.cache.dtype(), DType::F16);
    }

    #[test]
    fn rejects_truncation_and_garbage() {
        let bytes = sample().to_bytes();
        for cut in [0, 5, 8, 20, bytes.len() - 1] {
            assert!(KvFile::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            KvFile::from_bytes(&huge),
            Err(KvFileError::Malformed(_))
        ));
        let empty = KvFile::from_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}");
        assert!(matches!(empty, Err(KvFileError::NotKv(_))));
    }

    #[test]
    fn a_file_reads_as_its_bytes_parse_and_truncated_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("kvf-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kv.safetensors");
        let f = sample();
        f.write(&path).unwrap();
        assert_eq!(KvFile::read(&path).unwrap(), f);
        let bytes = f.to_bytes();
        for cut in [0, 5, 8, 20, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = KvFile::read(&path).unwrap_err();
            assert!(
                matches!(err, KvFileError::Malformed(_) | KvFileError::NotKv(_)),
                "cut at {cut}: {err}"
            );
        }
        let missing = KvFile::read(&dir.join("absent")).unwrap_err();
        assert!(matches!(missing, KvFileError::Io { .. }), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_shape_that_disagrees_with_its_bytes_is_refused_before_reading() {
        let json = br#"{"layers.0.key":{"dtype":"F16","shape":[1000000,1000000,64],"data_offsets":[0,4]},"layers.0.value":{"dtype":"F16","shape":[1,1,2],"data_offsets":[0,4]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json);
        bytes.extend_from_slice(&[0; 4]);
        let err = KvFile::from_bytes(&bytes).unwrap_err();
        assert!(
            matches!(&err, KvFileError::NotKv(m) if m.contains("layers.0.key")),
            "{err}"
        );
    }
}

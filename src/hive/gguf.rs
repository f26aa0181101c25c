//! Just enough of a GGUF file's header to size a model's KV cache before loading it: the
//! architecture's layer count, training context, and attention head shape.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// The attention shape of a model, from its GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub(crate) layers: u64,
    pub(crate) context_train: u64,
    pub(crate) heads_kv: u64,
    pub(crate) key_length: u64,
    pub(crate) value_length: u64,
}

impl Shape {
    /// Bytes of KV cache per token of context: keys and values of every layer, in f16 (what
    /// llama.cpp allocates by default).
    pub(crate) fn kv_bytes_per_token(&self) -> u64 {
        self.layers
            .saturating_mul(self.heads_kv)
            .saturating_mul(self.key_length.saturating_add(self.value_length))
            .saturating_mul(2)
    }
}

/// Reads the shape from the file's header; `None` when the file is not GGUF v2/v3 or lacks a
/// key this needs (the caller then falls back to a flat allowance).
pub fn shape(path: &Path) -> Option<Shape> {
    let file = std::fs::File::open(path).ok()?;
    shape_from(&mut BufReader::new(file))
}

// Bounds that no real header comes near; they keep a corrupt file from asking for gigabytes.
const MAX_KEYS: u64 = 1 << 20;
const MAX_STRING: u64 = 1 << 24;

fn shape_from(r: &mut (impl Read + Seek)) -> Option<Shape> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).ok()?;
    if &magic != b"GGUF" || !matches!(u32_at(r)?, 2 | 3) {
        return None;
    }
    let _tensors = u64_at(r)?;
    let keys = u64_at(r)?;
    if keys > MAX_KEYS {
        return None;
    }
    let mut arch = None;
    let mut numbers: HashMap<String, u64> = HashMap::new();
    for _ in 0..keys {
        let key = string_at(r)?;
        let kind = u32_at(r)?;
        if key == "general.architecture" && kind == STRING {
            arch = Some(string_at(r)?);
        } else if let Some(n) = number_at(r, kind)? {
            numbers.insert(key, n);
        }
    }
    let arch = arch?;
    let get = |suffix: &str| numbers.get(&format!("{arch}.{suffix}")).copied();
    let embedding = get("embedding_length")?;
    let heads = get("attention.head_count").filter(|&h| h > 0)?;
    let head_dim = embedding / heads;
    Some(Shape {
        layers: get("block_count")?,
        context_train: get("context_length")?,
        heads_kv: get("attention.head_count_kv").unwrap_or(heads),
        key_length: get("attention.key_length").unwrap_or(head_dim),
        value_length: get("attention.value_length").unwrap_or(head_dim),
    })
}

const STRING: u32 = 8;
const ARRAY: u32 = 9;

/// Reads one value of type `kind`: its number when it is an integer, `None` (skipped) for
/// anything else; an error (outer `None`) for an unknown type or a short file.
fn number_at(r: &mut (impl Read + Seek), kind: u32) -> Option<Option<u64>> {
    Some(match kind {
        0 => Some(u64::from(bytes::<1>(r)?[0])),
        1 => u64::try_from(i8::from_le_bytes(bytes::<1>(r)?)).ok(),
        2 => Some(u64::from(u16::from_le_bytes(bytes::<2>(r)?))),
        3 => u64::try_from(i16::from_le_bytes(bytes::<2>(r)?)).ok(),
        4 => Some(u64::from(u32_at(r)?)),
        5 => u64::try_from(i32::from_le_bytes(bytes::<4>(r)?)).ok(),
        10 => Some(u64_at(r)?),
        11 => u64::try_from(i64::from_le_bytes(bytes::<8>(r)?)).ok(),
        _ => {
            skip(r, kind)?;
            None
        }
    })
}

/// Moves past one value of a non-integer type.
fn skip(r: &mut (impl Read + Seek), kind: u32) -> Option<()> {
    match kind {
        6 => seek(r, 4),
        7 => seek(r, 1),
        12 => seek(r, 8),
        STRING => {
            let len = u64_at(r)?;
            (len <= MAX_STRING).then_some(())?;
            seek(r, len)
        }
        ARRAY => {
            let item = u32_at(r)?;
            let count = u64_at(r)?;
            match fixed_size(item) {
                Some(size) => seek(r, count.checked_mul(size)?),
                None => (0..count).try_for_each(|_| skip(r, item)),
            }
        }
        _ => None,
    }
}

fn fixed_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn seek(r: &mut impl Seek, n: u64) -> Option<()> {
    r.seek_relative(i64::try_from(n).ok()?).ok()
}

fn bytes<const N: usize>(r: &mut impl Read) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).ok()?;
    Some(b)
}

fn u32_at(r: &mut impl Read) -> Option<u32> {
    Some(u32::from_le_bytes(bytes::<4>(r)?))
}

fn u64_at(r: &mut impl Read) -> Option<u64> {
    Some(u64::from_le_bytes(bytes::<8>(r)?))
}

fn string_at(r: &mut impl Read) -> Option<String> {
    let len = u64_at(r)?;
    if len > MAX_STRING {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    r.read_exact(&mut buf).ok()?;
    String::from_utf8(buf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn key_u32(out: &mut Vec<u8>, key: &str, v: u32) {
        string(out, key);
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    }

    /// A header shaped like SmolLM2-135M's, with the kinds of entries that must be skipped (a
    /// float, a string array like the vocabulary, an integer array) between the ones read.
    fn header(head_count_kv: Option<u32>) -> Vec<u8> {
        let mut h = b"GGUF".to_vec();
        h.extend(3u32.to_le_bytes());
        h.extend(272u64.to_le_bytes());
        let keys = if head_count_kv.is_some() { 9u64 } else { 8 };
        h.extend(keys.to_le_bytes());
        string(&mut h, "general.architecture");
        h.extend(STRING.to_le_bytes());
        string(&mut h, "llama");
        string(&mut h, "llama.rope.freq_base");
        h.extend(6u32.to_le_bytes());
        h.extend(100000f32.to_le_bytes());
        string(&mut h, "tokenizer.ggml.tokens");
        h.extend(ARRAY.to_le_bytes());
        h.extend(STRING.to_le_bytes());
        h.extend(3u64.to_le_bytes());
        for t in ["<s>", "hello", "world"] {
            string(&mut h, t);
        }
        string(&mut h, "tokenizer.ggml.token_type");
        h.extend(ARRAY.to_le_bytes());
        h.extend(5u32.to_le_bytes());
        h.extend(3u64.to_le_bytes());
        h.extend([0u8; 12]);
        key_u32(&mut h, "llama.block_count", 30);
        key_u32(&mut h, "llama.context_length", 8192);
        key_u32(&mut h, "llama.embedding_length", 576);
        key_u32(&mut h, "llama.attention.head_count", 9);
        if let Some(kv) = head_count_kv {
            key_u32(&mut h, "llama.attention.head_count_kv", kv);
        }
        h
    }

    #[test]
    fn reads_the_attention_shape_past_arrays_and_floats() {
        let shape = shape_from(&mut Cursor::new(header(Some(3)))).expect("a shape");
        assert_eq!(
            shape,
            Shape {
                layers: 30,
                context_train: 8192,
                heads_kv: 3,
                key_length: 64,
                value_length: 64,
            }
        );
        // 30 layers x 3 heads x (64 + 64) x 2 bytes.
        assert_eq!(shape.kv_bytes_per_token(), 23_040);
    }

    #[test]
    fn without_grouped_heads_every_head_has_keys_and_values() {
        let shape = shape_from(&mut Cursor::new(header(None))).expect("a shape");
        assert_eq!(shape.heads_kv, 9);
    }

    #[test]
    fn other_files_and_cut_headers_give_nothing() {
        assert_eq!(shape_from(&mut Cursor::new(b"not a model".to_vec())), None);
        let full = header(Some(3));
        for cut in [4, 20, full.len() / 2, full.len() - 1] {
            assert_eq!(
                shape_from(&mut Cursor::new(full[..cut].to_vec())),
                None,
                "{cut}"
            );
        }
    }
}

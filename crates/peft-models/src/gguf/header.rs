//! A bounds check of a GGUF header before candle parses it.
//!
//! candle's [`gguf_file::Content::read`] trusts the counts and lengths in the header: a string length, an
//! array count or a dimension count of 10¹² is allocated as claimed, so a corrupt or hostile file makes the
//! process allocate until the allocator fails. [`check_header`] walks the same header with every count and
//! length checked against the bytes the file really has left (a string of length n needs n bytes, an array of
//! n u32 needs 4n, a tensor info at least 24), and at most [`MAX_DIMS`] dimensions per tensor, so the parse
//! that follows allocates only what the file holds. [`read_content`] does both.

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// ggml's `GGML_MAX_DIMS`: a tensor has at most 4 dimensions.
pub const MAX_DIMS: u64 = 4;

const MAGIC: u32 = 0x4655_4747; // "GGUF" read as a little-endian u32

/// Reads a GGUF file's header and tensor infos ([`gguf_file::Content`]) after [`check_header`] has bounded
/// every count in it by the file's length, and checks that every tensor's data lies within the file.
/// Returns the content and the file's size in bytes.
///
/// Errors name the file and, for a header that claims more than the file holds, the metadata key (or tensor
/// index) and the claimed and available sizes.
pub fn read_content(path: &Path) -> Result<(gguf_file::Content, u64)> {
    let bad = |message: String| ModelError::Gguf {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    check_header(&mut reader, len).map_err(bad)?;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| ModelError::io(path, e))?;
    let content = gguf_file::Content::read(&mut reader).map_err(|e| bad(e.to_string()))?;
    for (name, info) in &content.tensor_infos {
        super::check_tensor_extent(name, info, content.tensor_data_offset, len).map_err(bad)?;
    }
    Ok((content, len))
}

/// Walks a GGUF header (magic, version, counts, every metadata value, every tensor info) from the start of
/// `r`, a stream of `len` bytes, and fails with a message on the first count or length that the rest of the
/// stream cannot hold. Reads the header once; allocates at most one string at a time, bounded by `len`.
///
/// ```
/// # use peft_models::gguf::check_header;
/// // magic, version 3, 10^12 tensors, 0 metadata entries: far more than 24 bytes can hold
/// let mut b = Vec::new();
/// b.extend_from_slice(b"GGUF");
/// b.extend_from_slice(&3u32.to_le_bytes());
/// b.extend_from_slice(&1_000_000_000_000u64.to_le_bytes());
/// b.extend_from_slice(&0u64.to_le_bytes());
/// let err = check_header(&mut std::io::Cursor::new(&b), b.len() as u64).unwrap_err();
/// assert!(err.contains("1000000000000 tensor infos"), "{err}");
/// ```
pub fn check_header(r: &mut impl Read, len: u64) -> std::result::Result<(), String> {
    let mut c = Cursor { r, pos: 0, len };
    let magic = c.u32("the magic number")?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file (magic {magic:#010x}, expected {MAGIC:#010x} \"GGUF\")"
        ));
    }
    let version = c.u32("the version")?;
    if !(1..=3).contains(&version) {
        return Err(format!("GGUF version {version} (1, 2 and 3 are read)"));
    }
    let wide = version >= 2;
    let tensor_count = c.count(wide, "the tensor count")?;
    let kv_count = c.count(wide, "the metadata count")?;
    // each metadata entry needs at least a key length and a value type; each tensor info a name length,
    // a dimension count, a type and an offset
    let key_min = if wide { 8 } else { 4 } + 4;
    let info_min = if wide { 8 } else { 4 } + 4 + 4 + 8;
    c.fits(kv_count, key_min, "metadata entries")?;
    c.fits(tensor_count, info_min, "tensor infos")?;
    for i in 0..kv_count {
        let key = c.string(wide, &format!("metadata key #{i}"))?;
        let ty = c.u32(&format!("the type of `{key}`"))?;
        c.value(ty, wide, &key, 0)?;
    }
    for i in 0..tensor_count {
        let name = c.string(wide, &format!("the name of tensor #{i}"))?;
        let n_dims = u64::from(c.u32(&format!("the dimension count of `{name}`"))?);
        if n_dims > MAX_DIMS {
            return Err(format!(
                "tensor `{name}` claims {n_dims} dimensions (ggml has at most {MAX_DIMS})"
            ));
        }
        let mut elems: u64 = 1;
        for _ in 0..n_dims {
            let d = c.count(wide, &format!("a dimension of `{name}`"))?;
            elems = elems.saturating_mul(d);
        }
        // ggml's densest type (IQ1_S) stores 1.5625 bits per element: more than 8 elements per byte of the
        // file cannot be there
        if elems / 8 > c.len {
            return Err(format!(
                "tensor `{name}` claims {elems} elements, more than a {}-byte file can hold",
                c.len
            ));
        }
        c.u32(&format!("the type of `{name}`"))?;
        c.u64(&format!("the offset of `{name}`"))?;
    }
    Ok(())
}

struct Cursor<'a, R: Read> {
    r: &'a mut R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<'_, R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| {
            format!(
                "truncated header: {what} at byte {} ({e}; the file has {} bytes)",
                self.pos, self.len
            )
        })?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn count(&mut self, wide: bool, what: &str) -> std::result::Result<u64, String> {
        if wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    /// `n` items of at least `size` bytes each fit in what is left.
    fn fits(&self, n: u64, size: u64, what: &str) -> std::result::Result<(), String> {
        if n.saturating_mul(size) > self.left() {
            return Err(format!(
                "the header claims {n} {what} ({size}+ bytes each) but only {} bytes follow",
                self.left()
            ));
        }
        Ok(())
    }

    fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
        if n > self.left() {
            return Err(format!(
                "{what} claims {n} bytes but only {} follow",
                self.left()
            ));
        }
        let copied = std::io::copy(&mut (&mut *self.r).take(n), &mut std::io::sink())
            .map_err(|e| format!("reading {what}: {e}"))?;
        if copied != n {
            return Err(format!("truncated header: {what}"));
        }
        self.pos += n;
        Ok(())
    }

    fn string(&mut self, wide: bool, what: &str) -> std::result::Result<String, String> {
        let n = self.count(wide, what)?;
        if n > self.left() {
            return Err(format!(
                "{what}: a string of {n} bytes but only {} follow",
                self.left()
            ));
        }
        if n > 1 << 16 {
            // not a key or a name we would print: skip it
            self.skip(n, what)?;
            return Ok(format!("<{n}-byte string>"));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("truncated header: {what} ({e})"))?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn value(
        &mut self,
        ty: u32,
        wide: bool,
        key: &str,
        depth: u32,
    ) -> std::result::Result<(), String> {
        let what = || format!("the value of `{key}`");
        match ty {
            0 | 1 | 7 => self.skip(1, &what()),
            2 | 3 => self.skip(2, &what()),
            4..=6 => self.skip(4, &what()),
            10..=12 => self.skip(8, &what()),
            8 => {
                let n = self.count(wide, &what())?;
                self.skip(n, &what())
            }
            9 => {
                if depth > 2 {
                    return Err(format!("`{key}`: arrays nested deeper than 3 levels"));
                }
                let elem = self.u32(&format!("the element type of `{key}`"))?;
                let n = self.count(wide, &format!("the length of `{key}`"))?;
                let size = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => {
                        if wide {
                            8
                        } else {
                            4
                        }
                    }
                    9 => 12,
                    other => {
                        return Err(format!("`{key}`: unknown array element type {other}"));
                    }
                };
                self.fits(n, size, &format!("elements in `{key}`"))?;
                if matches!(elem, 8 | 9) {
                    for _ in 0..n {
                        self.value(elem, wide, key, depth + 1)?;
                    }
                    Ok(())
                } else {
                    self.skip(n * size, &what())
                }
            }
            other => Err(format!("`{key}`: unknown value type {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, tensors: u64, kvs: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&tensors.to_le_bytes());
        b.extend_from_slice(&kvs.to_le_bytes());
        b
    }

    fn string(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }

    fn check(b: &[u8]) -> std::result::Result<(), String> {
        check_header(&mut std::io::Cursor::new(b), b.len() as u64)
    }

    #[test]
    fn lying_counts_and_lengths_are_refused_before_allocation() {
        // a metadata string value claiming 2^60 bytes
        let mut b = header(3, 0, 1);
        string(&mut b, "general.name");
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let e = check(&b).unwrap_err();
        assert!(
            e.contains("general.name") && e.contains("1152921504606846976"),
            "{e}"
        );

        // an array of 10^12 u32
        let mut b = header(3, 0, 1);
        string(&mut b, "tokenizer.ggml.token_type");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&1_000_000_000_000u64.to_le_bytes());
        let e = check(&b).unwrap_err();
        assert!(
            e.contains("1000000000000 elements in `tokenizer.ggml.token_type`"),
            "{e}"
        );

        // a tensor with 2^32-1 dimensions
        let mut b = header(3, 1, 0);
        string(&mut b, "token_embd.weight");
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = check(&b).unwrap_err();
        assert!(
            e.contains("token_embd.weight") && e.contains("4294967295 dimensions"),
            "{e}"
        );

        // a key length beyond the file
        let mut b = header(3, 0, 1);
        b.extend_from_slice(&(1u64 << 40).to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        let e = check(&b).unwrap_err();
        assert!(
            e.contains("metadata key #0: a string of 1099511627776 bytes"),
            "{e}"
        );

        // wrong magic, unknown version, truncation in the counts
        assert!(check(b"GGML\x03\0\0\0").unwrap_err().contains("not a GGUF"));
        assert!(check(&header(7, 0, 0)).unwrap_err().contains("version 7"));
        assert!(
            check(&header(3, 0, 0)[..12])
                .unwrap_err()
                .contains("truncated")
        );
    }

    #[test]
    fn a_well_formed_header_passes() {
        let mut b = header(3, 1, 2);
        string(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        string(&mut b, "llama");
        string(&mut b, "tokenizer.ggml.tokens");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        string(&mut b, "a");
        string(&mut b, "bc");
        string(&mut b, "output.weight");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&8u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&[0u8; 128]);
        check(&b).unwrap();
        // and the same header cut anywhere fails cleanly
        for cut in 0..b.len() - 128 {
            assert!(check(&b[..cut]).is_err(), "cut at {cut}");
        }
    }
}

//! The safetensors container: writing one, and the bounds check a file must pass before the
//! `safetensors` crate reads it.

use std::collections::BTreeMap;
use std::io::Write;

use safetensors::tensor::Dtype;

use crate::error::CheckpointError;

/// A tensor's bytes on the CPU, as safetensors writes them.
pub(super) struct Blob {
    pub(super) dtype: Dtype,
    pub(super) shape: Vec<usize>,
    pub(super) bytes: Vec<u8>,
}

/// Writes the safetensors layout: the header's length (u64, little endian), the JSON header
/// padded with spaces to a multiple of 8 bytes, then every tensor's bytes.
///
/// Written here rather than with `safetensors::serialize`: 0.3's serializer emits invalid JSON
/// (`{},"__metadata__":...`) for a file with metadata and no tensors, which a router that has
/// not stepped yet produces. Tensors go in order of decreasing element size, then by key (as
/// the crate orders them), so that every tensor starts at an offset aligned to its element
/// size and memory-mapping readers can use the data in place.
pub(super) fn write_safetensors(
    out: &mut impl Write,
    blobs: &BTreeMap<String, Blob>,
    metadata: &BTreeMap<&str, String>,
) -> std::io::Result<()> {
    let mut order: Vec<(&String, &Blob)> = blobs.iter().collect();
    order.sort_by(|(ka, a), (kb, b)| b.dtype.size().cmp(&a.dtype.size()).then(ka.cmp(kb)));
    let mut header = serde_json::Map::new();
    let to_json = |e: serde_json::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    header.insert("__metadata__".to_string(), serde_json::to_value(metadata).map_err(to_json)?);
    let mut offset = 0usize;
    for (key, blob) in &order {
        let end = offset + blob.bytes.len();
        let entry = serde_json::json!({
            "dtype": blob.dtype,
            "shape": blob.shape,
            "data_offsets": [offset, end],
        });
        header.insert((*key).clone(), entry);
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).map_err(to_json)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for (_, blob) in order {
        out.write_all(&blob.bytes)?;
    }
    Ok(())
}

/// The largest header safetensors accepts.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Rejects a header whose offsets point past the end of the file before safetensors 0.3 sees
/// it: its own final check adds offsets without overflow checks, so a crafted header could
/// wrap around it and make a later slice index panic.
pub(super) fn precheck(bytes: &[u8]) -> std::result::Result<(), CheckpointError> {
    use CheckpointError as E;
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(E::NotSafetensors(format!(
            "{} bytes, shorter than the header length",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(E::NotSafetensors(format!("header length {header_len} is implausible")));
    }
    // At most 1e8: fits in usize.
    let header_len = header_len as usize;
    if header_len > rest.len() {
        return Err(E::Truncated(format!(
            "the header needs {header_len} bytes, {} follow",
            rest.len()
        )));
    }
    let (header, data) = rest.split_at(header_len);
    let Ok(serde_json::Value::Object(entries)) =
        serde_json::from_slice::<serde_json::Value>(header)
    else {
        return Err(E::NotSafetensors("the header is not a JSON object".into()));
    };
    let data_len = data.len() as u64;
    for (name, entry) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry.get("data_offsets").and_then(|o| o.as_array());
        let in_bounds = offsets.is_some_and(|o| {
            o.len() == 2 && o.iter().all(|v| v.as_u64().is_some_and(|v| v <= data_len))
        });
        if !in_bounds {
            return Err(E::Truncated(format!(
                "the offsets of tensor `{name}` are missing or past the end of the data ({data_len} bytes)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use safetensors::tensor::SafeTensors;

    use super::*;

    #[test]
    fn the_writer_produces_what_safetensors_reads_even_without_tensors() {
        let metadata = BTreeMap::from([("k", "v".to_string())]);
        for blobs in [
            BTreeMap::new(),
            BTreeMap::from([
                ("b".to_string(), Blob { dtype: Dtype::F32, shape: vec![3], bytes: vec![1; 12] }),
                ("a".to_string(), Blob { dtype: Dtype::I64, shape: vec![], bytes: vec![2; 8] }),
                ("z".to_string(), Blob { dtype: Dtype::F64, shape: vec![0], bytes: vec![] }),
            ]),
        ] {
            let mut out = Vec::new();
            write_safetensors(&mut out, &blobs, &metadata).unwrap();
            let (header_len, header) = SafeTensors::read_metadata(&out).unwrap();
            assert_eq!(header_len % 8, 0);
            assert_eq!(header.metadata().as_ref().and_then(|m| m.get("k")).unwrap(), "v");
            let file = SafeTensors::deserialize(&out).unwrap();
            assert_eq!(file.len(), blobs.len());
            for (name, blob) in &blobs {
                let view = file.tensor(name).unwrap();
                assert_eq!(
                    (view.dtype(), view.shape(), view.data()),
                    (blob.dtype, &blob.shape[..], &blob.bytes[..])
                );
                // Aligned to the element size from the start of the data.
                let start = view.data().as_ptr() as usize - out[8 + header_len..].as_ptr() as usize;
                assert_eq!(start % blob.dtype.size(), 0);
            }
        }
    }
}

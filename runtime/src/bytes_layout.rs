//! The wire layout of BYTES tensors: each element is a u32 little-endian length followed by
//! its bytes. Used by request validation, batching and output extraction alike.

/// A BYTES payload that does not follow the length-prefixed layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BytesLayoutError {
    #[error("element {element} has a truncated 4-byte length prefix ({left} bytes left)")]
    TruncatedPrefix { element: usize, left: usize },
    #[error("element {element} declares {declared} bytes but only {left} remain")]
    TruncatedElement { element: usize, declared: usize, left: usize },
}

/// Splits a raw BYTES payload into its elements.
pub fn split_bytes_elements(raw: &[u8]) -> Result<Vec<Vec<u8>>, BytesLayoutError> {
    let mut elements = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let Some((length, tail)) = rest.split_first_chunk::<4>() else {
            return Err(BytesLayoutError::TruncatedPrefix { element: elements.len(), left: rest.len() });
        };
        let length = u32::from_le_bytes(*length) as usize;
        if tail.len() < length {
            return Err(BytesLayoutError::TruncatedElement {
                element: elements.len(),
                declared: length,
                left: tail.len(),
            });
        }
        elements.push(tail[..length].to_vec());
        rest = &tail[length..];
    }
    Ok(elements)
}

/// Encodes BYTES elements in the length-prefixed wire form.
pub fn join_bytes_elements<T: AsRef<[u8]>>(elements: &[T]) -> Vec<u8> {
    let total: usize = elements.iter().map(|e| 4 + e.as_ref().len()).sum();
    let mut raw = Vec::with_capacity(total);
    for element in elements {
        let element = element.as_ref();
        raw.extend_from_slice(&(element.len() as u32).to_le_bytes());
        raw.extend_from_slice(element);
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let elements = vec![b"".to_vec(), b"abc".to_vec(), vec![0xff, 0x00]];
        let raw = join_bytes_elements(&elements);
        assert_eq!(split_bytes_elements(&raw).unwrap(), elements);
    }

    #[test]
    fn truncated_bytes_are_rejected() {
        let mut raw = join_bytes_elements(&[b"hello"]);
        raw.pop();
        assert!(split_bytes_elements(&raw).unwrap_err().to_string().contains("declares 5 bytes but only 4 remain"));
        assert!(split_bytes_elements(&[1, 0]).unwrap_err().to_string().contains("truncated"));
    }
}

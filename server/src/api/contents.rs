//! Conversion of typed `contents` fields of a request into the raw little-endian layout ONNX
//! Runtime consumes (BYTES elements in their length-prefixed form).

use mantissa_proto::inference::InferTensorContents;
use mantissa_runtime::DataType;
use mantissa_runtime::bytes_layout::join_bytes_elements;

/// Names of the typed-contents fields that hold data, for error messages.
fn populated_fields(contents: &InferTensorContents) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let mut note = |populated: bool, name| {
        if populated {
            fields.push(name);
        }
    };
    note(!contents.bool_contents.is_empty(), "bool_contents");
    note(!contents.int_contents.is_empty(), "int_contents");
    note(!contents.int64_contents.is_empty(), "int64_contents");
    note(!contents.uint_contents.is_empty(), "uint_contents");
    note(!contents.uint64_contents.is_empty(), "uint64_contents");
    note(!contents.fp32_contents.is_empty(), "fp32_contents");
    note(!contents.fp64_contents.is_empty(), "fp64_contents");
    note(!contents.bytes_contents.is_empty(), "bytes_contents");
    fields
}

/// The typed field that carries a datatype, per the KServe v2 protocol.
pub fn contents_field_for(datatype: DataType) -> Option<&'static str> {
    Some(match datatype {
        DataType::Bool => "bool_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::Fp16 | DataType::Bf16 => return None,
    })
}

/// Typed contents that do not match the input they are for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentsError {
    #[error("{datatype} data must be sent in raw_input_contents (no typed contents field exists for it)")]
    NoTypedField { datatype: DataType },
    #[error("{datatype} data must be in {expected}, got {got}")]
    WrongField { datatype: DataType, expected: &'static str, got: &'static str },
    #[error("{field} holds {count} values, expected {elements} for the given shape")]
    WrongCount { field: &'static str, count: usize, elements: usize },
    #[error("{field}[{index}] = {value} is out of range for {datatype}")]
    OutOfRange { field: &'static str, index: usize, value: i128, datatype: DataType },
}

/// Converts typed contents to raw bytes, checking that exactly the right field is used, that
/// it holds `elements` values and that each value fits the datatype.
pub fn typed_to_raw(
    contents: &InferTensorContents,
    datatype: DataType,
    elements: usize,
) -> Result<Vec<u8>, ContentsError> {
    let Some(expected_field) = contents_field_for(datatype) else {
        return Err(ContentsError::NoTypedField { datatype });
    };
    let populated = populated_fields(contents);
    if let Some(wrong) = populated.iter().find(|field| **field != expected_field) {
        return Err(ContentsError::WrongField { datatype, expected: expected_field, got: wrong });
    }
    let count = match datatype {
        DataType::Bool => contents.bool_contents.len(),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => contents.int_contents.len(),
        DataType::Int64 => contents.int64_contents.len(),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => contents.uint_contents.len(),
        DataType::Uint64 => contents.uint64_contents.len(),
        DataType::Fp32 => contents.fp32_contents.len(),
        DataType::Fp64 => contents.fp64_contents.len(),
        DataType::Bytes => contents.bytes_contents.len(),
        DataType::Fp16 | DataType::Bf16 => 0,
    };
    if count != elements {
        return Err(ContentsError::WrongCount { field: expected_field, count, elements });
    }
    let out_of_range =
        |index: usize, value: i128| ContentsError::OutOfRange { field: expected_field, index, value, datatype };
    Ok(match datatype {
        DataType::Bool => contents.bool_contents.iter().map(|&b| u8::from(b)).collect(),
        DataType::Int8 => {
            let mut raw = Vec::with_capacity(elements);
            for (index, &value) in contents.int_contents.iter().enumerate() {
                raw.push(i8::try_from(value).map_err(|_| out_of_range(index, value.into()))? as u8);
            }
            raw
        }
        DataType::Int16 => {
            let mut raw = Vec::with_capacity(elements * 2);
            for (index, &value) in contents.int_contents.iter().enumerate() {
                let narrowed = i16::try_from(value).map_err(|_| out_of_range(index, value.into()))?;
                raw.extend_from_slice(&narrowed.to_le_bytes());
            }
            raw
        }
        DataType::Int32 => contents.int_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Int64 => contents.int64_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Uint8 => {
            let mut raw = Vec::with_capacity(elements);
            for (index, &value) in contents.uint_contents.iter().enumerate() {
                raw.push(u8::try_from(value).map_err(|_| out_of_range(index, value.into()))?);
            }
            raw
        }
        DataType::Uint16 => {
            let mut raw = Vec::with_capacity(elements * 2);
            for (index, &value) in contents.uint_contents.iter().enumerate() {
                let narrowed = u16::try_from(value).map_err(|_| out_of_range(index, value.into()))?;
                raw.extend_from_slice(&narrowed.to_le_bytes());
            }
            raw
        }
        DataType::Uint32 => contents.uint_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Uint64 => contents.uint64_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Fp32 => contents.fp32_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Fp64 => contents.fp64_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Bytes => join_bytes_elements(&contents.bytes_contents),
        DataType::Fp16 | DataType::Bf16 => unreachable!("rejected above: no typed field"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_contents_convert_to_little_endian() {
        let contents = InferTensorContents { int_contents: vec![1, -2], ..Default::default() };
        assert_eq!(typed_to_raw(&contents, DataType::Int16, 2).unwrap(), vec![1, 0, 0xfe, 0xff]);
        let contents = InferTensorContents { fp32_contents: vec![1.5], ..Default::default() };
        assert_eq!(typed_to_raw(&contents, DataType::Fp32, 1).unwrap(), 1.5f32.to_le_bytes().to_vec());
    }

    #[test]
    fn typed_contents_errors_name_the_problem() {
        let contents = InferTensorContents { int_contents: vec![300], ..Default::default() };
        assert!(
            typed_to_raw(&contents, DataType::Int8, 1)
                .unwrap_err()
                .to_string()
                .contains("int_contents[0] = 300 is out of range for INT8")
        );
        let contents = InferTensorContents { int64_contents: vec![1], ..Default::default() };
        assert!(
            typed_to_raw(&contents, DataType::Fp32, 1)
                .unwrap_err()
                .to_string()
                .contains("must be in fp32_contents, got int64_contents")
        );
        let contents = InferTensorContents { fp32_contents: vec![1.0; 3], ..Default::default() };
        assert!(
            typed_to_raw(&contents, DataType::Fp32, 4).unwrap_err().to_string().contains("holds 3 values, expected 4")
        );
        assert!(
            typed_to_raw(&InferTensorContents::default(), DataType::Fp16, 1)
                .unwrap_err()
                .to_string()
                .contains("raw_input_contents")
        );
    }
}

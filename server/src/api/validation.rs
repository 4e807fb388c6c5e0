//! Turns a wire `ModelInferRequest` into an [`InferenceRequest`], or a precise error naming the
//! field, the expected value and the actual value, before anything is queued.

use std::collections::HashSet;

use mantissa_proto::inference::ModelInferRequest;
use mantissa_proto::inference::model_infer_request::InferInputTensor;
use mantissa_runtime::bytes_layout::split_bytes_elements;
use mantissa_runtime::{DataType, InferenceRequest, InputTensor, ModelSignature, TensorData};

use crate::api::contents::typed_to_raw;
use crate::error::ServeError;

fn invalid(message: String) -> ServeError {
    ServeError::InvalidArgument(message)
}

/// Validates `request` against `signature`. Raw input buffers are moved out of the request.
pub fn validate_request(
    request: &mut ModelInferRequest,
    signature: &ModelSignature,
    max_message_bytes: usize,
) -> Result<InferenceRequest, ServeError> {
    let uses_raw = !request.raw_input_contents.is_empty();
    if uses_raw && request.raw_input_contents.len() != request.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries but the request has {} inputs; when raw contents are used, every input needs one",
            request.raw_input_contents.len(),
            request.inputs.len()
        )));
    }

    let mut slots: Vec<Option<InputTensor>> = vec![None; signature.inputs.len()];
    let mut batch = BatchAgreement::default();
    for (position, input) in request.inputs.iter().enumerate() {
        let Some(index) = signature.inputs.iter().position(|spec| spec.name == input.name) else {
            return Err(invalid(format!(
                "unexpected input '{}'; the model expects inputs {:?}",
                input.name,
                signature.input_names()
            )));
        };
        if slots[index].is_some() {
            return Err(invalid(format!("input '{}' appears more than once", input.name)));
        }
        let raw = uses_raw.then(|| std::mem::take(&mut request.raw_input_contents[position]));
        let checks = InputChecks { signature, index, position, max_message_bytes };
        slots[index] = Some(validate_input(input, raw, &checks, &mut batch)?);
    }

    let mut inputs = Vec::with_capacity(slots.len());
    for (slot, spec) in slots.into_iter().zip(&signature.inputs) {
        match slot {
            Some(input) => inputs.push(input),
            None => {
                return Err(invalid(format!(
                    "missing input '{}'; the model expects inputs {:?}",
                    spec.name,
                    signature.input_names()
                )));
            }
        }
    }
    let outputs = requested_outputs(request, signature)?;
    Ok(InferenceRequest { id: request.id.clone(), inputs, outputs })
}

/// Where one wire input sits: in the signature (`index`) and in the request (`position`).
struct InputChecks<'a> {
    signature: &'a ModelSignature,
    index: usize,
    position: usize,
    max_message_bytes: usize,
}

/// The batch size the first batching input declared, which every other input must repeat.
#[derive(Default)]
struct BatchAgreement {
    first: Option<(i64, String)>,
}

impl BatchAgreement {
    fn check(&mut self, rows: i64, name: &str) -> Result<(), ServeError> {
        match &self.first {
            Some((first_rows, first_name)) if *first_rows != rows => Err(invalid(format!(
                "input '{name}': batch size {rows} differs from input '{first_name}' batch size {first_rows}"
            ))),
            Some(_) => Ok(()),
            None => {
                self.first = Some((rows, name.to_owned()));
                Ok(())
            }
        }
    }
}

/// Checks one input's datatype, shape and batch size, and decodes its data (`raw` when the
/// request uses raw_input_contents, else the typed contents).
fn validate_input(
    input: &InferInputTensor,
    raw: Option<Vec<u8>>,
    checks: &InputChecks<'_>,
    batch: &mut BatchAgreement,
) -> Result<InputTensor, ServeError> {
    let signature = checks.signature;
    let spec = &signature.inputs[checks.index];
    let name = &spec.name;
    let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
        invalid(format!("input '{name}': unknown datatype '{}'; expected {}", input.datatype, spec.datatype))
    })?;
    if datatype != spec.datatype {
        return Err(invalid(format!("input '{name}': expected datatype {}, got {datatype}", spec.datatype)));
    }

    let shape = &input.shape;
    if shape.iter().any(|&dim| dim < 0) {
        return Err(invalid(format!("input '{name}': shape {shape:?} has a negative dimension")));
    }
    let shape_matches = shape.len() == spec.dims.len()
        && shape
            .iter()
            .zip(&spec.dims)
            .enumerate()
            .all(|(axis, (&got, &want))| want == -1 || got == want || (axis == 0 && signature.batches()));
    if !shape_matches {
        return Err(invalid(format!("input '{name}': expected shape {}, got {shape:?}", spec.dims_text())));
    }
    if signature.batches() {
        let rows = shape[0];
        if rows > i64::from(signature.max_batch_size) {
            return Err(invalid(format!(
                "input '{name}': batch size {rows} exceeds the model's max_batch_size {}",
                signature.max_batch_size
            )));
        }
        batch.check(rows, name)?;
    }

    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &dim| acc.checked_mul(dim as usize))
        .filter(|&n| n.saturating_mul(datatype.element_size().unwrap_or(1)) <= checks.max_message_bytes)
        .ok_or_else(|| {
            invalid(format!(
                "input '{name}': shape {shape:?} holds more data than the message limit of {} bytes",
                checks.max_message_bytes
            ))
        })?;

    let raw = match raw {
        Some(raw) => {
            if input.contents.is_some() {
                return Err(invalid(format!(
                    "input '{name}': data given in both raw_input_contents[{}] and typed contents; send one",
                    checks.position
                )));
            }
            raw
        }
        None => {
            let Some(contents) = &input.contents else {
                return Err(invalid(format!(
                    "input '{name}': no data; send it in raw_input_contents or in typed contents"
                )));
            };
            typed_to_raw(contents, datatype, elements).map_err(|why| invalid(format!("input '{name}': {why}")))?
        }
    };
    let data = raw_to_data(raw, datatype, elements, name, shape)?;
    Ok(InputTensor { datatype, shape: shape.clone(), data })
}

/// Indices of the outputs the client asked for (all of them when it named none).
fn requested_outputs(request: &ModelInferRequest, signature: &ModelSignature) -> Result<Vec<usize>, ServeError> {
    if request.outputs.is_empty() {
        return Ok((0..signature.outputs.len()).collect());
    }
    let mut seen = HashSet::new();
    let mut outputs = Vec::with_capacity(request.outputs.len());
    for requested in &request.outputs {
        let Some(index) = signature.outputs.iter().position(|spec| spec.name == requested.name) else {
            return Err(invalid(format!(
                "unexpected requested output '{}'; the model has outputs {:?}",
                requested.name,
                signature.output_names()
            )));
        };
        if !seen.insert(index) {
            return Err(invalid(format!("requested output '{}' appears more than once", requested.name)));
        }
        outputs.push(index);
    }
    Ok(outputs)
}

fn raw_to_data(
    raw: Vec<u8>,
    datatype: DataType,
    elements: usize,
    name: &str,
    shape: &[i64],
) -> Result<TensorData, ServeError> {
    match datatype.element_size() {
        Some(size) => {
            let expected = elements * size;
            if raw.len() != expected {
                return Err(invalid(format!(
                    "input '{name}': raw content holds {} bytes, expected {expected} bytes ({elements} {datatype} elements of shape {shape:?})",
                    raw.len()
                )));
            }
            if datatype == DataType::Bool
                && let Some(position) = raw.iter().position(|&byte| byte > 1)
            {
                return Err(invalid(format!(
                    "input '{name}': BOOL element {position} is {}, expected 0 or 1",
                    raw[position]
                )));
            }
            Ok(TensorData::Raw(raw))
        }
        None => {
            let parts =
                split_bytes_elements(&raw).map_err(|why| invalid(format!("input '{name}': BYTES content: {why}")))?;
            if parts.len() != elements {
                return Err(invalid(format!(
                    "input '{name}': BYTES content holds {} elements, expected {elements} for shape {shape:?}",
                    parts.len()
                )));
            }
            let mut strings = Vec::with_capacity(parts.len());
            for (position, part) in parts.into_iter().enumerate() {
                // ONNX Runtime hands strings to C as NUL-terminated; an embedded NUL cannot pass.
                if let Some(offset) = part.iter().position(|&byte| byte == 0) {
                    return Err(invalid(format!(
                        "input '{name}': BYTES element {position} contains a NUL byte at offset {offset}; ONNX Runtime strings cannot hold NUL"
                    )));
                }
                let text = String::from_utf8(part).map_err(|err| {
                    invalid(format!(
                        "input '{name}': BYTES element {position} is not valid UTF-8 (invalid byte at offset {}); the model takes strings",
                        err.utf8_error().valid_up_to()
                    ))
                })?;
                strings.push(text);
            }
            Ok(TensorData::Strings(strings))
        }
    }
}

#[cfg(test)]
mod tests {
    use mantissa_proto::inference::InferTensorContents;
    use mantissa_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

    use super::*;
    use mantissa_runtime::TensorSpec;
    use mantissa_runtime::bytes_layout::join_bytes_elements;

    fn signature() -> ModelSignature {
        ModelSignature {
            inputs: vec![
                TensorSpec { name: "x".into(), datatype: DataType::Fp32, dims: vec![-1, 2] },
                TensorSpec { name: "s".into(), datatype: DataType::Bytes, dims: vec![-1] },
            ],
            outputs: vec![
                TensorSpec { name: "y".into(), datatype: DataType::Fp32, dims: vec![-1, 2] },
                TensorSpec { name: "z".into(), datatype: DataType::Int64, dims: vec![-1] },
            ],
            max_batch_size: 4,
        }
    }

    fn tensor(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor { name: name.into(), datatype: datatype.into(), shape, ..Default::default() }
    }

    fn good_request() -> ModelInferRequest {
        ModelInferRequest {
            id: "req-1".into(),
            inputs: vec![tensor("s", "BYTES", vec![1]), tensor("x", "FP32", vec![1, 2])],
            raw_input_contents: vec![
                join_bytes_elements(&[b"hi"]),
                [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ],
            ..Default::default()
        }
    }

    fn error_of(mut request: ModelInferRequest) -> String {
        match validate_request(&mut request, &signature(), 1 << 20) {
            Err(ServeError::InvalidArgument(message)) => message,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_good_request_in_signature_order() {
        let mut request = good_request();
        let valid = validate_request(&mut request, &signature(), 1 << 20).unwrap();
        assert_eq!(valid.id, "req-1");
        assert_eq!(valid.inputs[0].shape, vec![1, 2]);
        assert_eq!(valid.inputs[1].data, TensorData::Strings(vec!["hi".into()]));
        assert_eq!(valid.outputs, vec![0, 1]);
    }

    #[test]
    fn rejects_each_bad_input_with_a_precise_message() {
        let mut r = good_request();
        r.inputs[1].name = "q".into();
        assert!(error_of(r).contains("unexpected input 'q'"));

        let mut r = good_request();
        r.inputs[0] = r.inputs[1].clone();
        r.raw_input_contents[0] = r.raw_input_contents[1].clone();
        assert!(error_of(r).contains("input 'x' appears more than once"));

        let mut r = good_request();
        r.inputs.remove(0);
        r.raw_input_contents.remove(0);
        assert!(error_of(r).contains("missing input 's'"));

        let mut r = good_request();
        r.inputs[1].datatype = "FP64".into();
        assert!(error_of(r).contains("input 'x': expected datatype FP32, got FP64"));

        let mut r = good_request();
        r.inputs[1].shape = vec![1, 3];
        assert!(error_of(r).contains("input 'x': expected shape [-1, 2], got [1, 3]"));

        let mut r = good_request();
        r.inputs[1].shape = vec![-1, 2];
        assert!(error_of(r).contains("negative dimension"));

        let mut r = good_request();
        r.raw_input_contents[1].pop();
        assert!(error_of(r).contains("raw content holds 7 bytes, expected 8 bytes"));

        let mut r = good_request();
        r.inputs[1].contents = Some(InferTensorContents { fp32_contents: vec![1.0, 2.0], ..Default::default() });
        assert!(error_of(r).contains("both raw_input_contents[1] and typed contents"));

        let mut r = good_request();
        r.inputs[0].shape = vec![5];
        r.inputs[1].shape = vec![5, 2];
        assert!(error_of(r).contains("batch size 5 exceeds the model's max_batch_size 4"));

        let mut r = good_request();
        r.raw_input_contents[0] = join_bytes_elements(&[vec![0xc3, 0x28]]);
        assert!(error_of(r).contains("BYTES element 0 is not valid UTF-8"));

        let mut r = good_request();
        r.raw_input_contents[0] = join_bytes_elements(&[b"a\0b".to_vec()]);
        assert!(error_of(r).contains("BYTES element 0 contains a NUL byte at offset 1"));

        let big_signature = ModelSignature {
            inputs: vec![TensorSpec { name: "x".into(), datatype: DataType::Fp32, dims: vec![-1, -1] }],
            outputs: vec![],
            max_batch_size: 0,
        };
        let mut request = ModelInferRequest {
            inputs: vec![tensor("x", "FP32", vec![1 << 20, 1 << 20])],
            raw_input_contents: vec![vec![]],
            ..Default::default()
        };
        let message = validate_request(&mut request, &big_signature, 64 << 20).unwrap_err().to_string();
        assert!(message.contains("more data than the message limit of 67108864 bytes"), "{message}");
    }

    #[test]
    fn rejects_unknown_and_duplicate_outputs() {
        let mut r = good_request();
        r.outputs = vec![InferRequestedOutputTensor { name: "nope".into(), ..Default::default() }];
        assert!(error_of(r).contains("unexpected requested output 'nope'"));
        let mut r = good_request();
        let z = InferRequestedOutputTensor { name: "z".into(), ..Default::default() };
        r.outputs = vec![z.clone(), z];
        assert!(error_of(r).contains("requested output 'z' appears more than once"));
    }

    #[test]
    fn typed_contents_are_accepted() {
        let mut r = good_request();
        r.raw_input_contents.clear();
        r.inputs[0].contents = Some(InferTensorContents { bytes_contents: vec![b"a".to_vec()], ..Default::default() });
        r.inputs[1].contents = Some(InferTensorContents { fp32_contents: vec![1.0, 2.0], ..Default::default() });
        let valid = validate_request(&mut r, &signature(), 1 << 20).unwrap();
        assert_eq!(valid.inputs[0].data, TensorData::Raw([1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
}

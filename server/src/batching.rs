//! Dynamic batching: requests whose inputs agree in everything but the number of rows are
//! concatenated along dimension 0 into one run, and the outputs are split back so that each
//! caller gets exactly its own rows. Inputs and outputs are row-major with the batch first,
//! so concatenation and splitting are plain byte ranges.

use crate::contents::{TensorData, join_bytes_elements, split_bytes_elements};
use crate::datatype::DataType;
use crate::error::ServeError;
use crate::executor::OutputTensor;
use crate::validation::{ValidInput, ValidRequest};

/// Rows a request carries along dimension 0.
pub fn rows(request: &ValidRequest) -> usize {
    request.inputs.first().and_then(|input| input.shape.first()).map_or(1, |&rows| rows as usize)
}

/// True when `b` can run in the same batch as `a`: same datatypes and the same shape after
/// dimension 0 for every input.
pub fn compatible(a: &ValidRequest, b: &ValidRequest) -> bool {
    a.inputs.len() == b.inputs.len()
        && a.inputs.iter().zip(&b.inputs).all(|(x, y)| {
            x.datatype == y.datatype && x.shape.len() == y.shape.len() && x.shape.get(1..) == y.shape.get(1..)
        })
}

/// Concatenates compatible requests into one that asks for every output.
pub fn merge(requests: &[&ValidRequest], output_count: usize) -> ValidRequest {
    let total_rows: usize = requests.iter().map(|r| rows(r)).sum();
    let inputs = (0..requests[0].inputs.len())
        .map(|index| {
            let first = &requests[0].inputs[index];
            let mut shape = first.shape.clone();
            shape[0] = total_rows as i64;
            let data = match &first.data {
                TensorData::Raw(_) => TensorData::Raw(
                    requests
                        .iter()
                        .flat_map(|r| match &r.inputs[index].data {
                            TensorData::Raw(raw) => raw.as_slice(),
                            TensorData::Strings(_) => &[],
                        })
                        .copied()
                        .collect(),
                ),
                TensorData::Strings(_) => TensorData::Strings(
                    requests
                        .iter()
                        .flat_map(|r| match &r.inputs[index].data {
                            TensorData::Strings(strings) => strings.clone(),
                            TensorData::Raw(_) => Vec::new(),
                        })
                        .collect(),
                ),
            };
            ValidInput { datatype: first.datatype, shape, data }
        })
        .collect();
    ValidRequest { id: "batch".to_owned(), inputs, outputs: (0..output_count).collect() }
}

/// Splits the outputs of a merged run back into per-request outputs (each in the order its
/// request asked for).
pub fn split(outputs: Vec<OutputTensor>, requests: &[&ValidRequest]) -> Result<Vec<Vec<OutputTensor>>, ServeError> {
    let total_rows: usize = requests.iter().map(|r| rows(r)).sum();
    // Per output: each request's slice.
    let mut sliced: Vec<Vec<OutputTensor>> = Vec::with_capacity(outputs.len());
    for output in outputs {
        if output.shape.first().copied() != Some(total_rows as i64) {
            return Err(ServeError::Execution(format!(
                "output '{}' has shape {:?}, which does not keep the batch of {total_rows} rows along dimension 0",
                output.name, output.shape
            )));
        }
        let per_row_shape = &output.shape[1..];
        let parts: Vec<Vec<u8>> = match output.datatype {
            DataType::Bytes => {
                let elements = split_bytes_elements(&output.raw).map_err(ServeError::Execution)?;
                let per_row = elements.len() / total_rows.max(1);
                let mut start = 0;
                requests
                    .iter()
                    .map(|r| {
                        let end = start + rows(r) * per_row;
                        let part = join_bytes_elements(&elements[start..end]);
                        start = end;
                        part
                    })
                    .collect()
            }
            _ => {
                let row_bytes = output.raw.len() / total_rows.max(1);
                let mut start = 0;
                requests
                    .iter()
                    .map(|r| {
                        let end = start + rows(r) * row_bytes;
                        let part = output.raw[start..end].to_vec();
                        start = end;
                        part
                    })
                    .collect()
            }
        };
        sliced.push(
            requests
                .iter()
                .zip(parts)
                .map(|(r, raw)| {
                    let mut shape = vec![rows(r) as i64];
                    shape.extend_from_slice(per_row_shape);
                    OutputTensor { name: output.name.clone(), datatype: output.datatype, shape, raw }
                })
                .collect(),
        );
    }
    Ok(requests
        .iter()
        .enumerate()
        .map(|(position, request)| request.outputs.iter().map(|&index| sliced[index][position].clone()).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(rows: i64, value: u8, outputs: Vec<usize>) -> ValidRequest {
        ValidRequest {
            id: format!("r{value}"),
            inputs: vec![
                ValidInput {
                    datatype: DataType::Uint8,
                    shape: vec![rows, 2],
                    data: TensorData::Raw(vec![value; rows as usize * 2]),
                },
                ValidInput {
                    datatype: DataType::Bytes,
                    shape: vec![rows],
                    data: TensorData::Strings(vec![format!("s{value}"); rows as usize]),
                },
            ],
            outputs,
        }
    }

    #[test]
    fn compatibility_ignores_only_the_batch_dimension() {
        let a = request(1, 1, vec![0]);
        let mut b = request(3, 2, vec![0]);
        assert!(compatible(&a, &b));
        b.inputs[0].shape = vec![3, 4];
        assert!(!compatible(&a, &b));
        let mut c = request(1, 3, vec![0]);
        c.inputs[0].datatype = DataType::Int8;
        assert!(!compatible(&a, &c));
    }

    #[test]
    fn merge_then_split_gives_each_caller_its_own_rows() {
        let a = request(1, 1, vec![1]);
        let b = request(2, 2, vec![0, 1]);
        let merged = merge(&[&a, &b], 2);
        assert_eq!(merged.inputs[0].shape, vec![3, 2]);
        assert_eq!(merged.inputs[0].data, TensorData::Raw(vec![1, 1, 2, 2, 2, 2]));
        assert_eq!(merged.inputs[1].data, TensorData::Strings(vec!["s1".into(), "s2".into(), "s2".into()]));

        // Identity outputs of the merged run.
        let outputs = vec![
            OutputTensor {
                name: "u".into(),
                datatype: DataType::Uint8,
                shape: vec![3, 2],
                raw: vec![1, 1, 2, 2, 2, 2],
            },
            OutputTensor {
                name: "s".into(),
                datatype: DataType::Bytes,
                shape: vec![3],
                raw: join_bytes_elements(&["s1", "s2", "s2"]),
            },
        ];
        let split = split(outputs, &[&a, &b]).unwrap();
        assert_eq!(split[0].len(), 1);
        assert_eq!(split[0][0].name, "s");
        assert_eq!(split[0][0].raw, join_bytes_elements(&["s1"]));
        assert_eq!(split[1][0].shape, vec![2, 2]);
        assert_eq!(split[1][0].raw, vec![2, 2, 2, 2]);
        assert_eq!(split[1][1].raw, join_bytes_elements(&["s2", "s2"]));
    }

    #[test]
    fn outputs_that_lose_the_batch_are_an_error() {
        let a = request(1, 1, vec![0]);
        let b = request(1, 2, vec![0]);
        let outputs =
            vec![OutputTensor { name: "sum".into(), datatype: DataType::Uint8, shape: vec![1], raw: vec![3] }];
        assert!(split(outputs, &[&a, &b]).unwrap_err().to_string().contains("does not keep the batch of 2 rows"));
    }
}

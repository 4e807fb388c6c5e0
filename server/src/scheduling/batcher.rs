//! Dynamic batching: requests whose inputs agree in everything but the number of rows are
//! concatenated along dimension 0 into one run, and the outputs are split back so that each
//! caller gets exactly its own rows. Inputs and outputs are row-major with the batch first,
//! so concatenation and splitting are plain byte ranges. [`BatchPolicy`] decides how long a
//! worker holding a request waits for more.

use std::time::{Duration, Instant};

use mantissa_runtime::bytes_layout::{join_bytes_elements, split_bytes_elements};
use mantissa_runtime::{DataType, InferenceRequest, InputTensor, OutputTensor, TensorData};

use crate::error::ServeError;

/// Rows a request carries along dimension 0.
pub fn rows(request: &InferenceRequest) -> usize {
    request.inputs.first().and_then(|input| input.shape.first()).map_or(1, |&rows| rows as usize)
}

/// True when `b` can run in the same batch as `a`: same datatypes and the same shape after
/// dimension 0 for every input.
pub fn compatible(a: &InferenceRequest, b: &InferenceRequest) -> bool {
    a.inputs.len() == b.inputs.len()
        && a.inputs.iter().zip(&b.inputs).all(|(x, y)| {
            x.datatype == y.datatype && x.shape.len() == y.shape.len() && x.shape.get(1..) == y.shape.get(1..)
        })
}

/// Concatenates compatible requests into one that asks for every output.
pub fn merge(requests: &[&InferenceRequest], output_count: usize) -> InferenceRequest {
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
            InputTensor { datatype: first.datatype, shape, data }
        })
        .collect();
    InferenceRequest { id: "batch".to_owned(), inputs, outputs: (0..output_count).collect() }
}

/// Splits the outputs of a merged run back into per-request outputs (each in the order its
/// request asked for).
pub fn split(outputs: Vec<OutputTensor>, requests: &[&InferenceRequest]) -> Result<Vec<Vec<OutputTensor>>, ServeError> {
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
                let elements =
                    split_bytes_elements(&output.raw).map_err(|err| ServeError::Execution(err.to_string()))?;
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

/// When a worker holding requests stops collecting more: the variant's `max_batch_size`, its
/// `max_queue_delay` and its `preferred_batch_sizes`, as a plain value the worker consults.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPolicy {
    /// Rows one run may hold.
    pub max_rows: usize,
    /// How long to wait for more requests once one is in hand.
    pub max_queue_delay: Duration,
    /// Row counts worth running at once: reaching one ends the wait.
    pub preferred_batch_sizes: Vec<usize>,
}

/// How the worker should take the next request of a batch being collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextTake {
    /// Wait for one until this instant.
    WaitUntil(Instant),
    /// Take only what is already queued.
    Queued,
    /// The batch is complete.
    Stop,
}

/// One batch being collected under a [`BatchPolicy`].
#[derive(Debug)]
pub struct BatchCollector<'p> {
    policy: &'p BatchPolicy,
    rows: usize,
    deadline: Instant,
    waiting: bool,
}

impl BatchPolicy {
    /// Starts a batch with the first request's `rows`, at `now`.
    pub fn collect(&self, rows: usize, now: Instant) -> BatchCollector<'_> {
        // Wait up to max_queue_delay for more, unless the first request alone is a preferred
        // size; after reaching one, only take what is already queued.
        let waiting = !self.max_queue_delay.is_zero() && !self.preferred_batch_sizes.contains(&rows);
        BatchCollector { policy: self, rows, deadline: now + self.max_queue_delay, waiting }
    }
}

impl BatchCollector<'_> {
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// What to do next: the batch is full at `max_rows` or at the largest preferred size.
    pub fn next_take(&self) -> NextTake {
        let largest_preferred = self.policy.preferred_batch_sizes.iter().copied().max();
        if self.rows >= self.policy.max_rows || Some(self.rows) == largest_preferred {
            NextTake::Stop
        } else if self.waiting {
            NextTake::WaitUntil(self.deadline)
        } else {
            NextTake::Queued
        }
    }

    /// Whether a request of `rows` more still fits.
    pub fn fits(&self, rows: usize) -> bool {
        self.rows + rows <= self.policy.max_rows
    }

    /// Adds a request of `rows`; reaching a preferred size ends the wait.
    pub fn add(&mut self, rows: usize) {
        self.rows += rows;
        if self.policy.preferred_batch_sizes.contains(&self.rows) {
            self.waiting = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(rows: i64, value: u8, outputs: Vec<usize>) -> InferenceRequest {
        InferenceRequest {
            id: format!("r{value}"),
            inputs: vec![
                InputTensor {
                    datatype: DataType::Uint8,
                    shape: vec![rows, 2],
                    data: TensorData::Raw(vec![value; rows as usize * 2]),
                },
                InputTensor {
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

    fn policy(delay_ms: u64, preferred: &[usize]) -> BatchPolicy {
        BatchPolicy {
            max_rows: 16,
            max_queue_delay: Duration::from_millis(delay_ms),
            preferred_batch_sizes: preferred.to_vec(),
        }
    }

    #[test]
    fn without_a_delay_only_queued_requests_join() {
        let policy = policy(0, &[]);
        let now = Instant::now();
        let mut batch = policy.collect(1, now);
        assert_eq!(batch.next_take(), NextTake::Queued);
        batch.add(15);
        assert_eq!(batch.rows(), 16);
        assert_eq!(batch.next_take(), NextTake::Stop);
        assert!(!policy.collect(10, now).fits(7));
    }

    #[test]
    fn a_delay_waits_until_a_preferred_size_then_takes_only_what_is_queued() {
        let policy = policy(5, &[4, 8]);
        let now = Instant::now();
        let mut batch = policy.collect(1, now);
        assert_eq!(batch.next_take(), NextTake::WaitUntil(now + Duration::from_millis(5)));
        batch.add(3);
        assert_eq!(batch.next_take(), NextTake::Queued, "4 rows is preferred: no more waiting");
        batch.add(4);
        assert_eq!(batch.next_take(), NextTake::Stop, "8 is the largest preferred size");
        // A first request that is already a preferred size does not wait.
        assert_eq!(policy.collect(4, now).next_take(), NextTake::Queued);
    }
}

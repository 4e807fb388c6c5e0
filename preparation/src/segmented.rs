//! Observing many tensors of a model on a sample in one pass over its graph, through
//! consecutive segments (see [`mantissa_quantize::split`]).
//!
//! ONNX Runtime keeps every declared output of a run alive until the run ends, so a session
//! that declares all of a detector's activations as outputs holds gigabytes. Declaring a
//! memory-budget's worth per session and re-running the whole model for each group costs one
//! pass over the samples per group. Here each group becomes a segment of the graph instead:
//! the segment's session declares its group's tensors and the tensors later segments read, and
//! the sample flows from one segment to the next. A sample costs about one inference however
//! many groups there are, and a run holds only its own segment's outputs.
//!
//! Segments are cut while the first sample runs: each is sized from the largest tensor seen
//! so far, as the grouped observation sized its groups, and then reused for every sample.

use std::collections::{HashMap, HashSet};

use mantissa_quantize::onnx::ModelProto;
use mantissa_quantize::split::Splitter;
use mantissa_runtime::{
    Environment, HeldTensor, InferenceRequest, ModelSignature, Session, SessionConfig, TensorData, execute_link,
    open_internal_session_with,
};

use crate::error::PrepareError;

/// One segment's session, and the position in the graph's order where the next one starts.
struct OpenSegment {
    session: Session,
    signature: ModelSignature,
    end: usize,
}

/// Runs samples through the segments of one model, handing every wanted tensor to a visitor.
pub(crate) struct SegmentedObserver<'m> {
    environment: &'m Environment,
    splitter: Splitter<'m>,
    /// Wanted tensors that are graph inputs: read from the sample itself.
    wanted_inputs: Vec<String>,
    /// Wanted tensors that nodes produce, in the order their producers run.
    produced: Vec<String>,
    wanted: HashSet<String>,
    /// For each value, the last position (in the graph's order) of a node reading it.
    last_read: HashMap<String, usize>,
    segments: Vec<OpenSegment>,
    /// Bytes the declared outputs of one segment may hold together.
    budget: usize,
    /// The largest output seen so far, which sizes the next segment.
    largest: usize,
}

impl<'m> SegmentedObserver<'m> {
    /// `inputs`: the model's graph inputs (the sample's tensors).
    pub(crate) fn new(
        environment: &'m Environment,
        model: &'m ModelProto,
        wanted: &[String],
        inputs: &[String],
        budget: usize,
    ) -> Result<Self, PrepareError> {
        let (wanted_inputs, mut produced): (Vec<String>, Vec<String>) =
            wanted.iter().cloned().partition(|tensor| inputs.contains(tensor));
        let splitter = Splitter::new(model, &produced).map_err(|err| PrepareError::Observation(err.to_string()))?;
        produced.sort_by_key(|tensor| splitter.position(tensor));
        let last_read = splitter.last_reads();
        Ok(Self {
            environment,
            splitter,
            wanted_inputs,
            produced,
            wanted: wanted.iter().cloned().collect(),
            last_read,
            segments: Vec::new(),
            budget,
            largest: 0,
        })
    }

    /// How many segments the model has been cut into so far.
    pub(crate) fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Cuts and opens the segment starting at `start`, or returns `None` when no wanted tensor
    /// is produced from there on.
    fn open_next(&mut self, start: usize) -> Result<Option<()>, PrepareError> {
        let remaining: Vec<String> = self
            .produced
            .iter()
            .filter(|tensor| self.splitter.position(tensor).is_some_and(|at| at >= start))
            .cloned()
            .collect();
        if remaining.is_empty() {
            return Ok(None);
        }
        // The first segment holds one tensor: nothing has been measured yet.
        let take = self.budget.checked_div(self.largest).map_or(1, |n| n.max(1));
        let (segment, end) = self
            .splitter
            .segment(start, &remaining[..take.min(remaining.len())])
            .map_err(|err| PrepareError::Observation(err.to_string()))?;
        let (session, signature) =
            open_internal_session_with(self.environment, &segment.model, SessionConfig::INTERNAL_SHARED_ARENA)?;
        self.segments.push(OpenSegment { session, signature, end });
        Ok(Some(()))
    }

    /// Runs one sample (its inputs in `input_signature`'s order) through every segment, cutting
    /// new segments as the first sample reaches them, and hands each wanted tensor's
    /// little-endian bytes to `visit`.
    pub(crate) fn observe(
        &mut self,
        input_signature: &ModelSignature,
        sample: InferenceRequest,
        visit: &mut impl FnMut(&str, &[u8]),
    ) -> Result<(), PrepareError> {
        for (spec, tensor) in input_signature.inputs.iter().zip(&sample.inputs) {
            if let (true, TensorData::Raw(bytes)) = (self.wanted_inputs.contains(&spec.name), &tensor.data) {
                visit(&spec.name, bytes);
            }
        }
        let fail = |source| PrepareError::Sample { path: sample.id.clone(), source };
        let mut live: HashMap<String, HeldTensor> = input_signature
            .inputs
            .iter()
            .zip(&sample.inputs)
            .map(|(spec, tensor)| Ok((spec.name.clone(), HeldTensor::from_input(tensor).map_err(fail)?)))
            .collect::<Result<_, PrepareError>>()?;
        let mut start = 0;
        for index in 0.. {
            if index == self.segments.len() && self.open_next(start)?.is_none() {
                break;
            }
            let segment = &mut self.segments[index];
            let end = segment.end;
            let mut largest = self.largest;
            let read_later = |name: &str| self.last_read.get(name).is_some_and(|&at| at >= end);
            let handed_on = execute_link(
                &mut segment.session,
                &segment.signature,
                |name| live.get(name),
                |spec, bytes| {
                    largest = largest.max(bytes.len());
                    if self.wanted.contains(&spec.name) {
                        visit(&spec.name, bytes);
                    }
                },
                read_later,
            )
            .map_err(fail)?;
            self.largest = largest;
            live.retain(|name, _| read_later(name));
            live.extend(handed_on);
            start = end;
        }
        Ok(())
    }
}

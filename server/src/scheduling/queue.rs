//! The bounded queue in front of a variant's workers: what a waiting request carries (its
//! reply channel, deadline and arrival time) and how submitting fails when the queue is full
//! or closed.

use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mantissa_runtime::{InferenceRequest, OutputTensor};
use tokio::sync::oneshot;

use crate::error::ServeError;

/// The outcome of one job.
pub type JobResult = Result<Vec<OutputTensor>, ServeError>;

/// A queued request.
pub(crate) struct Job {
    pub request: InferenceRequest,
    pub reply: oneshot::Sender<JobResult>,
    /// Past this instant the caller no longer wants an answer: the job is dropped unrun.
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
    /// Submitted by the server itself (self-test, drift, shadow): served like any job but kept
    /// out of the statistics and metrics, which describe client traffic.
    pub internal: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum SubmitError {
    Full { capacity: usize },
    Closed,
}

/// The sending side of a variant's queue; the workers hold the receiving side.
#[derive(Debug)]
pub(crate) struct JobQueue {
    sender: Sender<Job>,
    capacity: usize,
}

impl JobQueue {
    /// A queue holding at most `capacity` waiting jobs, and the receiver the workers share.
    pub fn bounded(capacity: usize) -> (Self, Receiver<Job>) {
        let (sender, receiver) = crossbeam_channel::bounded(capacity);
        (Self { sender, capacity }, receiver)
    }

    pub fn depth(&self) -> usize {
        self.sender.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Enqueues without waiting; a full queue is reported at once.
    pub fn enqueue(
        &self,
        request: InferenceRequest,
        deadline: Option<Instant>,
        internal: bool,
    ) -> Result<oneshot::Receiver<JobResult>, SubmitError> {
        if super::drain::stopping() {
            return Err(SubmitError::Closed);
        }
        let (reply, receiver) = oneshot::channel();
        match self.sender.try_send(Job { request, reply, deadline, enqueued: Instant::now(), internal }) {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full { capacity: self.capacity }),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Closed),
        }
    }
}

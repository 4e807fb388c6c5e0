//! Per-variant inference statistics in Triton's ModelStatistics format: success and failure
//! counts with cumulative durations, queue and compute phases (input preparation, inference,
//! output extraction), and per-batch-size execution figures. Kept beside the Prometheus
//! metrics because tools such as perf_analyzer and tritonclient read this RPC.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mantissa_proto::inference::{InferBatchStatistics, InferStatistics, ModelStatistics, StatisticDuration};
use mantissa_runtime::RunTimings;

#[derive(Debug, Default, Clone, Copy)]
struct Sum {
    count: u64,
    ns: u64,
}

impl Sum {
    fn add(&mut self, duration: Duration) {
        self.add_times(1, duration);
    }

    fn add_times(&mut self, count: u64, duration: Duration) {
        self.count += count;
        self.ns += count * duration.as_nanos() as u64;
    }

    fn proto(self) -> Option<StatisticDuration> {
        Some(StatisticDuration { count: self.count, ns: self.ns })
    }
}

#[derive(Debug, Default)]
struct Totals {
    success: Sum,
    fail: Sum,
    queue: Sum,
    compute_input: Sum,
    compute_infer: Sum,
    compute_output: Sum,
    inference_count: u64,
    execution_count: u64,
    last_inference_ms: u64,
    batches: BTreeMap<u64, [Sum; 3]>,
}

/// Statistics of one variant, shared by its handler and its workers.
#[derive(Debug, Default)]
pub struct VariantStatistics {
    totals: Mutex<Totals>,
}

impl VariantStatistics {
    fn with<T>(&self, update: impl FnOnce(&mut Totals) -> T) -> T {
        update(&mut self.totals.lock().unwrap_or_else(|poison| poison.into_inner()))
    }

    /// A request answered (successfully or not) after `elapsed` end to end.
    pub fn record_request(&self, success: bool, elapsed: Duration) {
        self.with(|t| if success { t.success.add(elapsed) } else { t.fail.add(elapsed) });
    }

    /// One run serving `requests` requests with `rows` rows in total; each request is charged
    /// its own queue time and the run's compute phases, as Triton does.
    pub fn record_run(&self, queued: &[Duration], rows: u64, timings: RunTimings) {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.with(|t| {
            let requests = queued.len() as u64;
            for waited in queued {
                t.queue.add(*waited);
            }
            t.compute_input.add_times(requests, timings.input);
            t.compute_infer.add_times(requests, timings.infer);
            t.compute_output.add_times(requests, timings.output);
            t.inference_count += rows;
            t.execution_count += 1;
            t.last_inference_ms = now_ms;
            let batch = t.batches.entry(rows).or_default();
            batch[0].add(timings.input);
            batch[1].add(timings.infer);
            batch[2].add(timings.output);
        });
    }

    pub fn proto(&self, model: &str, version: &str) -> ModelStatistics {
        self.with(|t| ModelStatistics {
            name: model.to_owned(),
            version: version.to_owned(),
            last_inference: t.last_inference_ms,
            inference_count: t.inference_count,
            execution_count: t.execution_count,
            inference_stats: Some(InferStatistics {
                success: t.success.proto(),
                fail: t.fail.proto(),
                queue: t.queue.proto(),
                compute_input: t.compute_input.proto(),
                compute_infer: t.compute_infer.proto(),
                compute_output: t.compute_output.proto(),
                cache_hit: Sum::default().proto(),
                cache_miss: Sum::default().proto(),
            }),
            batch_stats: t
                .batches
                .iter()
                .map(|(&batch_size, [input, infer, output])| InferBatchStatistics {
                    batch_size,
                    compute_input: input.proto(),
                    compute_infer: infer.proto(),
                    compute_output: output.proto(),
                })
                .collect(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_requests_accumulate_in_triton_form() {
        let stats = VariantStatistics::default();
        let ms = Duration::from_millis;
        stats.record_run(&[ms(1), ms(3)], 5, RunTimings { input: ms(1), infer: ms(10), output: ms(2) });
        stats.record_request(true, ms(20));
        stats.record_request(true, ms(22));
        stats.record_request(false, ms(1));
        let proto = stats.proto("m", "fp32");
        let inference = proto.inference_stats.unwrap();
        assert_eq!((proto.inference_count, proto.execution_count), (5, 1));
        assert_eq!(inference.success, Some(StatisticDuration { count: 2, ns: 42_000_000 }));
        assert_eq!(inference.fail, Some(StatisticDuration { count: 1, ns: 1_000_000 }));
        assert_eq!(inference.queue, Some(StatisticDuration { count: 2, ns: 4_000_000 }));
        assert_eq!(inference.compute_infer, Some(StatisticDuration { count: 2, ns: 20_000_000 }));
        assert_eq!(proto.batch_stats.len(), 1);
        assert_eq!(proto.batch_stats[0].batch_size, 5);
        assert_eq!(proto.batch_stats[0].compute_infer, Some(StatisticDuration { count: 1, ns: 10_000_000 }));
        assert!(proto.last_inference > 0);
    }
}

//! Dynamic batching through the real binary: concurrent clients with distinct inputs each get
//! exactly their own rows back, and the server really merged requests.

mod common;

use std::sync::Arc;

use common::{TestServer, example_store, f32_bytes, f32_values, scrape};
use mantissa_proto::inference::model_infer_request::InferInputTensor;
use mantissa_proto::inference::*;
use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;

/// A store holding digits_cnn with one worker that waits up to 20 ms to fill a batch.
fn batching_store() -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let model = store.path().join("digits_cnn");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(example_store().join("digits_cnn/model.onnx"), model.join("model.onnx")).unwrap();
    std::fs::write(
        model.join("policy.yaml"),
        "serving:\n  max_batch_size: 64\n  instances: 1\n  intra_op_threads: 1\n  max_queue_delay: 20ms\nvariants:\n  fp32:\n    precision: fp32\n",
    )
    .unwrap();
    store
}

/// Sum of the samples of `name` whose labels include every fragment in `labels` (0 when none).
fn metric_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| line.split(['{', ' ']).next() == Some(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    // Absent before any client traffic: the server's own start-up runs are not counted.
    values.iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_each_get_their_own_rows_from_merged_runs() {
    let store = batching_store();
    let server = TestServer::start(store.path());
    let client = server.wait_ready().await;

    let config = client
        .clone()
        .model_config(ModelConfigRequest { name: "digits_cnn".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    match config.scheduling_choice {
        Some(model_config::SchedulingChoice::DynamicBatching(batching)) => {
            assert_eq!(batching.max_queue_delay_microseconds, 20_000)
        }
        other => panic!("expected dynamic_batching in ModelConfig, got {other:?}"),
    }

    let mut npz =
        NpzReader::new(std::fs::File::open(example_store().join("digits_cnn/test_data.npz")).unwrap()).unwrap();
    let input: ArrayD<f32> = npz.by_name::<OwnedRepr<f32>, IxDyn>("input").unwrap();
    let reference: ArrayD<f32> = npz.by_name::<OwnedRepr<f32>, IxDyn>("logits").unwrap();
    let input: Arc<Vec<f32>> = Arc::new(input.iter().copied().collect());
    let reference: Arc<Vec<f32>> = Arc::new(reference.iter().copied().collect());

    // Counted from here: start-up (the batch-invariance self-test) ran some already.
    let before = scrape(&server.metrics_addr);
    let (runs_before, single_before, requests_before) = (
        metric_value(&before, "mantissa_batch_size_count", &[]),
        metric_value(&before, "mantissa_batch_size_bucket", &["le=\"1\""]),
        metric_value(&before, "mantissa_batch_size_sum", &[]),
    );

    // 32 clients, each sending 3 requests of 1 to 3 distinct rows.
    let mut tasks = Vec::new();
    for client_index in 0..32usize {
        let mut client = client.clone();
        let (input, reference) = (Arc::clone(&input), Arc::clone(&reference));
        tasks.push(tokio::spawn(async move {
            for round in 0..3usize {
                let rows = 1 + (client_index + round) % 3;
                let start = (client_index * 9 + round * 3) % 440;
                let request = ModelInferRequest {
                    model_name: "digits_cnn".into(),
                    id: format!("{client_index}-{round}"),
                    inputs: vec![InferInputTensor {
                        name: "input".into(),
                        datatype: "FP32".into(),
                        shape: vec![rows as i64, 1, 8, 8],
                        ..Default::default()
                    }],
                    raw_input_contents: vec![f32_bytes(&input[start * 64..(start + rows) * 64])],
                    ..Default::default()
                };
                let response = client.model_infer(request).await.unwrap().into_inner();
                assert_eq!(response.id, format!("{client_index}-{round}"));
                assert_eq!(response.outputs[0].shape, vec![rows as i64, 10]);
                let logits = f32_values(&response.raw_output_contents[0]);
                let want = &reference[start * 10..(start + rows) * 10];
                let max_abs = logits.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                assert!(max_abs <= 1e-5, "client {client_index} round {round}: max abs diff {max_abs}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // A worker records a run's batch size after it has answered the run's requests, so the
    // last run can reach the metrics a moment after its clients have their responses.
    let mut metrics = scrape(&server.metrics_addr);
    for _ in 0..50 {
        if metric_value(&metrics, "mantissa_batch_size_sum", &[]) - requests_before >= 96.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        metrics = scrape(&server.metrics_addr);
    }
    let runs = metric_value(&metrics, "mantissa_batch_size_count", &[]) - runs_before;
    let single = metric_value(&metrics, "mantissa_batch_size_bucket", &["le=\"1\""]) - single_before;
    let merged_requests = metric_value(&metrics, "mantissa_batch_size_sum", &[]) - requests_before;
    eprintln!("{merged_requests} requests in {runs} runs ({single} of them alone)");
    assert!(single < runs, "no run merged more than one request");
    assert_eq!(merged_requests, 96.0, "every request was counted once");
}

//! Policies at startup, through the real binary: A/B split routing, sticky keys across
//! restarts, queue limits, deadlines, cancellation, the artifact cache and failing variants.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{TestServer, example_store, f32_bytes, fixture_store, scrape, served_variant, store_with};
use mantissa_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use mantissa_proto::inference::model_infer_request::InferInputTensor;
use mantissa_proto::inference::*;
use tonic::Code;

fn digits_request(key: Option<&str>) -> ModelInferRequest {
    let mut parameters = HashMap::new();
    if let Some(key) = key {
        parameters.insert(
            "user".to_owned(),
            InferParameter { parameter_choice: Some(infer_parameter::ParameterChoice::StringParam(key.to_owned())) },
        );
    }
    ModelInferRequest {
        model_name: "digits_cnn".into(),
        parameters,
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1, 8, 8],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&[0.5; 64])],
        ..Default::default()
    }
}

const SPLIT_POLICY: &str = "variants:\n  fp32:\n    precision: fp32\n  int8:\n    precision: int8\n    int8:\n      mode: static\n      calibration_data: calibration\n  fp16:\n    precision: fp16\nrouting:\n  default: fp32\n  split:\n    int8: 90\n    fp16: 10\n  key: user\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_routing_follows_the_weights_and_keys_stick_across_restarts() {
    let store = store_with("digits_cnn", &example_store(), SPLIT_POLICY);
    copy_calibration(store.path(), "digits_cnn");
    let mut server = TestServer::start(store.path());
    let client = server.wait_ready().await;

    // 2,000 requests with random keys: int8 must get 90% within a 99.9% binomial interval
    // (n p = 1800, sd = 13.4, z = 3.29: 1756..=1844).
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut counts: HashMap<String, u32> = HashMap::new();
            for i in 0..250u64 {
                let key = format!("user-{worker}-{i}-{}", rand_key(worker * 1000 + i));
                let response = client.model_infer(digits_request(Some(&key))).await.unwrap().into_inner();
                *counts.entry(served_variant(&response)).or_default() += 1;
            }
            counts
        }));
    }
    let mut counts: HashMap<String, u32> = HashMap::new();
    for task in tasks {
        for (variant, count) in task.await.unwrap() {
            *counts.entry(variant).or_default() += count;
        }
    }
    eprintln!("split over 2000 keyed requests: {counts:?}");
    let int8 = counts.get("int8").copied().unwrap_or(0);
    assert_eq!(int8 + counts.get("fp16").copied().unwrap_or(0), 2000, "{counts:?}");
    assert!((1756..=1844).contains(&int8), "int8 got {int8} of 2000: {counts:?}");

    // A fixed key always lands on the same variant, also after a restart.
    let mut client = client.clone();
    let mut pinned = None;
    for _ in 0..20 {
        let version =
            served_variant(&client.model_infer(digits_request(Some("customer-42"))).await.unwrap().into_inner());
        assert_eq!(pinned.get_or_insert(version.clone()), &version);
    }
    // An explicit version wins over the split.
    let mut explicit = digits_request(Some("customer-42"));
    explicit.model_version = "fp32".into();
    assert_eq!(served_variant(&client.model_infer(explicit.clone()).await.unwrap().into_inner()), "fp32");
    // ... whether it names the variant or gives its number (fp32 is the first listed: 1).
    explicit.model_version = "1".into();
    let response = client.model_infer(explicit).await.unwrap().into_inner();
    assert_eq!((response.model_version.as_str(), served_variant(&response).as_str()), ("1", "fp32"));
    server.terminate();
    assert_eq!(server.wait_exit(Duration::from_secs(30)).code(), Some(0));

    let restarted = TestServer::start(store.path());
    let mut client = restarted.wait_ready().await;
    let after = served_variant(&client.model_infer(digits_request(Some("customer-42"))).await.unwrap().into_inner());
    assert_eq!(Some(after), pinned, "the key moved to another variant after a restart");
}

/// Copies the example model's calibration samples next to the copied model.
fn copy_calibration(store: &Path, model: &str) {
    let target = store.join(model).join("calibration");
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(example_store().join(model).join("calibration")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
}

/// A cheap deterministic string per index, so keys differ without a random-number crate.
fn rand_key(seed: u64) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17) ^ 0xdead_beef
}

fn slow_request(rows: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "slow_matmul".into(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 256],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&vec![0.01; rows * 256])],
        ..Default::default()
    }
}

fn dropped(metrics: &str, reason: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("mantissa_requests_dropped_total") && line.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends `blocker` (long), then `probe` while the blocker runs, and returns the probe's error.
/// Retries up to five times when the probe got through, which happens when a loaded machine
/// delays the blocker past the probe.
async fn probe_behind_blocker(
    client: &GrpcInferenceServiceClient<tonic::transport::Channel>,
    blocker: ModelInferRequest,
    probe: impl Fn() -> tonic::Request<ModelInferRequest>,
) -> tonic::Status {
    for _ in 0..5 {
        let mut slow_client = client.clone();
        let request = blocker.clone();
        let slow = tokio::spawn(async move { slow_client.model_infer(request).await });
        // Long enough for the blocker to reach the worker, short against its run (on a fast
        // CPU the 1024-row blocker takes about 0.1 s, and the probe's deadline is 60 ms).
        tokio::time::sleep(Duration::from_millis(25)).await;
        let result = client.clone().model_infer(probe()).await;
        let _ = slow.await.unwrap();
        if let Err(status) = result {
            return status;
        }
    }
    panic!("the probe never queued behind the blocker in five attempts");
}

const SLOW_POLICY: &str = "serving:\n  max_batch_size: 1024\n  instances: 1\n  intra_op_threads: 1\n  dynamic_batching: false\n  max_queue_size: 2\nvariants:\n  fp32:\n    precision: fp32\n  strict:\n    precision: fp32\n    serving:\n      default_timeout: 60ms\nrouting:\n  default: fp32\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_deadlines_and_cancelled_clients_are_handled_and_the_server_keeps_serving() {
    let store = store_with("slow_matmul", &fixture_store(), SLOW_POLICY);
    let server = TestServer::start(store.path());
    let client = server.wait_ready().await;

    // Queue full: one running, two queued, the rest refused at once.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move { client.model_infer(slow_request(256)).await }));
    }
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("queue is full (2 requests waiting)"), "{}", status.message());
                refused += 1;
            }
        }
    }
    assert!(refused >= 1, "no request was refused with a queue of 2");
    client.clone().model_infer(slow_request(1)).await.unwrap();

    // Deadline (the policy's default_timeout): a request that expires while queued behind a
    // slow one is answered DEADLINE_EXCEEDED by the server and never run.
    let strict = |rows| {
        let mut request = slow_request(rows);
        request.model_version = "strict".into();
        request
    };
    // The blocker (1024 rows, about 0.25 s of work) is sent first and given time to start; on a
    // loaded machine the probe can still slip in first, so each case gets a few attempts.
    let status = probe_behind_blocker(&client, strict(1024), || tonic::Request::new(strict(1))).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline exceeded"), "{}", status.message());

    // Deadline (the client's grpc-timeout): the client gives up, and the server does not run
    // the request once its deadline has passed.
    let status = probe_behind_blocker(&client, slow_request(1024), || {
        let mut hurried = tonic::Request::new(slow_request(1));
        hurried.set_timeout(Duration::from_millis(50));
        hurried
    })
    .await;
    // tonic's client enforces the timeout itself (CANCELLED "Timeout expired"); the server's
    // own answer (DEADLINE_EXCEEDED) may arrive first.
    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");

    // Cancellation: a queued request whose client goes away is dropped before execution.
    for attempt in 1..=5 {
        let mut slow_client = client.clone();
        let slow = tokio::spawn(async move { slow_client.model_infer(slow_request(1024)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut abandoning = client.clone();
        let abandoned = tokio::spawn(async move { abandoning.model_infer(slow_request(1)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        abandoned.abort();
        slow.await.unwrap().unwrap();
        client.clone().model_infer(slow_request(1)).await.unwrap();
        if dropped(&scrape(&server.metrics_addr), "cancelled") >= 1.0 || attempt == 5 {
            break;
        }
    }

    let metrics = scrape(&server.metrics_addr);
    assert!(dropped(&metrics, "deadline") >= 2.0, "{metrics}");
    assert!(dropped(&metrics, "cancelled") >= 1.0, "{metrics}");
}

const CACHED_POLICY: &str = "variants:\n  fp32:\n    precision: fp32\n  fp16:\n    precision: fp16\n  int8:\n    precision: int8\n    int8:\n      mode: static\n      calibration_data: calibration\nrouting:\n  default: fp32\n";

async fn variant_parameter(server: &TestServer, version: &str, key: &str) -> String {
    let mut client = server.wait_ready().await;
    let config = client
        .model_config(ModelConfigRequest { name: "digits_transformer".into(), version: version.into() })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    config.parameters[key].string_value.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_cache_skips_building_and_a_corrupt_artifact_is_rebuilt() {
    let store = store_with("digits_transformer", &example_store(), CACHED_POLICY);
    let calibration = store.path().join("digits_transformer/calibration");
    std::fs::create_dir(&calibration).unwrap();
    for entry in std::fs::read_dir(example_store().join("digits_transformer/calibration")).unwrap().take(4) {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), calibration.join(entry.file_name())).unwrap();
    }
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();

    let mut cold = TestServer::start_with(store.path(), &["--cache-dir", cache_arg], &[]);
    assert_eq!(variant_parameter(&cold, "int8", "cache").await, "miss");
    assert_eq!(variant_parameter(&cold, "fp16", "cache").await, "miss");
    cold.terminate();
    cold.wait_exit(Duration::from_secs(30));

    let mut warm = TestServer::start_with(store.path(), &["--cache-dir", cache_arg], &[]);
    assert_eq!(variant_parameter(&warm, "int8", "cache").await, "hit");
    assert_eq!(variant_parameter(&warm, "fp16", "cache").await, "hit");
    assert!(!warm.logs().contains("int8 calibration"), "a warm start calibrated again:\n{}", warm.logs());
    warm.terminate();
    warm.wait_exit(Duration::from_secs(30));

    // Truncate every cached artifact: the next start warns, rebuilds and serves.
    for entry in std::fs::read_dir(cache.path().join("digits_transformer")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "onnx") {
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        }
    }
    let rebuilt = TestServer::start_with(store.path(), &["--cache-dir", cache_arg], &[]);
    assert_eq!(variant_parameter(&rebuilt, "int8", "cache").await, "miss");
    assert!(rebuilt.logs().contains("corrupt or truncated"), "{}", rebuilt.logs());
    let mut client = rebuilt.wait_ready().await;
    let request = ModelInferRequest {
        model_name: "digits_transformer".into(),
        model_version: "int8".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 8, 8],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&[0.5; 64])],
        ..Default::default()
    };
    assert_eq!(served_variant(&client.model_infer(request).await.unwrap().into_inner()), "int8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variant_that_fails_to_build_is_not_ready_and_the_others_serve() {
    let policy = "variants:\n  fp32:\n    precision: fp32\n  int8:\n    precision: int8\n    int8:\n      mode: static\n      calibration_data: calibration\nrouting:\n  default: fp32\n";
    let store = store_with("digits_cnn", &example_store(), policy);
    let calibration = store.path().join("digits_cnn/calibration");
    std::fs::create_dir(&calibration).unwrap();
    // Samples of the wrong shape: calibration fails, so the int8 variant cannot be built.
    let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(calibration.join("bad.npz")).unwrap());
    writer.add_array("input", &ndarray::Array2::<f32>::zeros((8, 64))).unwrap();
    writer.finish().unwrap();

    let server = TestServer::start(store.path());
    let mut client = server.wait_ready().await;
    let ready = |version: &str| ModelReadyRequest { name: "digits_cnn".into(), version: version.into() };
    assert!(client.model_ready(ready("fp32")).await.unwrap().into_inner().ready);
    assert!(!client.model_ready(ready("int8")).await.unwrap().into_inner().ready);
    let index = client.repository_index(RepositoryIndexRequest::default()).await.unwrap().into_inner();
    // int8 is the second variant the policy lists: version 2.
    let int8 = index.models.iter().find(|m| m.version == "2").unwrap();
    assert_eq!(int8.state, "UNAVAILABLE");
    assert!(int8.reason.contains("bad.npz") && int8.reason.contains("expected shape"), "{}", int8.reason);

    let mut request = digits_request(None);
    request.model_version = "int8".into();
    let status = client.model_infer(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("failed to load"), "{}", status.message());
    assert_eq!(served_variant(&client.model_infer(digits_request(None)).await.unwrap().into_inner()), "fp32");
}

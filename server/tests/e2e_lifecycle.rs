//! Startup and shutdown of the real binary: configuration errors, a missing ONNX Runtime,
//! environment-variable configuration, and SIGTERM while requests are in flight.

mod common;

use std::time::Duration;

use common::{
    TestServer, example_store, f32_bytes, fixture_store, mantissa_command, run_to_exit, scrape, variable_store,
};
use mantissa_proto::inference::ModelInferRequest;
use mantissa_proto::inference::model_infer_request::InferInputTensor;

#[test]
fn missing_onnx_runtime_library_is_a_clear_startup_error() {
    let mut command = mantissa_command();
    command
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--model-store"])
        .arg(example_store())
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1");
    let (status, stderr) = run_to_exit(command, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ONNX Runtime library /nonexistent/libonnxruntime.so.1.31.1 does not exist"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_file_that_is_not_onnx_runtime_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"not a shared library").unwrap();
    let mut command = mantissa_command();
    command
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--model-store"])
        .arg(example_store())
        .env("ORT_DYLIB_PATH", &fake);
    let (status, stderr) = run_to_exit(command, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot load ONNX Runtime from"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn policy_errors_name_file_line_and_key() {
    let store = tempfile::tempdir().unwrap();
    let model = store.path().join("digits");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(example_store().join("digits_cnn/model.onnx"), model.join("model.onnx")).unwrap();
    std::fs::write(
        model.join("policy.yaml"),
        "serving:\n  instances: 1\nvariants:\n  fp32:\n    precision: fp32\n    max_batch: 4\n",
    )
    .unwrap();
    let mut command = mantissa_command();
    command
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--model-store"])
        .arg(store.path());
    let (status, stderr) = run_to_exit(command, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    let expected = format!("{}:6: key `variants.fp32", model.join("policy.yaml").display());
    assert!(stderr.contains(&expected), "expected {expected:?} in {stderr}");
    assert!(stderr.contains("unknown field `max_batch`"), "{stderr}");
}

#[test]
fn help_lists_every_serve_option_and_its_environment_variable() {
    let output = mantissa_command().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "--model-store",
        "MANTISSA_MODEL_STORE",
        "--grpc-addr",
        "MANTISSA_GRPC_ADDR",
        "0.0.0.0:8001",
        "--metrics-addr",
        "MANTISSA_METRICS_ADDR",
        "0.0.0.0:8002",
        "--log-format",
        "MANTISSA_LOG_FORMAT",
        "ORT_DYLIB_PATH",
        "MANTISSA_MAX_MESSAGE_BYTES",
    ] {
        assert!(help.contains(expected), "`mantissa serve --help` lacks {expected}:\n{help}");
    }
}

fn slow_request(rows: usize, id: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "slow_matmul".into(),
        id: id.to_string(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 256],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&vec![0.01 * id as f32; rows * 256])],
        ..Default::default()
    }
}

/// Requests of `model` the server has received: those in flight plus those answered.
fn requests_received(metrics: &str, model: &str) -> f64 {
    let label = format!("model=\"{model}\"");
    metrics
        .lines()
        .filter(|line| {
            (line.starts_with("mantissa_requests_in_flight{") || line.starts_with("mantissa_requests_total{"))
                && line.contains(&label)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_finishes_every_accepted_request_and_exits_zero() {
    // Configured through the environment, as a container would.
    let mut server = TestServer::start_with(&fixture_store(), &[], &[("MANTISSA_QUEUE_CAPACITY", "256")]);
    let client = server.wait_ready().await;

    let in_flight = 24;
    let mut tasks = Vec::new();
    for id in 0..in_flight {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let result = client.model_infer(slow_request(128, id)).await;
            (result, std::time::Instant::now())
        }));
    }
    // Wait until every request has reached the server (they queue behind one slow worker), then
    // stop it. A request the client had not sent yet would meet the GOAWAY and rightly be
    // refused, which says nothing about draining; so the test waits for the in-flight gauge
    // rather than for a fixed time that a loaded machine may not honour.
    let waiting_since = std::time::Instant::now();
    while requests_received(&scrape(&server.metrics_addr), "slow_matmul") < in_flight as f64 {
        assert!(waiting_since.elapsed() < Duration::from_secs(30), "requests never all reached the server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let terminated_at = std::time::Instant::now();
    server.terminate();

    let mut finished_after_sigterm = 0;
    for (id, task) in tasks.into_iter().enumerate() {
        let (result, finished_at) = task.await.unwrap();
        let response =
            result.unwrap_or_else(|status| panic!("request {id} lost during shutdown: {status:?}\n{}", server.logs()));
        let response = response.into_inner();
        assert_eq!(response.id, id.to_string());
        assert_eq!(response.raw_output_contents[0].len(), 128 * 256 * 4);
        finished_after_sigterm += usize::from(finished_at > terminated_at);
    }
    // The test only means something if work was still queued when the signal arrived.
    assert!(
        finished_after_sigterm >= in_flight / 2,
        "only {finished_after_sigterm} requests were still in flight at SIGTERM"
    );
    let status = server.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", server.logs());
    assert!(server.logs().contains("shutdown complete"), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_a_server_and_the_in_process_baseline_in_one_run() {
    let server = TestServer::start(&example_store());
    server.wait_ready().await;
    let output = mantissa_command()
        .args(["bench", "--url", &server.url(), "--model", "digits_cnn", "--batch-size", "4", "--concurrency", "1,2"])
        .args(["--requests", "40", "--warmup", "100ms", "--duration", "500ms", "--json"])
        .arg("--input-data")
        .arg(example_store().join("digits_cnn/test_data.npz"))
        .arg("--in-process-store")
        .arg(example_store())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for level in levels {
        assert_eq!(level["requests"], 40, "{level}");
        assert_eq!(level["errors"].as_object().unwrap().len(), 0, "{level}");
        assert!(level["latency_ms_p50"].as_f64().unwrap() > 0.0);
        assert!(level["latency_ms_p99"].as_f64().unwrap() >= level["latency_ms_p50"].as_f64().unwrap());
        // The server-side breakdown comes from the ModelStatistics RPC.
        assert_eq!(level["server"]["requests"], 40, "{level}");
        assert!(level["server"]["compute_infer_us"].as_f64().unwrap() > 0.0, "{level}");
        assert!(level["server"]["rows_per_run"].as_f64().unwrap() >= 4.0, "{level}");
    }
    assert!(report["in_process"]["inferences_per_second"].as_f64().unwrap() > 0.0);
    assert!(report["server_to_in_process_ratio"].as_f64().unwrap() > 0.0);

    // Errors are counted by status code rather than aborting the run.
    let output = mantissa_command()
        .args(["bench", "--url", &server.url(), "--model", "digits_cnn", "--model-version", "fp32"])
        .args(["--batch-size", "65", "--requests", "5", "--warmup", "0ms", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["levels"][0]["errors"]["InvalidArgument"], 5, "{report}");
}

/// `mantissa bench` on a model whose metadata shape is [-1, -1] (the length must be a multiple
/// of 8): the shape comes from --shape or from the input file, and without either the command
/// says what is missing instead of sending requests the model cannot run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_takes_shapes_the_metadata_leaves_open_from_flags_or_the_input_file() {
    let server = TestServer::start(&variable_store());
    let mut client = server.wait_ready().await;
    let metadata =
        mantissa_proto::inference::ModelMetadataRequest { name: "group_sums".into(), version: String::new() };
    assert_eq!(client.model_metadata(metadata).await.unwrap().into_inner().inputs[0].shape, [-1, -1]);
    let bench = |extra: &[&str]| {
        let output = mantissa_command()
            .args(["bench", "--url", &server.url(), "--model", "group_sums", "--requests", "12", "--warmup", "0ms"])
            .args(["--json"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned(), stderr)
    };
    let (ok, _, stderr) = bench(&["--batch-size", "4"]);
    assert!(!ok);
    assert!(stderr.contains("input 'x' of 'group_sums' has variable dimensions [-1, -1]"), "{stderr}");
    assert!(stderr.contains("--shape x=D0,D1,..."), "{stderr}");

    let (ok, stdout, stderr) = bench(&["--batch-size", "4", "--shape", "x=4,32"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["levels"][0]["requests"], 12, "{report}");
    assert_eq!(report["levels"][0]["errors"].as_object().unwrap().len(), 0, "{report}");
    assert_eq!(report["levels"][0]["server"]["requests"], 12, "{report}");

    // A length the model cannot group fails on the server, and is counted as such.
    let (ok, stdout, stderr) = bench(&["--batch-size", "4", "--shape", "x=4,30"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["levels"][0]["errors"]["Internal"], 12, "{report}");

    // Rows of an .npz file bring their own length.
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("rows.npz");
    let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(&path).unwrap());
    writer.add_array("x", &ndarray::Array2::<f32>::ones((9, 24))).unwrap();
    writer.finish().unwrap();
    let (ok, stdout, stderr) = bench(&["--batch-size", "3", "--input-data", path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["levels"][0]["requests"], 12, "{report}");
    assert_eq!(report["levels"][0]["server"]["requests"], 12, "{report}");
}

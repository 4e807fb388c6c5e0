//! Execution providers through the real binary on a machine without a GPU, against the
//! CPU-only ONNX Runtime library: a GPU variant without fallback fails clearly (naming the
//! provider, the library and the wheel to take) while the model's other variants serve, and
//! `fallback: cpu` serves on the CPU with answers identical to the CPU variant and a
//! ModelConfig that says so.

mod common;

use std::time::Duration;

use common::{TestServer, example_store, f32_values};
use mantissa_proto::inference::*;

const POLICY: &str = "\
variants:
  fp32:
    precision: fp32
  cuda:
    precision: fp32
    execution_provider: cuda
  cuda_or_cpu:
    precision: fp32
    execution_provider:
      kind: cuda
      device_id: 0
      gpu_mem_limit: 1GiB
      fallback: cpu
  trt_fp16:
    precision: fp16
    execution_provider: {kind: tensorrt, fp16: true, fallback: cpu}
routing:
  default: fp32
";

fn store() -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let directory = store.path().join("digits_cnn");
    std::fs::create_dir(&directory).unwrap();
    std::fs::copy(example_store().join("digits_cnn/model.onnx"), directory.join("model.onnx")).unwrap();
    std::fs::write(directory.join("policy.yaml"), POLICY).unwrap();
    store
}

fn request(version: &str, rows: usize) -> ModelInferRequest {
    // Varied pixels, so that identical answers mean something.
    let pixels: Vec<f32> = (0..rows * 64).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
    common::digits_cnn_request(version, &pixels)
}

async fn config(
    client: &mut grpc_inference_service_client::GrpcInferenceServiceClient<tonic::transport::Channel>,
    version: &str,
) -> ModelConfig {
    let request = ModelConfigRequest { name: "digits_cnn".into(), version: version.into() };
    client.model_config(request).await.unwrap().into_inner().config.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_gpu_provider_fails_its_variant_or_falls_back_to_the_cpu() {
    let store = store();
    let cache = tempfile::tempdir().unwrap();
    let library = common::repo_root().join(".onnxruntime/lib/libonnxruntime.so.1.31.1");
    let library = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| library.display().to_string());
    let mut server = TestServer::start_with(
        store.path(),
        &["--cache-dir", cache.path().to_str().unwrap(), "--ort-library", &library],
        &[],
    );
    let mut client = server.wait_ready().await;
    let ready = |version: &str| ModelReadyRequest { name: "digits_cnn".into(), version: version.into() };
    for (version, expected) in [("fp32", true), ("cuda", false), ("cuda_or_cpu", true), ("trt_fp16", true)] {
        let answer = client.model_ready(ready(version)).await.unwrap().into_inner().ready;
        assert_eq!(answer, expected, "ModelReady for {version}; logs:\n{}", server.logs());
    }

    // Without fallback: the variant is unavailable, and the reason says what is missing.
    let index = client.repository_index(RepositoryIndexRequest::default()).await.unwrap().into_inner();
    // Versions are numbered in policy order: fp32 1, cuda 2, cuda_or_cpu 3, trt_fp16 4.
    let cuda = index.models.iter().find(|m| m.version == "2").unwrap();
    assert_eq!(cuda.state, "UNAVAILABLE");
    for part in [
        "execution provider cuda (CUDAExecutionProvider, device 0) is not available",
        "CUDA execution provider is not enabled in this build",
        "libonnxruntime.so.1.31.1 provides [",
        "onnxruntime-gpu==1.31.1",
        "--ort-library",
    ] {
        assert!(cuda.reason.contains(part), "'{part}' missing from: {}", cuda.reason);
    }
    let logs = server.logs();
    assert!(
        logs.lines().any(|line| line.contains("variant failed to load") && line.contains("CUDAExecutionProvider")),
        "{logs}"
    );
    let status = client.model_infer(request("cuda", 1)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // With fallback: a warning, then the CPU, with the same answers as the CPU variant.
    assert!(
        logs.lines().any(|line| line.contains("WARN")
            && line.contains("fallback: cpu")
            && line.contains("cuda_or_cpu")
            && line.contains("is not available")),
        "{logs}"
    );
    assert!(
        logs.lines().any(|line| line.contains("variant built and warmed up")
            && line.contains("cuda_or_cpu")
            && line.contains("cpu (fallback from cuda)")),
        "{logs}"
    );
    for rows in [1, 5] {
        let cpu = client.model_infer(request("fp32", rows)).await.unwrap().into_inner();
        let fallback = client.model_infer(request("cuda_or_cpu", rows)).await.unwrap().into_inner();
        assert_eq!(fallback.model_version, "3");
        assert_eq!(cpu.raw_output_contents, fallback.raw_output_contents, "{rows} rows");
        assert_eq!(f32_values(&cpu.raw_output_contents[0]).len(), rows * 10);
    }

    let fallback = config(&mut client, "cuda_or_cpu").await;
    let group = &fallback.instance_group[0];
    assert_eq!(group.kind, model_instance_group::Kind::Cpu as i32, "{group:?}");
    assert!(group.gpus.is_empty(), "{group:?}");
    let parameter = |config: &ModelConfig, key: &str| config.parameters[key].string_value.clone();
    assert_eq!(parameter(&fallback, "execution_provider"), "cpu (fallback from cuda)");
    assert_eq!(parameter(&fallback, "execution_provider_requested"), "cuda (device 0)");
    assert!(parameter(&fallback, "execution_provider_fallback_reason").contains("is not available"));
    let cpu = config(&mut client, "fp32").await;
    assert_eq!(cpu.instance_group[0].kind, model_instance_group::Kind::Cpu as i32);
    assert_eq!(parameter(&cpu, "execution_provider"), "cpu");
    assert!(!cpu.parameters.contains_key("execution_provider_fallback_reason"));

    // TensorRT with fallback: the FP16 variant serves on the CPU, and its engine cache was
    // laid out under the artifact cache, per variant.
    let trt = config(&mut client, "trt_fp16").await;
    assert_eq!(parameter(&trt, "execution_provider"), "cpu (fallback from tensorrt)");
    assert_eq!(client.model_infer(request("trt_fp16", 2)).await.unwrap().into_inner().model_version, "4");
    let engines: Vec<String> = std::fs::read_dir(cache.path().join("digits_cnn/tensorrt"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(engines.len() == 1 && engines[0].starts_with("trt_fp16-"), "{engines:?}");

    server.terminate();
    assert_eq!(server.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

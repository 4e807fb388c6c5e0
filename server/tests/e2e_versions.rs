//! Numeric model versions through the real binary: every RPC takes a variant's number or its
//! name, reports the numbers, and names the variant in parameters; versions declared in the
//! policy are served as declared, and bad ones stop startup naming file, line and key.

mod common;

use std::time::Duration;

use common::{TestServer, example_store, mantissa_command, run_to_exit, served_variant, store_with};
use mantissa_proto::inference::*;
use tonic::Code;

fn digits_request(version: &str) -> ModelInferRequest {
    common::digits_cnn_request(version, &[0.5; 128])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_takes_a_version_number_or_a_variant_name() {
    let server = TestServer::start(&example_store());
    let mut client = server.wait_ready().await;

    // The example policy lists fp32, fp16, int8 and declares no versions: 1, 2, 3.
    for (version, variant) in [("1", "fp32"), ("2", "fp16"), ("3", "int8"), ("fp16", "fp16"), ("", "fp32")] {
        let response = client.model_infer(digits_request(version)).await.unwrap().into_inner();
        assert_eq!(served_variant(&response), variant, "model_version '{version}'");
        let number = match variant {
            "fp32" => "1",
            "fp16" => "2",
            _ => "3",
        };
        assert_eq!(response.model_version, number, "model_version '{version}'");

        let ready = ModelReadyRequest { name: "digits_cnn".into(), version: version.into() };
        assert!(client.model_ready(ready).await.unwrap().into_inner().ready, "ModelReady '{version}'");
        let metadata = ModelMetadataRequest { name: "digits_cnn".into(), version: version.into() };
        let metadata = client.model_metadata(metadata).await.unwrap().into_inner();
        assert_eq!(metadata.versions, ["1", "2", "3"]);
    }

    let config = |version: &str| ModelConfigRequest { name: "digits_cnn".into(), version: version.into() };
    let int8 = client.model_config(config("3")).await.unwrap().into_inner().config.unwrap();
    assert_eq!(int8.parameters["variant"].string_value, "int8");
    assert_eq!(int8.parameters["version"].string_value, "3");
    assert_eq!(int8.parameters["versions"].string_value, "1 (fp32), 2 (fp16), 3 (int8)");
    assert_eq!(int8.parameters["default_version"].string_value, "1");
    assert_eq!(
        int8.version_policy.unwrap().policy_choice,
        Some(model_version_policy::PolicyChoice::Specific(model_version_policy::Specific { versions: vec![1, 2, 3] }))
    );
    let by_name = client.model_config(config("int8")).await.unwrap().into_inner().config.unwrap();
    assert_eq!(by_name.parameters["version"].string_value, "3");

    // Statistics are reported under the number, and can be asked for by name.
    let statistics = |version: &str| ModelStatisticsRequest { name: "digits_cnn".into(), version: version.into() };
    let fp16 = client.model_statistics(statistics("fp16")).await.unwrap().into_inner().model_stats;
    assert_eq!(fp16.len(), 1);
    assert_eq!(fp16[0].version, "2");
    // Two requests of two rows reached fp16: by "2" and by "fp16".
    assert_eq!(fp16[0].inference_count, 4);
    let all = client.model_statistics(statistics("")).await.unwrap().into_inner().model_stats;
    let versions: Vec<&str> = all.iter().map(|stats| stats.version.as_str()).collect();
    assert_eq!(versions, ["1", "2", "3"]);

    // A number no variant has is not ready, and not found for the other RPCs.
    let ready = ModelReadyRequest { name: "digits_cnn".into(), version: "4".into() };
    assert!(!client.model_ready(ready).await.unwrap().into_inner().ready);
    let status = client.model_infer(digits_request("4")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        status.message(),
        "model 'digits_cnn' has no version '4'; available versions: [\"1 (fp32)\", \"2 (fp16)\", \"3 (int8)\"]"
    );
    let status = client.model_config(config("0")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

const DECLARED: &str = "variants:\n  fp32:\n    version: 7\n    precision: fp32\n  fp16:\n    precision: fp16\n  fp32b:\n    precision: fp32\nrouting:\n  default: 7\n  split:\n    fp16: 1\n    7: 3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_versions_are_served_and_the_rest_take_the_free_numbers() {
    let store = store_with("digits_cnn", &example_store(), DECLARED);
    let server = TestServer::start(store.path());
    let mut client = server.wait_ready().await;
    let metadata = ModelMetadataRequest { name: "digits_cnn".into(), version: String::new() };
    assert_eq!(client.model_metadata(metadata).await.unwrap().into_inner().versions, ["1", "2", "7"]);
    for (version, number, variant) in [("7", "7", "fp32"), ("1", "1", "fp16"), ("fp32b", "2", "fp32b")] {
        let response = client.model_infer(digits_request(version)).await.unwrap().into_inner();
        assert_eq!((response.model_version.as_str(), served_variant(&response).as_str()), (number, variant));
    }
    // The split names fp32 by its number: unversioned requests go to fp32 (7) or fp16 (1).
    for _ in 0..20 {
        let response = client.model_infer(digits_request("")).await.unwrap().into_inner();
        assert!(["1", "7"].contains(&response.model_version.as_str()), "{}", response.model_version);
    }
    let index = client.repository_index(RepositoryIndexRequest::default()).await.unwrap().into_inner();
    let versions: Vec<&str> = index.models.iter().map(|m| m.version.as_str()).collect();
    assert_eq!(versions, ["7", "1", "2"], "RepositoryIndex lists variants in policy order");
}

#[test]
fn a_duplicate_or_invalid_version_stops_startup_naming_file_line_and_key() {
    for (policy, line, expected) in [
        (
            "variants:\n  fp32:\n    version: 3\n    precision: fp32\n  fp16:\n    precision: fp16\n    version: 3\n",
            7,
            "key `variants.fp16.version`: version 3 is already variant `fp32`'s",
        ),
        (
            "variants:\n  fp32:\n    precision: fp32\n    version: 0\n",
            4,
            "key `variants.fp32.version`: expected a positive integer, got 0",
        ),
    ] {
        let store = store_with("digits_cnn", &example_store(), policy);
        let mut command = mantissa_command();
        command.args(["serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--model-store"]);
        command.arg(store.path());
        let (status, stderr) = run_to_exit(command, Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{stderr}");
        let location = format!("digits_cnn/policy.yaml:{line}: {expected}");
        assert!(stderr.contains(&location), "expected '{location}' in:\n{stderr}");
    }
}

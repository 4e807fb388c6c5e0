//! The real binary, driven by the generated tonic client: metadata, config, inference on the
//! digits test split, every datatype, and the bad-input matrix.

mod common;

use common::{TestServer, example_store, f32_bytes, f32_values, fixture_store, served_variant};
use mantissa_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use mantissa_proto::inference::*;
use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;
use tonic::Code;

fn digits_input(rows: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "digits_cnn".into(),
        id: "good".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 1, 8, 8],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&vec![0.25; rows * 64])],
        ..Default::default()
    }
}

fn load_npz(path: &std::path::Path) -> (ArrayD<f32>, ArrayD<i64>, ArrayD<f32>) {
    let mut npz = NpzReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let input = npz.by_name::<OwnedRepr<f32>, IxDyn>("input").unwrap();
    let labels = npz.by_name::<OwnedRepr<i64>, IxDyn>("labels").unwrap();
    let logits = npz.by_name::<OwnedRepr<f32>, IxDyn>("logits").unwrap();
    (input, labels, logits)
}

#[tokio::test]
async fn metadata_and_config_describe_batching_models() {
    let server = TestServer::start(&example_store());
    let mut client = server.wait_ready().await;

    let metadata = client
        .model_metadata(ModelMetadataRequest { name: "digits_cnn".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.platform, "onnxruntime_onnx");
    // Version numbers follow the policy's variant order: fp32, fp16, int8.
    assert_eq!(metadata.versions, vec!["1", "2", "3"]);
    assert_eq!(metadata.inputs[0].name, "input");
    assert_eq!(metadata.inputs[0].datatype, "FP32");
    assert_eq!(metadata.inputs[0].shape, vec![-1, 1, 8, 8]);
    assert_eq!(metadata.outputs[0].shape, vec![-1, 10]);

    let config = client
        .model_config(ModelConfigRequest { name: "digits_transformer".into(), version: "fp32".into() })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.name, "digits_transformer");
    assert_eq!(config.platform, "onnxruntime_onnx");
    assert_eq!(config.max_batch_size, 64);
    assert_eq!(config.input[0].dims, vec![8, 8], "dims exclude the batch dimension");
    assert_eq!(config.input[0].data_type, DataType::TypeFp32 as i32);
    assert_eq!(config.output[0].dims, vec![10]);
    assert_eq!(config.instance_group[0].count, 1);
    assert_eq!(config.instance_group[0].kind, model_instance_group::Kind::Cpu as i32);
    assert_eq!(config.parameters["precision"].string_value, "fp32");

    let server_metadata = client.server_metadata(ServerMetadataRequest {}).await.unwrap().into_inner();
    assert_eq!(server_metadata.name, "mantissa");
    assert_eq!(server_metadata.extensions, vec!["model_configuration", "statistics"]);

    let index = client.repository_index(RepositoryIndexRequest::default()).await.unwrap().into_inner();
    let names: Vec<_> = index.models.iter().map(|m| (m.name.as_str(), m.version.as_str(), m.state.as_str())).collect();
    assert_eq!(
        names,
        vec![
            ("digits_cnn", "1", "READY"),
            ("digits_cnn", "2", "READY"),
            ("digits_cnn", "3", "READY"),
            ("digits_transformer", "1", "READY"),
            ("digits_transformer", "2", "READY"),
            ("digits_transformer", "3", "READY")
        ]
    );
}

#[tokio::test]
async fn digits_inference_matches_onnx_runtime_reference() {
    let server = TestServer::start(&example_store());
    let mut client = server.wait_ready().await;
    for model in ["digits_cnn", "digits_transformer"] {
        let (input, labels, reference) = load_npz(&example_store().join(model).join("test_data.npz"));
        let rows = input.shape()[0];
        let row_elements: usize = input.shape()[1..].iter().product();
        let flat: Vec<f32> = input.iter().copied().collect();
        let reference: Vec<f32> = reference.iter().copied().collect();
        let mut correct = 0;
        let mut max_abs = 0f32;
        for start in (0..rows).step_by(64) {
            let batch = (rows - start).min(64);
            let mut shape: Vec<i64> = input.shape().iter().map(|&d| d as i64).collect();
            shape[0] = batch as i64;
            let request = ModelInferRequest {
                model_name: model.into(),
                id: format!("{model}-{start}"),
                inputs: vec![InferInputTensor {
                    name: "input".into(),
                    datatype: "FP32".into(),
                    shape,
                    ..Default::default()
                }],
                raw_input_contents: vec![f32_bytes(&flat[start * row_elements..(start + batch) * row_elements])],
                ..Default::default()
            };
            let response = client.model_infer(request).await.unwrap().into_inner();
            assert_eq!(response.id, format!("{model}-{start}"));
            assert_eq!((response.model_version.as_str(), served_variant(&response).as_str()), ("1", "fp32"));
            assert_eq!(response.outputs[0].shape, vec![batch as i64, 10]);
            let logits = f32_values(&response.raw_output_contents[0]);
            for row in 0..batch {
                let got = &logits[row * 10..row * 10 + 10];
                let want = &reference[(start + row) * 10..(start + row) * 10 + 10];
                for (g, w) in got.iter().zip(want) {
                    max_abs = max_abs.max((g - w).abs());
                }
                let argmax = got.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
                correct += usize::from(argmax as i64 == labels[[start + row]]);
            }
        }
        let accuracy = correct as f64 / rows as f64;
        eprintln!("{model}: accuracy {accuracy:.4}, max abs diff vs ORT reference {max_abs:e}");
        assert!(max_abs <= 1e-5, "{model}: max abs diff {max_abs}");
        assert!(accuracy > 0.95, "{model}: accuracy {accuracy}");
    }
}

#[tokio::test]
async fn reduced_precision_variants_serve_the_digits_split_within_tolerance() {
    let server = TestServer::start(&example_store());
    let mut client = server.wait_ready().await;
    for (model, version, min_cosine) in [
        ("digits_cnn", "fp16", 0.999),
        ("digits_transformer", "fp16", 0.999),
        ("digits_cnn", "int8", 0.99),
        ("digits_transformer", "int8", 0.99),
    ] {
        let config = client
            .model_config(ModelConfigRequest { name: model.into(), version: version.into() })
            .await
            .unwrap()
            .into_inner()
            .config
            .unwrap();
        assert_eq!(config.parameters["precision"].string_value, version);
        let changed: usize = config.parameters
            [&format!("{version}_nodes_{}", if version == "fp16" { "converted" } else { "quantized" })]
            .string_value
            .parse()
            .unwrap();
        assert!(changed > 0, "{model} {version}: nothing changed");
        assert_eq!(config.input[0].data_type, DataType::TypeFp32 as i32, "keep_io_types keeps FP32 inputs");

        let (input, labels, reference) = load_npz(&example_store().join(model).join("test_data.npz"));
        let rows = input.shape()[0];
        let row_elements: usize = input.shape()[1..].iter().product();
        let flat: Vec<f32> = input.iter().copied().collect();
        let reference: Vec<f32> = reference.iter().copied().collect();
        let mut shape: Vec<i64> = input.shape().iter().map(|&d| d as i64).collect();
        let (mut dot, mut norm_a, mut norm_b) = (0f64, 0f64, 0f64);
        let (mut correct_variant, mut correct_fp32) = (0, 0);
        for start in (0..rows).step_by(64) {
            let batch = (rows - start).min(64);
            shape[0] = batch as i64;
            let request = ModelInferRequest {
                model_name: model.into(),
                model_version: version.into(),
                inputs: vec![InferInputTensor {
                    name: "input".into(),
                    datatype: "FP32".into(),
                    shape: shape.clone(),
                    ..Default::default()
                }],
                raw_input_contents: vec![f32_bytes(&flat[start * row_elements..(start + batch) * row_elements])],
                ..Default::default()
            };
            let response = client.model_infer(request).await.unwrap().into_inner();
            assert_eq!(served_variant(&response), version);
            assert_eq!(response.model_version, config.parameters["version"].string_value);
            assert_eq!(response.outputs[0].datatype, "FP32");
            let logits = f32_values(&response.raw_output_contents[0]);
            for row in 0..batch {
                let got = &logits[row * 10..row * 10 + 10];
                let want = &reference[(start + row) * 10..(start + row) * 10 + 10];
                for (g, w) in got.iter().zip(want) {
                    dot += f64::from(*g) * f64::from(*w);
                    norm_a += f64::from(*g) * f64::from(*g);
                    norm_b += f64::from(*w) * f64::from(*w);
                }
                let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as i64;
                correct_variant += usize::from(argmax(got) == labels[[start + row]]);
                correct_fp32 += usize::from(argmax(want) == labels[[start + row]]);
            }
        }
        let cosine = dot / (norm_a.sqrt() * norm_b.sqrt());
        eprintln!(
            "{model} {version}: cosine {cosine:.6}, accuracy {correct_variant}/{rows} (fp32 {correct_fp32}/{rows})"
        );
        assert!(cosine >= min_cosine, "{model} {version}: cosine {cosine}");
        assert!(
            correct_variant + rows / 100 >= correct_fp32,
            "{model} {version}: {correct_variant} vs fp32 {correct_fp32}"
        );
    }
}

#[tokio::test]
async fn typed_contents_give_the_same_answer_as_raw() {
    let server = TestServer::start(&example_store());
    let mut client = server.wait_ready().await;
    let raw = client.model_infer(digits_input(2)).await.unwrap().into_inner();
    let mut typed = digits_input(2);
    typed.raw_input_contents.clear();
    typed.inputs[0].contents = Some(InferTensorContents { fp32_contents: vec![0.25; 128], ..Default::default() });
    typed.outputs = vec![InferRequestedOutputTensor { name: "logits".into(), ..Default::default() }];
    let typed = client.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(raw.raw_output_contents, typed.raw_output_contents);
}

/// One typed value per datatype, three per row, as raw bytes and as the matching typed field.
fn all_types_request(use_typed: bool) -> ModelInferRequest {
    let model = if use_typed { "typed_types" } else { "all_types" };
    let mut request = ModelInferRequest { model_name: model.into(), ..Default::default() };
    let mut add = |suffix: &str, datatype: &str, raw: Vec<u8>, typed: InferTensorContents| {
        let mut tensor = InferInputTensor {
            name: format!("in_{suffix}"),
            datatype: datatype.into(),
            shape: vec![1, 3],
            ..Default::default()
        };
        if use_typed {
            if datatype == "FP16" || datatype == "BF16" {
                return;
            }
            tensor.contents = Some(typed);
        } else {
            request.raw_input_contents.push(raw);
        }
        request.inputs.push(tensor);
    };
    let c = InferTensorContents::default;
    add("bool", "BOOL", vec![1, 0, 1], InferTensorContents { bool_contents: vec![true, false, true], ..c() });
    add("uint8", "UINT8", vec![0, 7, 255], InferTensorContents { uint_contents: vec![0, 7, 255], ..c() });
    add(
        "uint16",
        "UINT16",
        [0u16, 7, 65535].iter().flat_map(|v| v.to_le_bytes()).collect(),
        InferTensorContents { uint_contents: vec![0, 7, 65535], ..c() },
    );
    add(
        "uint32",
        "UINT32",
        [0u32, 7, u32::MAX].iter().flat_map(|v| v.to_le_bytes()).collect(),
        InferTensorContents { uint_contents: vec![0, 7, u32::MAX], ..c() },
    );
    add(
        "uint64",
        "UINT64",
        [0u64, 7, u64::MAX].iter().flat_map(|v| v.to_le_bytes()).collect(),
        InferTensorContents { uint64_contents: vec![0, 7, u64::MAX], ..c() },
    );
    add(
        "int8",
        "INT8",
        [-128i8, 0, 127].iter().flat_map(|v| v.to_le_bytes()).collect(),
        InferTensorContents { int_contents: vec![-128, 0, 127], ..c() },
    );
    add(
        "int16",
        "INT16",
        [-32768i16, 0, 32767].iter().flat_map(|v| v.to_le_bytes()).collect(),
        InferTensorContents { int_contents: vec![-32768, 0, 32767], ..c() },
    );
    add(
        "int32",
        "INT32",
        [i32::MIN, 0, i32::MAX].iter().flat_map(|v| v.to_le_bytes()).collect(),
        InferTensorContents { int_contents: vec![i32::MIN, 0, i32::MAX], ..c() },
    );
    add(
        "int64",
        "INT64",
        [i64::MIN, 0, i64::MAX].iter().flat_map(|v| v.to_le_bytes()).collect(),
        InferTensorContents { int64_contents: vec![i64::MIN, 0, i64::MAX], ..c() },
    );
    add(
        "fp16",
        "FP16",
        [0.5f32, -2.0, 65504.0].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        c(),
    );
    add(
        "bf16",
        "BF16",
        [0.5f32, -2.0, 1e30].iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        c(),
    );
    add(
        "fp32",
        "FP32",
        f32_bytes(&[0.5, -2.0, f32::MAX]),
        InferTensorContents { fp32_contents: vec![0.5, -2.0, f32::MAX], ..c() },
    );
    add(
        "fp64",
        "FP64",
        [0.5f64, -2.0, f64::MAX].iter().flat_map(|v| v.to_le_bytes()).collect(),
        InferTensorContents { fp64_contents: vec![0.5, -2.0, f64::MAX], ..c() },
    );
    let strings = vec![b"".to_vec(), "h\u{e9}llo".as_bytes().to_vec(), b"x".to_vec()];
    let mut raw_strings = Vec::new();
    for s in &strings {
        raw_strings.extend_from_slice(&(s.len() as u32).to_le_bytes());
        raw_strings.extend_from_slice(s);
    }
    add("string", "BYTES", raw_strings, InferTensorContents { bytes_contents: strings, ..c() });
    request
}

#[tokio::test]
async fn every_datatype_round_trips_raw_and_typed() {
    let server = TestServer::start(&fixture_store());
    let mut client = server.wait_ready().await;
    let raw = all_types_request(false);
    for use_typed in [false, true] {
        let response = client.model_infer(all_types_request(use_typed)).await.unwrap().into_inner();
        let expected: Vec<usize> = (0..raw.inputs.len())
            .filter(|&i| !use_typed || !matches!(raw.inputs[i].datatype.as_str(), "FP16" | "BF16"))
            .collect();
        assert_eq!(response.outputs.len(), expected.len());
        for (position, &index) in expected.iter().enumerate() {
            let input = &raw.inputs[index];
            let output = &response.outputs[position];
            assert_eq!(output.name, input.name.replace("in_", "out_"));
            assert_eq!(output.datatype, input.datatype, "{}", output.name);
            assert_eq!(output.shape, vec![1, 3]);
            assert_eq!(
                response.raw_output_contents[position], raw.raw_input_contents[index],
                "{} (typed: {use_typed})",
                output.name
            );
        }
    }
    let metadata = client
        .model_metadata(ModelMetadataRequest { name: "all_types".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    let datatypes: Vec<_> = metadata.inputs.iter().map(|t| t.datatype.as_str()).collect();
    assert_eq!(
        datatypes,
        [
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32",
            "FP64", "BYTES"
        ]
    );
}

struct Case {
    name: &'static str,
    request: ModelInferRequest,
    code: Code,
    message: &'static str,
}

/// Makes a variation of the good request.
type Mutate<'a> = dyn Fn(&dyn Fn(&mut ModelInferRequest)) -> ModelInferRequest + 'a;

/// Every bad variation of a good digits request, with the status and message it must get.
fn bad_digits_cases() -> Vec<Case> {
    let good = digits_input(1);
    let mutate = |f: &dyn Fn(&mut ModelInferRequest)| {
        let mut request = good.clone();
        f(&mut request);
        request
    };
    [lookup_and_input_cases(&mutate), type_and_shape_cases(&mutate), data_cases(&mutate)]
        .into_iter()
        .flatten()
        .collect()
}

/// Unknown models and versions; missing, duplicate and unknown inputs.
fn lookup_and_input_cases(mutate: &Mutate) -> Vec<Case> {
    vec![
        Case {
            name: "unknown model",
            request: mutate(&|r| r.model_name = "nope".into()),
            code: Code::NotFound,
            message: "unknown model 'nope'",
        },
        Case {
            name: "unknown version",
            request: mutate(&|r| r.model_version = "int9".into()),
            code: Code::NotFound,
            message: "model 'digits_cnn' has no version 'int9'; available versions: [\"1 (fp32)\", \"2 (fp16)\", \"3 (int8)\"]",
        },
        Case {
            name: "missing input",
            request: mutate(&|r| {
                r.inputs.clear();
                r.raw_input_contents.clear();
            }),
            code: Code::InvalidArgument,
            message: "missing input 'input'",
        },
        Case {
            name: "duplicate input",
            request: mutate(&|r| {
                r.inputs.push(r.inputs[0].clone());
                r.raw_input_contents.push(r.raw_input_contents[0].clone());
            }),
            code: Code::InvalidArgument,
            message: "input 'input' appears more than once",
        },
        Case {
            name: "unknown input",
            request: mutate(&|r| r.inputs[0].name = "pixels".into()),
            code: Code::InvalidArgument,
            message: "unexpected input 'pixels'; the model expects inputs [\"input\"]",
        },
    ]
}

/// Datatypes, shapes and dimensions.
fn type_and_shape_cases(mutate: &Mutate) -> Vec<Case> {
    vec![
        Case {
            name: "wrong datatype",
            request: mutate(&|r| r.inputs[0].datatype = "FP64".into()),
            code: Code::InvalidArgument,
            message: "input 'input': expected datatype FP32, got FP64",
        },
        Case {
            name: "unknown datatype",
            request: mutate(&|r| r.inputs[0].datatype = "FLOAT".into()),
            code: Code::InvalidArgument,
            message: "input 'input': unknown datatype 'FLOAT'; expected FP32",
        },
        Case {
            name: "shape mismatch",
            request: mutate(&|r| r.inputs[0].shape = vec![1, 1, 8, 7]),
            code: Code::InvalidArgument,
            message: "input 'input': expected shape [-1, 1, 8, 8], got [1, 1, 8, 7]",
        },
        Case {
            name: "rank mismatch",
            request: mutate(&|r| r.inputs[0].shape = vec![1, 64]),
            code: Code::InvalidArgument,
            message: "expected shape [-1, 1, 8, 8], got [1, 64]",
        },
        Case {
            name: "negative dimension",
            request: mutate(&|r| r.inputs[0].shape = vec![-1, 1, 8, 8]),
            code: Code::InvalidArgument,
            message: "input 'input': shape [-1, 1, 8, 8] has a negative dimension",
        },
    ]
}

/// Raw and typed payloads, batch limits and requested outputs.
fn data_cases(mutate: &Mutate) -> Vec<Case> {
    vec![
        Case {
            name: "raw size mismatch",
            request: mutate(&|r| r.raw_input_contents[0].truncate(252)),
            code: Code::InvalidArgument,
            message: "input 'input': raw content holds 252 bytes, expected 256 bytes (64 FP32 elements of shape [1, 1, 8, 8])",
        },
        Case {
            name: "raw and typed contents",
            request: mutate(&|r| {
                r.inputs[0].contents = Some(InferTensorContents { fp32_contents: vec![0.0; 64], ..Default::default() })
            }),
            code: Code::InvalidArgument,
            message: "input 'input': data given in both raw_input_contents[0] and typed contents",
        },
        Case {
            name: "raw count mismatch",
            request: mutate(&|r| r.raw_input_contents.push(vec![0; 4])),
            code: Code::InvalidArgument,
            message: "raw_input_contents has 2 entries but the request has 1 inputs",
        },
        Case {
            name: "no data",
            request: mutate(&|r| r.raw_input_contents.clear()),
            code: Code::InvalidArgument,
            message: "input 'input': no data",
        },
        Case {
            name: "typed count mismatch",
            request: mutate(&|r| {
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents { fp32_contents: vec![0.0; 3], ..Default::default() });
            }),
            code: Code::InvalidArgument,
            message: "input 'input': fp32_contents holds 3 values, expected 64 for the given shape",
        },
        Case {
            name: "wrong typed field",
            request: mutate(&|r| {
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents { int_contents: vec![0; 64], ..Default::default() });
            }),
            code: Code::InvalidArgument,
            message: "input 'input': FP32 data must be in fp32_contents, got int_contents",
        },
        Case {
            name: "batch too large",
            request: mutate(&|r| {
                r.inputs[0].shape = vec![65, 1, 8, 8];
                r.raw_input_contents[0] = f32_bytes(&vec![0.0; 65 * 64]);
            }),
            code: Code::InvalidArgument,
            message: "input 'input': batch size 65 exceeds the model's max_batch_size 64",
        },
        Case {
            name: "unknown output",
            request: mutate(&|r| {
                r.outputs = vec![InferRequestedOutputTensor { name: "probs".into(), ..Default::default() }]
            }),
            code: Code::InvalidArgument,
            message: "unexpected requested output 'probs'; the model has outputs [\"logits\"]",
        },
    ]
}

async fn assert_cases(
    client: &mut GrpcInferenceServiceClient<tonic::transport::Channel>,
    cases: Vec<Case>,
    good: &ModelInferRequest,
) {
    for case in cases {
        let status = client.model_infer(case.request).await.expect_err(case.name);
        assert_eq!(status.code(), case.code, "{}: {}", case.name, status.message());
        assert!(
            status.message().contains(case.message),
            "{}: got message {:?}, expected it to contain {:?}",
            case.name,
            status.message(),
            case.message
        );
        // The server keeps serving after every rejection.
        let response = client
            .model_infer(good.clone())
            .await
            .unwrap_or_else(|s| panic!("good request after '{}' failed: {s:?}", case.name));
        assert_eq!(
            response.into_inner().raw_output_contents.len(),
            1 + usize::from(good.model_name == "all_types") * 13
        );
    }
}

use mantissa_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;

#[tokio::test]
async fn bad_inputs_get_precise_errors_and_the_server_keeps_serving() {
    let server = TestServer::start(&example_store());
    let mut client = server.wait_ready().await;
    assert_cases(&mut client, bad_digits_cases(), &digits_input(1)).await;
}

#[tokio::test]
async fn bad_inputs_on_fixture_models() {
    let server = TestServer::start_with(&fixture_store(), &["--max-message-bytes", "1048576"], &[]);
    let mut client = server.wait_ready().await;
    let good = all_types_request(false);
    let mut oversized = good.clone();
    oversized.inputs[11].shape = vec![1, 1 << 30];
    let mut bad_utf8 = good.clone();
    bad_utf8.raw_input_contents[13] = vec![2, 0, 0, 0, 0xc3, 0x28, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut bad_bool = good.clone();
    bad_bool.raw_input_contents[0] = vec![1, 2, 0];
    let cases = vec![
        Case {
            name: "too many elements",
            request: oversized,
            code: Code::InvalidArgument,
            message: "input 'in_fp32': shape [1, 1073741824] holds more data than the message limit of 1048576 bytes",
        },
        Case {
            name: "non-UTF-8 string",
            request: bad_utf8,
            code: Code::InvalidArgument,
            message: "input 'in_string': BYTES element 0 is not valid UTF-8",
        },
        Case {
            name: "invalid bool",
            request: bad_bool,
            code: Code::InvalidArgument,
            message: "input 'in_bool': BOOL element 1 is 2, expected 0 or 1",
        },
    ];
    assert_cases(&mut client, cases, &good).await;

    // A message larger than the configured limit is refused by the transport.
    let mut huge = good.clone();
    huge.inputs[11].shape = vec![1, 300_000];
    huge.raw_input_contents[11] = f32_bytes(&vec![0.0; 300_000]);
    let status = client.model_infer(huge).await.unwrap_err();
    assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted), "{status:?}");
    client.model_infer(good.clone()).await.unwrap();

    // ONNX Runtime itself fails: INTERNAL, and the server keeps serving.
    let reshape = |target: [i64; 2]| ModelInferRequest {
        model_name: "runtime_error".into(),
        inputs: vec![
            InferInputTensor { name: "data".into(), datatype: "FP32".into(), shape: vec![6], ..Default::default() },
            InferInputTensor { name: "shape".into(), datatype: "INT64".into(), shape: vec![2], ..Default::default() },
        ],
        raw_input_contents: vec![
            f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            target.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ],
        ..Default::default()
    };
    let status = client.model_infer(reshape([4, 4])).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("ONNX Runtime failed"), "{}", status.message());
    assert!(status.message().to_lowercase().contains("reshape"), "{}", status.message());
    let ok = client.model_infer(reshape([2, 3])).await.unwrap().into_inner();
    assert_eq!(ok.outputs[0].shape, vec![2, 3]);
    assert_eq!(f32_values(&ok.raw_output_contents[0]), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

#[tokio::test]
async fn health_reports_server_and_each_model() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let server = TestServer::start(&example_store());
    server.wait_ready().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "inference.GRPCInferenceService", "digits_cnn", "digits_transformer"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "service '{service}'");
    }
    let unknown = health.check(HealthCheckRequest { service: "no_such_model".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

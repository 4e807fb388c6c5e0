//! `mantissa analyze` end to end: the real binary on the digits_cnn example and its calibration
//! samples, plus fixtures built here (un-normalized inputs, bad shapes, missing data).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, NpzWriter};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn digits_cnn() -> PathBuf {
    repo_root().join("examples/models/digits_cnn/model.onnx")
}

fn calibration() -> PathBuf {
    repo_root().join("examples/models/digits_cnn/calibration")
}

/// Runs `mantissa analyze MODEL --data DATA EXTRA...`. The ONNX Runtime library is found next to
/// the build (or through ORT_DYLIB_PATH when set).
fn analyze(model: &Path, data: &Path, extra: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mantissa"));
    command.args(["--log", "warn", "analyze"]).arg(model).arg("--data").arg(data).args(extra);
    let bundled = repo_root().join(".onnxruntime/lib/libonnxruntime.so.1.31.1");
    if std::env::var_os("ORT_DYLIB_PATH").is_none() && bundled.is_file() {
        command.env("ORT_DYLIB_PATH", bundled);
    }
    command.output().expect("run mantissa analyze")
}

fn json_report(model: &Path, data: &Path) -> Value {
    let output = analyze(model, data, &["--json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "analyze failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!("stdout is not one JSON document ({err}):\n{}", String::from_utf8_lossy(&output.stdout))
    })
}

fn f64_of(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("{value} is not a number"))
}

/// MACCs per image of digits_cnn, from its architecture (checked against the ONNX file's shapes):
/// out elements x kernel elements x input channels per group for each Conv, M x K x N for Gemm.
fn digits_cnn_maccs() -> [(&'static str, u64); 4] {
    let in_channels_conv1 = 1;
    let conv1 = (16 * 8 * 8) * (3 * 3) * in_channels_conv1; // 1 -> 16, 3x3 pad 1, on 8x8
    let conv2 = (32 * 8 * 8) * (3 * 3) * 16; // 16 -> 32, 3x3 pad 1, on 8x8
    let conv3 = (32 * 4 * 4) * (3 * 3) * 32; // 32 -> 32, 3x3 pad 1, on 4x4 after MaxPool 2
    let fc = 32 * 10; // Gemm 32 -> 10, one row per image
    [("/conv1/Conv", conv1), ("/conv2/Conv", conv2), ("/conv3/Conv", conv3), ("/fc/Gemm", fc)]
}

#[test]
fn json_report_on_digits_cnn_has_every_section() {
    let report = json_report(&digits_cnn(), &calibration());
    assert_eq!(report["samples"], 16);
    assert_eq!(report["items"], 128);
    for section in ["inputs", "channel_spread", "dead_channels", "saturation", "maccs", "sensitivity"] {
        for key in ["title", "why", "suggestion"] {
            assert!(report[section][key].as_str().is_some_and(|s| !s.is_empty()), "{section}.{key} missing");
        }
    }

    // 1. Inputs: pixels scaled to [0, 1], so not flagged.
    let inputs = report["inputs"]["items"].as_array().unwrap();
    assert_eq!(inputs.len(), 1);
    let input = &inputs[0];
    assert_eq!(input["name"], "input");
    assert_eq!(input["shape"], serde_json::json!([8, 1, 8, 8]));
    let (min, max) = (f64_of(&input["min"]), f64_of(&input["max"]));
    assert!((0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max) && min < max, "{input}");
    let (mean, std) = (f64_of(&input["mean"]), f64_of(&input["std"]));
    assert!(mean > min && mean < max && std > 0.0, "{input}");
    assert_eq!(input["flagged"], false, "{input}");
    assert_eq!(report["inputs"]["flagged"], 0);

    // 2. Spread: the four weights (per output channel) and the four activations read by compute.
    let spread = report["channel_spread"]["items"].as_array().unwrap();
    let weights: Vec<&Value> = spread.iter().filter(|s| s["kind"] == "weight").collect();
    let activations: Vec<&Value> = spread.iter().filter(|s| s["kind"] == "activation").collect();
    assert_eq!(weights.len(), 4, "{spread:?}");
    assert_eq!(activations.len(), 4, "{spread:?}");
    let channels = |tensor: &str| spread.iter().find(|s| s["tensor"] == tensor).map(|s| s["channels"].clone());
    assert_eq!(channels("onnx::Conv_32"), Some(16.into()));
    assert_eq!(channels("fc.weight"), Some(10.into()));
    assert_eq!(channels("/Relu_output_0"), Some(16.into()));
    assert_eq!(channels("/Flatten_output_0"), Some(32.into()));
    for entry in spread {
        let ratio = f64_of(&entry["ratio"]);
        assert!(ratio >= 1.0, "{entry}");
        assert_eq!(entry["flagged"], ratio > 10.0, "{entry}");
    }

    // 3. Dead channels of the three ReLUs.
    let dead = report["dead_channels"]["items"].as_array().unwrap();
    assert_eq!(dead.len(), 3);
    for entry in dead {
        assert_eq!(entry["op"], "Relu");
        let fraction = f64_of(&entry["dead_fraction"]);
        assert!((0.0..=1.0).contains(&fraction), "{entry}");
        assert!(entry["channels"] == 16 || entry["channels"] == 32, "{entry}");
    }

    // 4. No Sigmoid/Tanh in this model.
    assert_eq!(report["saturation"]["items"].as_array().unwrap().len(), 0);

    // 5. MACCs per image, node by node and in total.
    let maccs = &report["maccs"];
    let expected = digits_cnn_maccs();
    let total: u64 = expected.iter().map(|(_, m)| m).sum();
    assert_eq!(total, 451_904);
    assert_eq!(maccs["per_sample"], total);
    assert_eq!(maccs["batch"], 8);
    let nodes = maccs["nodes"].as_array().unwrap();
    for (node, count) in expected {
        let found = nodes.iter().find(|n| n["node"] == node).unwrap_or_else(|| panic!("{node} missing: {nodes:?}"));
        assert_eq!(found["maccs"], count, "{node}");
    }

    // 6. Sensitivity: every compute node quantized, sorted by SQNR ascending.
    let sensitivity = &report["sensitivity"];
    assert!(sensitivity["error"].is_null(), "{}", sensitivity["error"]);
    assert_eq!(sensitivity["quantized_nodes"], 4);
    let ranked = sensitivity["nodes"].as_array().unwrap();
    assert!(!ranked.is_empty());
    let sqnr: Vec<f64> = ranked.iter().map(|n| n["sqnr_db"].as_f64().unwrap_or(f64::INFINITY)).collect();
    assert!(sqnr.windows(2).all(|pair| pair[0] <= pair[1]), "not sorted ascending: {sqnr:?}");
    for node in ranked {
        assert!(["Conv", "Gemm"].contains(&node["op"].as_str().unwrap()), "{node}");
        let cosine = f64_of(&node["cosine"]);
        assert!(cosine > 0.5 && cosine <= 1.0 + 1e-9, "{node}");
        assert!(sqnr[0].is_finite() && sqnr[0] > 0.0, "{node}");
    }
}

#[test]
fn top_limits_the_sensitivity_list() {
    let output = analyze(&digits_cnn(), &calibration(), &["--json", "--top", "2"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["sensitivity"]["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(report["sensitivity"]["quantized_nodes"], 4);
}

#[test]
fn table_output_has_every_section_title() {
    let output = analyze(&digits_cnn(), &calibration(), &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for title in [
        "1. Inputs",
        "2. Per-channel range spread",
        "3. Dead channels (ReLU/Clip)",
        "4. Saturated Sigmoid/Tanh inputs",
        "5. MACCs per sample",
        "6. Top sensitive nodes (static INT8)",
    ] {
        assert!(stdout.contains(title), "missing '{title}' in:\n{stdout}");
    }
    assert!(stdout.contains("why:") && stdout.contains("suggestion:"), "{stdout}");
    assert!(stdout.contains("total: 451904 MACCs per sample"), "{stdout}");
    assert!(stdout.contains("/conv2/Conv"), "{stdout}");
}

#[test]
fn a_missing_data_directory_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-samples");
    let output = analyze(&digits_cnn(), &missing, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.stdout.is_empty());
}

fn read_input(path: &Path) -> ArrayD<f32> {
    let mut npz = NpzReader::new(std::fs::File::open(path).unwrap()).unwrap();
    npz.by_name::<OwnedRepr<f32>, IxDyn>("input").or_else(|_| npz.by_name("input.npy")).unwrap()
}

fn write_input(path: &Path, array: &ArrayD<f32>) {
    let mut npz = NpzWriter::new(std::fs::File::create(path).unwrap());
    npz.add_array("input", array).unwrap();
    npz.finish().unwrap();
}

#[test]
fn a_sample_of_the_wrong_shape_fails_naming_the_file_and_input() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sample_000.npz");
    write_input(&file, &ArrayD::zeros(IxDyn(&[2, 1, 4, 4])));
    let output = analyze(&digits_cnn(), dir.path(), &["--json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()) && stderr.contains("input 'input'"), "{stderr}");
    assert!(stderr.contains("[2, 1, 4, 4]"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn raw_pixel_inputs_are_flagged_un_normalized() {
    // The calibration images times 255: the same digits, fed as 0..255 values.
    let dir = tempfile::tempdir().unwrap();
    let mut samples: Vec<PathBuf> = std::fs::read_dir(calibration())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "npz"))
        .collect();
    samples.sort();
    for sample in samples.iter().take(4) {
        let scaled = read_input(sample) * 255.0;
        write_input(&dir.path().join(sample.file_name().unwrap()), &scaled);
    }
    let report = json_report(&digits_cnn(), dir.path());
    assert_eq!(report["samples"], 4);
    let input = &report["inputs"]["items"][0];
    assert_eq!(input["flagged"], true, "{input}");
    assert!(f64_of(&input["max"]) > 10.0, "{input}");
    let reasons: Vec<&str> = input["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(reasons.iter().any(|r| r.contains("un-normalized")), "{reasons:?}");
    assert_eq!(report["inputs"]["flagged"], 1);
    // MACCs do not depend on the values.
    assert_eq!(report["maccs"]["per_sample"], 451_904);
}

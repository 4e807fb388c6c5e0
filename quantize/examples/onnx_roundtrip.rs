//! Loads an ONNX model with Mantissa's reader and writes it back with its writer, so tests can
//! check the pair is lossless against the reference `onnx` Python package.
//!
//! Usage: onnx_roundtrip IN.onnx OUT.onnx [EXTERNAL_DATA_FILE]

use std::path::PathBuf;
use std::process::ExitCode;

use mantissa_quantize::{SaveOptions, load_model, save_model};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(2..=3).contains(&args.len()) {
        eprintln!("usage: onnx_roundtrip IN.onnx OUT.onnx [EXTERNAL_DATA_FILE]");
        return ExitCode::from(2);
    }
    // Like onnx.save, small tensors (shapes, axes) stay inline so shape inference can read them.
    let options = SaveOptions { external_file: args.get(2).cloned(), threshold: 1024 };
    let result =
        load_model(&PathBuf::from(&args[0])).and_then(|model| save_model(&model, &PathBuf::from(&args[1]), &options));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

//! Compiles our onnx.proto with prost, using a protoc shipped as a crate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    prost_build::Config::new().compile_protos(&["proto/onnx.proto"], &["proto"])?;
    Ok(())
}

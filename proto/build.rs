//! Compiles the protocol definitions with a protoc binary shipped as a crate, so a build needs
//! nothing from the system package manager.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["proto/grpc_service.proto", "proto/model_config.proto"];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("inference_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}

//! Finding and loading the ONNX Runtime shared library, and creating the one `Environment`
//! every session is built from.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

/// The library file name the project is built and tested against.
pub const ORT_LIBRARY_FILE: &str = "libonnxruntime.so.1.31.1";

#[derive(Debug, thiserror::Error)]
pub enum OrtSetupError {
    #[error(
        "ONNX Runtime library not found (looked for {looked:?}); set ORT_DYLIB_PATH or --ort-library to the path of {ORT_LIBRARY_FILE}, or run scripts/fetch-onnxruntime.sh"
    )]
    NotFound { looked: Vec<PathBuf> },
    #[error("ONNX Runtime library {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("cannot create the ONNX Runtime environment: {0}")]
    Environment(String),
}

/// The library [`init_environment`] loaded: ONNX Runtime is loaded once per process, so this
/// is a process-wide fact, and provider errors name it.
static LOADED_LIBRARY: OnceLock<PathBuf> = OnceLock::new();

/// The ONNX Runtime library this process loaded, once it has.
pub fn loaded_library() -> Option<&'static Path> {
    LOADED_LIBRARY.get().map(PathBuf::as_path)
}

/// Picks the library: an explicit path (flag or `ORT_DYLIB_PATH`) wins; otherwise the file next
/// to the executable, in `../lib` beside it, or in the repository's `.onnxruntime/lib`.
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, OrtSetupError> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(OrtSetupError::Missing { path: path.to_owned() })
        };
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(ORT_LIBRARY_FILE));
        candidates.push(dir.join("../lib").join(ORT_LIBRARY_FILE));
        // target/<profile>/mantissa -> <repo>/.onnxruntime/lib
        candidates.push(dir.join("../../.onnxruntime/lib").join(ORT_LIBRARY_FILE));
        candidates.push(dir.join("../../../.onnxruntime/lib").join(ORT_LIBRARY_FILE));
    }
    candidates.push(PathBuf::from(".onnxruntime/lib").join(ORT_LIBRARY_FILE));
    match candidates.iter().find(|candidate| candidate.is_file()) {
        Some(found) => Ok(found.canonicalize().unwrap_or_else(|_| found.clone())),
        None => Err(OrtSetupError::NotFound { looked: candidates }),
    }
}

/// Loads the library and builds the process-wide environment. Must run before any other
/// ONNX Runtime call.
pub fn init_environment(library: &Path) -> Result<Environment, OrtSetupError> {
    let builder = ort::init_from(library)
        .map_err(|err| OrtSetupError::Load { path: library.to_owned(), reason: err.to_string() })?;
    let environment = builder
        .with_name("mantissa")
        .with_telemetry(false)
        .build()
        .map_err(|err| OrtSetupError::Environment(err.to_string()))?;
    let _ = LOADED_LIBRARY.set(library.canonicalize().unwrap_or_else(|_| library.to_owned()));
    tracing::info!(library = %library.display(), "loaded ONNX Runtime");
    Ok(environment)
}

/// The one ONNX Runtime initialisation every command shares (serve, quantize, bench, analyze):
/// locate the library (an explicit path wins) and build the process-wide environment.
pub fn load_environment(explicit: Option<&Path>) -> Result<Environment, OrtSetupError> {
    init_environment(&locate_library(explicit)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_missing_path_is_reported() {
        let err = locate_library(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/libonnxruntime.so does not exist"));
    }

    #[test]
    fn a_file_that_is_not_a_library_fails_to_load_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join(ORT_LIBRARY_FILE);
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let err = init_environment(&fake).unwrap_err();
        assert!(matches!(err, OrtSetupError::Load { .. }), "{err}");
    }
}

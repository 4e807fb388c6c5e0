//! Scanning a model repository directory.

use std::path::{Path, PathBuf};

use crate::policy::{Policy, PolicyError};

pub const MODEL_FILE: &str = "model.onnx";
pub const POLICY_FILE: &str = "policy.yaml";

/// One model found in the repository.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub name: String,
    pub directory: PathBuf,
    pub model_path: PathBuf,
    pub policy: Policy,
}

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("model repository {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("model repository {0} contains no models (expected <store>/<model>/{MODEL_FILE})")]
    Empty(PathBuf),
    #[error("model directory {directory} has no {MODEL_FILE}")]
    MissingModel { directory: PathBuf },
    #[error("model directory name {0:?} is not a valid model name (letters, digits, '_', '-', '.')")]
    InvalidName(PathBuf),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Lists every model under `store`, sorted by name. Hidden directories are ignored; a directory
/// without `model.onnx` is an error rather than a silently missing model.
pub fn scan_repository(store: &Path) -> Result<Vec<ModelEntry>, RepositoryError> {
    let io_error = |source| RepositoryError::Io { path: store.to_owned(), source };
    let mut entries = Vec::new();
    for dir_entry in std::fs::read_dir(store).map_err(io_error)? {
        let dir_entry = dir_entry.map_err(io_error)?;
        let directory = dir_entry.path();
        let file_name = dir_entry.file_name();
        let Some(name) = file_name.to_str() else {
            return Err(RepositoryError::InvalidName(directory));
        };
        if name.starts_with('.') || !directory.is_dir() {
            continue;
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            return Err(RepositoryError::InvalidName(directory));
        }
        let model_path = directory.join(MODEL_FILE);
        if !model_path.is_file() {
            return Err(RepositoryError::MissingModel { directory });
        }
        let policy_path = directory.join(POLICY_FILE);
        let policy = if policy_path.exists() {
            Policy::load(&policy_path)?
        } else {
            tracing::info!(model = name, "no {POLICY_FILE}; serving the fp32 variant with default settings");
            Policy::default_fp32()
        };
        entries.push(ModelEntry { name: name.to_owned(), directory, model_path, policy });
    }
    if entries.is_empty() {
        return Err(RepositoryError::Empty(store.to_owned()));
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_models_and_defaults_missing_policy() {
        let store = tempfile::tempdir().unwrap();
        for name in ["b_model", "a_model"] {
            std::fs::create_dir(store.path().join(name)).unwrap();
            std::fs::write(store.path().join(name).join(MODEL_FILE), b"onnx").unwrap();
        }
        std::fs::create_dir(store.path().join(".cache")).unwrap();
        std::fs::write(
            store.path().join("a_model").join(POLICY_FILE),
            "serving:\n  instances: 3\nvariants:\n  fp32:\n    precision: fp32\n",
        )
        .unwrap();
        let entries = scan_repository(store.path()).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a_model", "b_model"]);
        assert_eq!(entries[0].policy.variants[0].serving.instances, 3);
        assert_eq!(entries[1].policy, Policy::default_fp32());
    }

    #[test]
    fn directory_without_model_is_an_error() {
        let store = tempfile::tempdir().unwrap();
        std::fs::create_dir(store.path().join("empty")).unwrap();
        let err = scan_repository(store.path()).unwrap_err();
        assert!(matches!(err, RepositoryError::MissingModel { .. }), "{err}");
    }

    #[test]
    fn policy_errors_propagate_with_location() {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(MODEL_FILE), b"onnx").unwrap();
        std::fs::write(dir.join(POLICY_FILE), "variants:\n  fp32:\n    precison: fp32\n").unwrap();
        let message = scan_repository(store.path()).unwrap_err().to_string();
        assert!(message.contains("policy.yaml:3"), "{message}");
        assert!(message.contains("precison"), "{message}");
    }
}

//! Content-addressed cache of built variants. The key covers everything the artifact depends
//! on (the model file, the variant's pass options, its calibration data and the quantizer
//! version), so a changed input can never hit a stale artifact. Artifacts are written
//! atomically (temporary file, then rename) with a manifest holding their SHA-256, and
//! verified on every load: a corrupt or truncated artifact is rebuilt with a warning.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use mantissa_runtime::ModelSource;

use crate::facts::BuildFacts;

/// Bumped whenever a pass changes its output for the same inputs.
pub const QUANTIZER_VERSION: &str = "mantissa-quantize/3";

#[derive(Debug, Clone)]
pub struct ArtifactCache {
    root: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    sha256: String,
    bytes: usize,
    facts: BuildFacts,
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_file(hasher: &mut Sha256, path: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut buffer = vec![0; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(());
        }
        hasher.update(&buffer[..read]);
    }
}

impl ArtifactCache {
    pub fn new(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    /// The key of an artifact built from `files` (model, external data, calibration samples)
    /// with `recipe` (the variant's pass options, serialized as JSON: a stable form, unlike
    /// `Debug` text).
    pub fn key(files: &[PathBuf], recipe: &impl Serialize) -> std::io::Result<String> {
        let mut hasher = Sha256::new();
        hasher.update(QUANTIZER_VERSION.as_bytes());
        hasher.update([0]);
        hasher.update(serde_json::to_vec(recipe)?);
        for file in files {
            hasher.update([0]);
            hasher.update(file.file_name().and_then(|n| n.to_str()).unwrap_or("").as_bytes());
            hash_file(&mut hasher, file)?;
        }
        Ok(hex(&hasher.finalize()))
    }

    fn paths(&self, model: &str, variant: &str, key: &str) -> (PathBuf, PathBuf) {
        let directory = self.root.join(model);
        let stem = format!("{variant}-{}", &key[..32]);
        (directory.join(format!("{stem}.onnx")), directory.join(format!("{stem}.json")))
    }

    /// Where TensorRT keeps the engines it builds for one variant, named by the variant's
    /// model bytes. TensorRT's own engine names hash the graph's structure, not its weights, so
    /// a re-quantized artifact of the same shape would otherwise load the old engine.
    pub fn engine_cache_dir(&self, model: &str, variant: &str, source: &ModelSource) -> std::io::Result<PathBuf> {
        let digest = match source {
            ModelSource::Memory(bytes) => hex(&Sha256::digest(bytes)),
            ModelSource::File(path) => {
                let mut hasher = Sha256::new();
                hash_file(&mut hasher, path)?;
                hex(&hasher.finalize())
            }
        };
        Ok(self.root.join(model).join("tensorrt").join(format!("{variant}-{}", &digest[..32])))
    }

    /// The cached artifact and its build facts, if present and intact.
    pub fn load(&self, model: &str, variant: &str, key: &str) -> Option<(Vec<u8>, BuildFacts)> {
        let (artifact, manifest) = self.paths(model, variant, key);
        let manifest_text = std::fs::read_to_string(&manifest).ok()?;
        let Ok(manifest_data) = serde_json::from_str::<Manifest>(&manifest_text) else {
            tracing::warn!(path = %manifest.display(), "cache manifest unreadable; rebuilding the variant");
            return None;
        };
        let bytes = match std::fs::read(&artifact) {
            Ok(bytes) => bytes,
            Err(err) => {
                tracing::warn!(path = %artifact.display(), error = %err, "cached artifact missing; rebuilding the variant");
                return None;
            }
        };
        let digest = hex(&Sha256::digest(&bytes));
        if bytes.len() != manifest_data.bytes || digest != manifest_data.sha256 {
            tracing::warn!(
                path = %artifact.display(),
                expected_bytes = manifest_data.bytes,
                found_bytes = bytes.len(),
                "cached artifact is corrupt or truncated; rebuilding the variant"
            );
            return None;
        }
        Some((bytes, manifest_data.facts))
    }

    /// Stores an artifact atomically: readers see either nothing or the whole of it.
    pub fn store(
        &self,
        model: &str,
        variant: &str,
        key: &str,
        bytes: &[u8],
        facts: &BuildFacts,
    ) -> std::io::Result<()> {
        let (artifact, manifest) = self.paths(model, variant, key);
        if let Some(directory) = artifact.parent() {
            std::fs::create_dir_all(directory)?;
        }
        let manifest_data = Manifest { sha256: hex(&Sha256::digest(bytes)), bytes: bytes.len(), facts: facts.clone() };
        write_atomically(&artifact, bytes)?;
        write_atomically(&manifest, serde_json::to_string_pretty(&manifest_data).unwrap_or_default().as_bytes())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_loads_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path().to_owned()).unwrap();
        let model = dir.path().join("model.onnx");
        std::fs::write(&model, b"model bytes").unwrap();
        let key = ArtifactCache::key(std::slice::from_ref(&model), &"fp16 {}").unwrap();
        assert_ne!(key, ArtifactCache::key(std::slice::from_ref(&model), &"fp16 {keep_io_types: false}").unwrap());
        let facts = BuildFacts::new(mantissa_model_store::Precision::Fp16);
        cache.store("m", "fp16", &key, b"artifact", &facts).unwrap();
        assert_eq!(cache.load("m", "fp16", &key), Some((b"artifact".to_vec(), facts)));

        // Truncate the artifact: the load refuses it.
        let (artifact, _) = cache.paths("m", "fp16", &key);
        std::fs::write(&artifact, b"artif").unwrap();
        assert_eq!(cache.load("m", "fp16", &key), None);

        // Engines are kept per model bytes.
        let engines = |bytes: &[u8]| cache.engine_cache_dir("m", "trt", &ModelSource::Memory(bytes.into())).unwrap();
        assert_eq!(engines(b"a"), engines(b"a"));
        assert_ne!(engines(b"a"), engines(b"b"));
        assert!(engines(b"a").starts_with(dir.path().join("m/tensorrt")));
        assert_eq!(
            cache.engine_cache_dir("m", "trt", &ModelSource::File(model.clone())).unwrap(),
            engines(b"model bytes")
        );

        // A changed model file changes the key.
        std::fs::write(&model, b"other model").unwrap();
        assert_ne!(ArtifactCache::key(&[model], &"fp16 {}").unwrap(), key);
    }
}

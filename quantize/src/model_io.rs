//! Loading and saving ONNX models, with external-data initializers read into memory on load
//! and written to one side file on save (automatically when the model would pass protobuf's
//! 2 GiB limit).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::onnx::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};

/// Protobuf messages cannot exceed 2 GiB; keep a margin for the graph itself.
const PROTOBUF_LIMIT: usize = (2 << 30) - (64 << 20);
const EXTERNAL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ModelIoError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid ONNX model: {source}")]
    Decode { path: PathBuf, source: prost::DecodeError },
    #[error("{path}: tensor '{tensor}': {message}")]
    ExternalData { path: PathBuf, tensor: String, message: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ModelIoError + '_ {
    move |source| ModelIoError::Io { path: path.to_owned(), source }
}

/// Reads a model and every external-data tensor it references (relative to its directory).
pub fn load_model(path: &Path) -> Result<ModelProto, ModelIoError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let mut model = load_model_from_bytes(&bytes, path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for_each_tensor_mut(&mut model, &mut |tensor| read_external(tensor, base, path))?;
    Ok(model)
}

/// Decodes model bytes; `origin` names the source in errors. External data is not resolved.
pub fn load_model_from_bytes(bytes: &[u8], origin: &Path) -> Result<ModelProto, ModelIoError> {
    ModelProto::decode(bytes).map_err(|source| ModelIoError::Decode { path: origin.to_owned(), source })
}

/// Encodes a model that holds all its data inline.
pub fn to_bytes(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Where to put tensor data on save.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Write tensors of at least `threshold` bytes to this file (relative to the model's
    /// directory). `None` keeps data inline unless the model would pass 2 GiB.
    pub external_file: Option<String>,
    pub threshold: usize,
}

/// Writes `model` to `path`, moving large tensors to an external-data file when asked or when
/// the model would not fit in one protobuf message.
pub fn save_model(model: &ModelProto, path: &Path, options: &SaveOptions) -> Result<(), ModelIoError> {
    save_model_with_limit(model, path, options, PROTOBUF_LIMIT)
}

fn save_model_with_limit(
    model: &ModelProto,
    path: &Path,
    options: &SaveOptions,
    inline_limit: usize,
) -> Result<(), ModelIoError> {
    let needs_external = options.external_file.is_some() || model.encoded_len() > inline_limit;
    if !needs_external {
        return write_atomically(path, &model.encode_to_vec());
    }
    let file_name = options
        .external_file
        .clone()
        .unwrap_or_else(|| format!("{}.data", path.file_name().and_then(|n| n.to_str()).unwrap_or("model.onnx")));
    let threshold = if options.external_file.is_some() { options.threshold } else { 1024 };
    let base = path.parent().unwrap_or(Path::new("."));
    let data_path = base.join(&file_name);
    let mut data = File::create(&data_path).map_err(io_error(&data_path))?;
    let mut model = model.clone();
    let mut offset = 0u64;
    for_each_tensor_mut(&mut model, &mut |tensor| {
        let Some(raw) = tensor.raw_data.take() else {
            return Ok(());
        };
        if raw.len() < threshold {
            tensor.raw_data = Some(raw);
            return Ok(());
        }
        // Align each tensor to 4 KiB so readers can memory-map it.
        let padding = (4096 - offset % 4096) % 4096;
        data.write_all(&vec![0; padding as usize]).map_err(io_error(&data_path))?;
        offset += padding;
        data.write_all(&raw).map_err(io_error(&data_path))?;
        tensor.data_location = Some(EXTERNAL);
        tensor.external_data = vec![
            entry("location", &file_name),
            entry("offset", &offset.to_string()),
            entry("length", &raw.len().to_string()),
        ];
        offset += raw.len() as u64;
        Ok(())
    })?;
    data.sync_all().map_err(io_error(&data_path))?;
    write_atomically(path, &model.encode_to_vec())
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: Some(key.to_owned()), value: Some(value.to_owned()) }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ModelIoError> {
    let temporary = path.with_extension("onnx.partial");
    std::fs::write(&temporary, bytes).map_err(io_error(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io_error(path))
}

fn read_external(tensor: &mut TensorProto, base: &Path, model_path: &Path) -> Result<(), ModelIoError> {
    if tensor.data_location != Some(EXTERNAL) {
        return Ok(());
    }
    let name = tensor.name().to_owned();
    let fail =
        |message: String| ModelIoError::ExternalData { path: model_path.to_owned(), tensor: name.clone(), message };
    let value = |key: &str| tensor.external_data.iter().find(|e| e.key() == key).map(|e| e.value().to_owned());
    let location = value("location").ok_or_else(|| fail("external data without a location".to_owned()))?;
    if Path::new(&location).is_absolute() || location.split(['/', '\\']).any(|part| part == "..") {
        return Err(fail(format!("external data location '{location}' must stay inside the model's directory")));
    }
    let parse = |key: &str| -> Result<Option<u64>, ModelIoError> {
        value(key)
            .map(|text| text.parse::<u64>().map_err(|_| fail(format!("{key} '{text}' is not a number"))))
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?;
    let data_path = base.join(&location);
    let mut file = File::open(&data_path).map_err(|err| fail(format!("{}: {err}", data_path.display())))?;
    let size = file.metadata().map_err(io_error(&data_path))?.len();
    let length = length.unwrap_or(size.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(fail(format!("offset {offset} + length {length} exceeds {} ({size} bytes)", data_path.display())));
    }
    file.seek(SeekFrom::Start(offset)).map_err(io_error(&data_path))?;
    let mut raw = vec![0; length as usize];
    file.read_exact(&mut raw).map_err(io_error(&data_path))?;
    tensor.raw_data = Some(raw);
    tensor.data_location = None;
    tensor.external_data.clear();
    Ok(())
}

/// Visits every tensor of the model: initializers and tensor attributes, in every subgraph.
fn for_each_tensor_mut<E>(
    model: &mut ModelProto,
    visit: &mut impl FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(graph) = model.graph.as_mut() {
        visit_graph_tensors(graph, visit)?;
    }
    for function in &mut model.functions {
        for node in &mut function.node {
            for attribute in &mut node.attribute {
                visit_attribute_tensors(attribute, visit)?;
            }
        }
    }
    Ok(())
}

fn visit_graph_tensors<E>(
    graph: &mut GraphProto,
    visit: &mut impl FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    for tensor in &mut graph.initializer {
        visit(tensor)?;
    }
    for sparse in &mut graph.sparse_initializer {
        if let Some(values) = sparse.values.as_mut() {
            visit(values)?;
        }
        if let Some(indices) = sparse.indices.as_mut() {
            visit(indices)?;
        }
    }
    for node in &mut graph.node {
        for attribute in &mut node.attribute {
            visit_attribute_tensors(attribute, visit)?;
        }
    }
    Ok(())
}

fn visit_attribute_tensors<E>(
    attribute: &mut crate::onnx::AttributeProto,
    visit: &mut impl FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(tensor) = attribute.t.as_mut() {
        visit(tensor)?;
    }
    for tensor in &mut attribute.tensors {
        visit(tensor)?;
    }
    if let Some(graph) = attribute.g.as_mut() {
        visit_graph_tensors(graph, visit)?;
    }
    for graph in &mut attribute.graphs {
        visit_graph_tensors(graph, visit)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::GraphProto;

    fn model_with_weight(bytes: usize) -> ModelProto {
        let weight = TensorProto {
            name: Some("w".into()),
            dims: vec![(bytes / 4) as i64],
            data_type: Some(1),
            raw_data: Some((0..bytes).map(|i| (i % 251) as u8).collect()),
            ..Default::default()
        };
        ModelProto {
            ir_version: Some(8),
            graph: Some(GraphProto { initializer: vec![weight], ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn models_over_the_protobuf_limit_move_weights_to_external_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.onnx");
        let model = model_with_weight(8192);
        // A limit below the model's size stands in for protobuf's 2 GiB.
        save_model_with_limit(&model, &path, &SaveOptions::default(), 4096).unwrap();
        assert!(dir.path().join("big.onnx.data").is_file());
        assert!(std::fs::metadata(&path).unwrap().len() < 4096);
        assert_eq!(load_model(&path).unwrap(), model);
    }

    #[test]
    fn external_data_outside_the_model_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let mut model = model_with_weight(64);
        let tensor = &mut model.graph.as_mut().unwrap().initializer[0];
        tensor.raw_data = None;
        tensor.data_location = Some(EXTERNAL);
        tensor.external_data = vec![entry("location", "../../etc/passwd")];
        std::fs::write(&path, model.encode_to_vec()).unwrap();
        let err = load_model(&path).unwrap_err().to_string();
        assert!(err.contains("must stay inside the model's directory"), "{err}");
    }

    #[test]
    fn truncated_external_data_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let options = SaveOptions { external_file: Some("w.bin".into()), threshold: 0 };
        save_model(&model_with_weight(4096), &path, &options).unwrap();
        let data = dir.path().join("w.bin");
        let bytes = std::fs::read(&data).unwrap();
        std::fs::write(&data, &bytes[..100]).unwrap();
        let err = load_model(&path).unwrap_err().to_string();
        assert!(err.contains("tensor 'w'") && err.contains("exceeds"), "{err}");
    }
}

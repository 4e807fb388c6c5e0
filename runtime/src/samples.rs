//! Sample files: model inputs from `.npz` files (keys = input names) and `.npy` files
//! (single-input models), as used by calibration data, holdout data and
//! `mantissa bench --input-data`; and the directories that hold them.

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, ReadNpyExt};

use crate::datatype::DataType;
use crate::error::RuntimeError;
use crate::signature::ModelSignature;
use crate::tensor::{InferenceRequest, InputTensor, TensorData};

/// One input array in wire form.
#[derive(Debug, Clone, PartialEq)]
pub struct InputArray {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    /// Little-endian, row-major.
    pub raw: Vec<u8>,
}

macro_rules! to_raw {
    ($array:expr) => {{
        let array = $array;
        let shape = array.shape().to_vec();
        let raw: Vec<u8> = array.iter().flat_map(|v| v.to_le_bytes()).collect();
        (shape, raw)
    }};
}

/// Reads the arrays for `inputs` (name, datatype) from an `.npz` file, or from an `.npy` file
/// when the model has a single input. Errors name the file, the input and what was wrong.
pub fn read_inputs(path: &Path, inputs: &[(String, DataType)]) -> Result<Vec<InputArray>, RuntimeError> {
    read_arrays(path, inputs).map_err(RuntimeError::Sample)
}

fn read_arrays(path: &Path, inputs: &[(String, DataType)]) -> Result<Vec<InputArray>, String> {
    let is_npy = path.extension().is_some_and(|e| e == "npy");
    if is_npy && inputs.len() != 1 {
        return Err(format!(
            "{}: .npy files hold one array, but the model has {} inputs; use .npz",
            path.display(),
            inputs.len()
        ));
    }
    let open = || std::fs::File::open(path).map_err(|err| format!("{}: {err}", path.display()));
    let mut npz =
        if is_npy { None } else { Some(NpzReader::new(open()?).map_err(|err| format!("{}: {err}", path.display()))?) };
    let mut arrays = Vec::with_capacity(inputs.len());
    for (name, datatype) in inputs {
        let context = |err: String| format!("{}: input '{name}' ({datatype}): {err}", path.display());
        macro_rules! read {
            ($t:ty) => {{
                let array: ArrayD<$t> = match npz.as_mut() {
                    Some(npz) => {
                        let names = npz.names().unwrap_or_default();
                        if !names.iter().any(|n| n == name || n == &format!("{name}.npy")) {
                            return Err(context(format!("missing; the file holds {names:?}")));
                        }
                        npz.by_name::<OwnedRepr<$t>, IxDyn>(name)
                            .or_else(|_| npz.by_name::<OwnedRepr<$t>, IxDyn>(&format!("{name}.npy")))
                            .map_err(|err| context(format!("{err} (expected dtype {})", stringify!($t))))?
                    }
                    None => ArrayD::<$t>::read_npy(open()?)
                        .map_err(|err| context(format!("{err} (expected dtype {})", stringify!($t))))?,
                };
                to_raw!(array)
            }};
        }
        let (shape, raw) = match datatype {
            DataType::Fp32 => read!(f32),
            DataType::Fp64 => read!(f64),
            DataType::Int64 => read!(i64),
            DataType::Int32 => read!(i32),
            DataType::Int16 => read!(i16),
            DataType::Int8 => read!(i8),
            DataType::Uint8 => read!(u8),
            DataType::Uint16 => read!(u16),
            DataType::Uint32 => read!(u32),
            DataType::Uint64 => read!(u64),
            other => return Err(context(format!("{other} inputs cannot be read from .npy/.npz files"))),
        };
        arrays.push(InputArray { name: name.clone(), datatype: *datatype, shape, raw });
    }
    Ok(arrays)
}

/// The arrays an `.npz` file holds, by name (without `.npy`) and datatype, in the file's
/// order: for callers that have no signature to say what to read (`mantissa bench` against a
/// server whose metadata lists no inputs).
pub fn npz_arrays(path: &Path) -> Result<Vec<(String, DataType)>, RuntimeError> {
    let context = |err: String| RuntimeError::Sample(format!("{}: {err}", path.display()));
    let file = std::fs::File::open(path).map_err(|err| context(err.to_string()))?;
    let mut npz = NpzReader::new(file).map_err(|err| context(err.to_string()))?;
    let names = npz.names().map_err(|err| context(err.to_string()))?;
    let mut arrays = Vec::with_capacity(names.len());
    for stored in names {
        // The header says the dtype, but ndarray-npy only reads it with a type in hand: the
        // array's type is the one that reads.
        macro_rules! reads_as {
            ($t:ty) => {
                npz.by_name::<OwnedRepr<$t>, IxDyn>(&stored).is_ok()
            };
        }
        let datatype = if reads_as!(f32) {
            DataType::Fp32
        } else if reads_as!(i64) {
            DataType::Int64
        } else if reads_as!(i32) {
            DataType::Int32
        } else if reads_as!(f64) {
            DataType::Fp64
        } else if reads_as!(u8) {
            DataType::Uint8
        } else if reads_as!(i8) {
            DataType::Int8
        } else if reads_as!(i16) {
            DataType::Int16
        } else if reads_as!(u16) {
            DataType::Uint16
        } else if reads_as!(u32) {
            DataType::Uint32
        } else if reads_as!(u64) {
            DataType::Uint64
        } else {
            return Err(context(format!("array '{stored}' has a dtype that cannot be sent as a tensor")));
        };
        arrays.push((stored.strip_suffix(".npy").unwrap_or(&stored).to_owned(), datatype));
    }
    Ok(arrays)
}

/// The `.npz`/`.npy` files of a calibration or holdout directory, sorted (or the one file,
/// when `directory` is a file).
pub fn sample_files(directory: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    if directory.is_file() {
        return Ok(vec![directory.to_owned()]);
    }
    let entries = std::fs::read_dir(directory)
        .map_err(|err| RuntimeError::Sample(format!("calibration data {}: {err}", directory.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "npz" || e == "npy"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(RuntimeError::Sample(format!(
            "calibration data {} holds no .npz or .npy files",
            directory.display()
        )));
    }
    Ok(files)
}

/// Reads one sample and checks it against the model's inputs: every input present, with the
/// model's element type and rank, fixed dimensions matching. The request asks for no outputs;
/// callers choose them.
pub fn load_sample(path: &Path, signature: &ModelSignature) -> Result<InferenceRequest, RuntimeError> {
    let wanted: Vec<(String, DataType)> = signature.inputs.iter().map(|s| (s.name.clone(), s.datatype)).collect();
    let arrays = read_inputs(path, &wanted)?;
    let mut inputs = Vec::with_capacity(arrays.len());
    for (array, spec) in arrays.into_iter().zip(&signature.inputs) {
        let shape: Vec<i64> = array.shape.iter().map(|&d| d as i64).collect();
        let matches =
            shape.len() == spec.dims.len() && shape.iter().zip(&spec.dims).all(|(&got, &want)| want < 0 || got == want);
        if !matches {
            return Err(RuntimeError::Sample(format!(
                "{}: input '{}': expected shape {:?}, got {shape:?}",
                path.display(),
                spec.name,
                spec.dims
            )));
        }
        inputs.push(InputTensor { datatype: array.datatype, shape, data: TensorData::Raw(array.raw) });
    }
    Ok(InferenceRequest { id: path.display().to_string(), inputs, outputs: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray_npy::{NpzWriter, WriteNpyExt};

    #[test]
    fn reads_npz_and_npy_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let npz_path = dir.path().join("sample.npz");
        let mut writer = NpzWriter::new(std::fs::File::create(&npz_path).unwrap());
        writer.add_array("x", &ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0]])).unwrap();
        writer.add_array("ids", &ndarray::arr1(&[7i64])).unwrap();
        writer.finish().unwrap();
        let inputs = vec![("x".to_owned(), DataType::Fp32), ("ids".to_owned(), DataType::Int64)];
        let arrays = read_inputs(&npz_path, &inputs).unwrap();
        assert_eq!(arrays[0].shape, vec![2, 2]);
        assert_eq!(arrays[1].raw, 7i64.to_le_bytes().to_vec());

        let missing = read_inputs(&npz_path, &[("y".to_owned(), DataType::Fp32)]).unwrap_err().to_string();
        assert!(missing.contains("input 'y' (FP32): missing; the file holds"), "{missing}");
        let wrong_type = read_inputs(&npz_path, &[("x".to_owned(), DataType::Int64)]).unwrap_err().to_string();
        assert!(wrong_type.contains("input 'x' (INT64)") && wrong_type.contains("expected dtype i64"), "{wrong_type}");

        let npy_path = dir.path().join("single.npy");
        ndarray::arr1(&[1u8, 2, 3]).write_npy(std::fs::File::create(&npy_path).unwrap()).unwrap();
        assert_eq!(read_inputs(&npy_path, &[("x".to_owned(), DataType::Uint8)]).unwrap()[0].raw, vec![1, 2, 3]);
        assert!(read_inputs(&npy_path, &inputs).unwrap_err().to_string().contains("use .npz"));
    }
}

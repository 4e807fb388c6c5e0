//! Which inputs `mantissa bench` sends, with what datatype and shape, when the server's
//! metadata says all of it, part of it (`-1` in dimensions other than the batch) or nothing
//! (a v2 server whose model declares no inputs lists none). What the metadata leaves open comes
//! from `--shape NAME=D0,D1,...` and `--datatype NAME=TYPE`, or from the arrays of the
//! `--input-data` file.

use std::path::Path;

use mantissa_proto::inference::model_metadata_response::TensorMetadata;
use mantissa_runtime::DataType;
use mantissa_runtime::samples::npz_arrays;

/// `--shape NAME=D0,D1,...`: the whole shape of one request's input, batch dimension included.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeArg {
    pub name: String,
    pub dims: Vec<i64>,
}

/// `--datatype NAME=TYPE`, for inputs the metadata does not list.
#[derive(Debug, Clone, PartialEq)]
pub struct DatatypeArg {
    pub name: String,
    pub datatype: DataType,
}

fn split_named(text: &str, flag: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() && !value.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected {flag} NAME=VALUE, got '{text}'")),
    }
}

pub fn shape_arg(text: &str) -> Result<ShapeArg, String> {
    let (name, value) = split_named(text, "--shape")?;
    let dims = value
        .split(',')
        .map(|dim| dim.trim().parse::<i64>().ok().filter(|&d| d >= 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("--shape {name}: expected dimensions like 1,3,224,224 (each >= 0), got '{value}'"))?;
    Ok(ShapeArg { name, dims })
}

pub fn datatype_arg(text: &str) -> Result<DatatypeArg, String> {
    let (name, value) = split_named(text, "--datatype")?;
    let datatype = DataType::parse(&value.to_ascii_uppercase())
        .ok_or_else(|| format!("--datatype {name}: unknown datatype '{value}' (e.g. FP32, INT64, BYTES)"))?;
    Ok(DatatypeArg { name, datatype })
}

/// One input as it will be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// What the command line says about inputs besides the metadata.
#[derive(Debug, Clone, Copy)]
pub struct Overrides<'a> {
    pub shapes: &'a [ShapeArg],
    pub datatypes: &'a [DatatypeArg],
    pub batch_size: usize,
}

/// The inputs to fill with random data: the metadata's, each shape completed by `--shape`
/// (or, for a batching input, by `--batch-size` along dimension 0); with no inputs in the
/// metadata, the ones `--shape` names.
pub fn random_inputs(model: &str, metadata: &[TensorMetadata], flags: Overrides) -> Result<Vec<InputSpec>, String> {
    check_flags_name_inputs(model, metadata, flags)?;
    if metadata.is_empty() {
        if flags.shapes.is_empty() {
            return Err(format!(
                "the server's metadata for '{model}' lists no inputs; give each one with --shape NAME=D0,D1,... \
                 (and --datatype NAME=TYPE unless it is FP32), or send rows of --input-data FILE.npz"
            ));
        }
        return Ok(flags
            .shapes
            .iter()
            .map(|shape| InputSpec {
                name: shape.name.clone(),
                datatype: datatype_flag(flags, &shape.name).unwrap_or(DataType::Fp32),
                shape: shape.dims.clone(),
            })
            .collect());
    }
    metadata.iter().map(|input| complete(model, input, flags)).collect()
}

/// One listed input: its datatype, and its shape from `--shape` or from the metadata.
fn complete(model: &str, input: &TensorMetadata, flags: Overrides) -> Result<InputSpec, String> {
    let name = &input.name;
    let datatype = DataType::parse(&input.datatype)
        .ok_or_else(|| format!("the server reports input '{name}' with unknown datatype '{}'", input.datatype))?;
    if let Some(given) = datatype_flag(flags, name)
        && given != datatype
    {
        return Err(format!("--datatype {name}={given}, but the server's metadata says {datatype}"));
    }
    let listed = &input.shape;
    let batching = listed.first() == Some(&-1);
    let shape = match flags.shapes.iter().find(|shape| &shape.name == name) {
        Some(given) => {
            let fits = listed.is_empty()
                || (given.dims.len() == listed.len()
                    && given.dims.iter().zip(listed).all(|(&got, &want)| want < 0 || got == want));
            if !fits {
                return Err(format!("--shape {name}={:?} does not fit the server's shape {listed:?}", given.dims));
            }
            if batching && given.dims[0] != flags.batch_size as i64 {
                return Err(format!(
                    "--shape {name} has {} rows along the batch dimension, but --batch-size is {}",
                    given.dims[0], flags.batch_size
                ));
            }
            given.dims.clone()
        }
        None if listed.is_empty() => {
            return Err(format!(
                "the server's metadata gives no shape for input '{name}' of '{model}'; give it with --shape {name}=D0,D1,..."
            ));
        }
        None => {
            let mut shape = listed.clone();
            if batching {
                shape[0] = flags.batch_size as i64;
            }
            if shape.contains(&-1) {
                return Err(format!(
                    "input '{name}' of '{model}' has variable dimensions {listed:?} that only the batch size does not fix; \
                     give its shape with --shape {name}=D0,D1,... or send rows of --input-data FILE.npz"
                ));
            }
            shape
        }
    };
    Ok(InputSpec { name: name.clone(), datatype, shape })
}

/// The inputs to read from the `--input-data` file (whose arrays give the shapes): the
/// metadata's, or every array of the file when the metadata lists none.
pub fn file_inputs(
    model: &str,
    metadata: &[TensorMetadata],
    flags: Overrides,
    path: &Path,
) -> Result<Vec<(String, DataType)>, String> {
    check_flags_name_inputs(model, metadata, flags)?;
    if !metadata.is_empty() {
        return metadata
            .iter()
            .map(|input| {
                DataType::parse(&input.datatype).map(|datatype| (input.name.clone(), datatype)).ok_or_else(|| {
                    format!("the server reports input '{}' with unknown datatype '{}'", input.name, input.datatype)
                })
            })
            .collect();
    }
    if path.extension().is_some_and(|e| e == "npy") {
        return Err(format!(
            "the server's metadata for '{model}' lists no inputs, so the arrays must be named: use an .npz file \
             (keys = input names) instead of {}",
            path.display()
        ));
    }
    let arrays = npz_arrays(path).map_err(|err| err.to_string())?;
    if arrays.is_empty() {
        return Err(format!("{} holds no arrays", path.display()));
    }
    Ok(arrays)
}

fn datatype_flag(flags: Overrides, name: &str) -> Option<DataType> {
    flags.datatypes.iter().find(|flag| flag.name == name).map(|flag| flag.datatype)
}

/// A `--shape` or `--datatype` for an input the metadata does not list is a typo when the
/// metadata lists any.
fn check_flags_name_inputs(model: &str, metadata: &[TensorMetadata], flags: Overrides) -> Result<(), String> {
    if metadata.is_empty() {
        return Ok(());
    }
    let names = flags
        .shapes
        .iter()
        .map(|s| ("--shape", &s.name))
        .chain(flags.datatypes.iter().map(|d| ("--datatype", &d.name)));
    for (flag, name) in names {
        if !metadata.iter().any(|input| &input.name == name) {
            let known: Vec<&str> = metadata.iter().map(|input| input.name.as_str()).collect();
            return Err(format!("{flag} {name}: '{model}' has no input '{name}'; its inputs are {known:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
        TensorMetadata { name: name.to_owned(), datatype: datatype.to_owned(), shape: shape.to_vec() }
    }

    fn flags<'a>(shapes: &'a [ShapeArg], datatypes: &'a [DatatypeArg], batch_size: usize) -> Overrides<'a> {
        Overrides { shapes, datatypes, batch_size }
    }

    #[test]
    fn flags_parse() {
        assert_eq!(shape_arg("x=1,3,224,224").unwrap(), ShapeArg { name: "x".into(), dims: vec![1, 3, 224, 224] });
        assert!(shape_arg("x=1,-1").unwrap_err().contains("each >= 0"));
        assert!(shape_arg("=1").unwrap_err().contains("NAME=VALUE"));
        assert_eq!(datatype_arg("ids=int64").unwrap().datatype, DataType::Int64);
        assert!(datatype_arg("ids=int5").unwrap_err().contains("unknown datatype 'int5'"));
    }

    #[test]
    fn the_batch_dimension_follows_the_batch_size() {
        let metadata = [listed("input", "FP32", &[-1, 1, 8, 8])];
        let specs = random_inputs("m", &metadata, flags(&[], &[], 8)).unwrap();
        assert_eq!(specs, [InputSpec { name: "input".into(), datatype: DataType::Fp32, shape: vec![8, 1, 8, 8] }]);
    }

    #[test]
    fn other_variable_dimensions_need_a_shape() {
        let metadata = [listed("x", "FP32", &[-1, -1])];
        let err = random_inputs("m", &metadata, flags(&[], &[], 4)).unwrap_err();
        assert!(
            err.contains("input 'x' of 'm' has variable dimensions [-1, -1]") && err.contains("--shape x="),
            "{err}"
        );
        let shapes = [shape_arg("x=4,32").unwrap()];
        assert_eq!(random_inputs("m", &metadata, flags(&shapes, &[], 4)).unwrap()[0].shape, [4, 32]);
        // The shape must fit what the server says, and carry --batch-size rows.
        let err = random_inputs("m", &metadata, flags(&shapes, &[], 8)).unwrap_err();
        assert!(err.contains("4 rows along the batch dimension, but --batch-size is 8"), "{err}");
        let fixed = [listed("x", "FP32", &[-1, 16])];
        let err = random_inputs("m", &fixed, flags(&shapes, &[], 4)).unwrap_err();
        assert!(err.contains("does not fit the server's shape [-1, 16]"), "{err}");
    }

    #[test]
    fn without_inputs_in_the_metadata_the_flags_name_them() {
        let err = random_inputs("m", &[], flags(&[], &[], 1)).unwrap_err();
        assert!(err.contains("lists no inputs"), "{err}");
        let shapes = [shape_arg("pixels=1,3,4,4").unwrap(), shape_arg("ids=1,7").unwrap()];
        let datatypes = [datatype_arg("ids=INT64").unwrap()];
        let specs = random_inputs("m", &[], flags(&shapes, &datatypes, 1)).unwrap();
        assert_eq!(
            specs,
            [
                InputSpec { name: "pixels".into(), datatype: DataType::Fp32, shape: vec![1, 3, 4, 4] },
                InputSpec { name: "ids".into(), datatype: DataType::Int64, shape: vec![1, 7] },
            ]
        );
    }

    #[test]
    fn flags_for_inputs_the_metadata_does_not_list_are_typos() {
        let metadata = [listed("input", "FP32", &[-1, 4])];
        let shapes = [shape_arg("inputs=1,4").unwrap()];
        let err = random_inputs("m", &metadata, flags(&shapes, &[], 1)).unwrap_err();
        assert!(err.contains("'m' has no input 'inputs'; its inputs are [\"input\"]"), "{err}");
        let datatypes = [datatype_arg("input=INT64").unwrap()];
        let err = random_inputs("m", &metadata, flags(&[], &datatypes, 1)).unwrap_err();
        assert!(err.contains("metadata says FP32"), "{err}");
    }

    #[test]
    fn without_inputs_in_the_metadata_the_file_names_them() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("data.npz");
        let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(&path).unwrap());
        writer.add_array("pixels", &ndarray::Array2::<f32>::zeros((6, 4))).unwrap();
        writer.add_array("ids", &ndarray::Array2::<i64>::zeros((6, 3))).unwrap();
        writer.finish().unwrap();
        let inputs = file_inputs("m", &[], flags(&[], &[], 2), &path).unwrap();
        assert_eq!(inputs, [("pixels".to_owned(), DataType::Fp32), ("ids".to_owned(), DataType::Int64)]);
        let metadata = [listed("pixels", "FP32", &[-1, 4])];
        assert_eq!(
            file_inputs("m", &metadata, flags(&[], &[], 2), &path).unwrap(),
            [("pixels".to_owned(), DataType::Fp32)]
        );
        let err = file_inputs("m", &[], flags(&[], &[], 2), &directory.path().join("x.npy")).unwrap_err();
        assert!(err.contains("use an .npz file"), "{err}");
    }
}

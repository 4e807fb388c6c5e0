//! The frame every INT8 pass runs in: the element-type check of its output and the notes its
//! report carries (see [`super::notes`]).

use super::notes::{Census, notes};
use super::options::{Int8Error, Int8Mode, Int8Report};
use crate::onnx::ModelProto;
use crate::type_check::{ForeignSignatures, check_types};

/// Runs the INT8 pass for `mode` on `model`, checks the element types it leaves (see
/// [`crate::type_check`]) and adds the notes of [`super::notes`] to its report, logging them.
pub(super) fn checked_pass(
    mode: Int8Mode,
    model: &mut ModelProto,
    pass: impl FnOnce(&mut ModelProto) -> Result<Int8Report, Int8Error>,
) -> Result<Int8Report, Int8Error> {
    let signatures = ForeignSignatures::of(model);
    let census = Census::of(model);
    let mut report = pass(model)?;
    check_types(mode.label(), model, &signatures)?;
    report.notes = notes(mode, &census, &report);
    for note in &report.notes {
        tracing::warn!(mode = mode.label(), "int8: {note}");
    }
    Ok(report)
}

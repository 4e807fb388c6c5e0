//! Rendering: the report as text tables, one numbered block per section. Reads the report types
//! only; every value shown was decided when the report was built.

use std::fmt::Write as _;

use super::report::{
    About, DeadReport, InputReport, MaccsSection, OutputPartsReport, Report, SQNR_LIMIT_DB, SaturationReport, Section,
    SensitivitySection, SpreadReport, number,
};

fn optional(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), number)
}

fn flag(flagged: bool) -> &'static str {
    if flagged { "FLAGGED" } else { "ok" }
}

/// Left-aligned columns as wide as their widest cell, indented under the section heading.
fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        out.push_str("   (none)\n");
        return;
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::from("   ");
        for (cell, width) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

/// The numbered title (with the flagged count for sections that flag), then why and what to do.
fn heading(out: &mut String, number: usize, about: &About, flagged: Option<usize>) {
    let _ = write!(out, "\n{number}. {}", about.title);
    if let Some(flagged) = flagged {
        let _ = write!(out, " ({flagged} flagged)");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "   why: {}", about.why);
    let _ = writeln!(out, "   suggestion: {}", about.suggestion);
}

/// The report as human-readable tables.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Quantization readiness of {}", report.model);
    let _ = writeln!(out, "data: {} ({} files, {} items)", report.data, report.samples, report.items);
    render_inputs(&mut out, 1, &report.inputs);
    render_spread(&mut out, 2, &report.channel_spread);
    render_dead(&mut out, 3, &report.dead_channels);
    render_saturation(&mut out, 4, &report.saturation);
    render_maccs(&mut out, 5, &report.maccs);
    render_sensitivity(&mut out, 6, &report.sensitivity);
    render_output_parts(&mut out, 7, &report.output_parts);
    out
}

/// One row per part, the output's name and ratio on its first part's row.
fn render_output_parts(out: &mut String, position: usize, section: &Section<OutputPartsReport>) {
    heading(out, position, &section.about, Some(section.flagged));
    let mut rows = Vec::new();
    for output in &section.items {
        for (index, part) in output.parts.iter().enumerate() {
            let first = index == 0;
            rows.push(vec![
                if first { output.output.clone() } else { String::new() },
                part.label.clone(),
                format!("{}: {}..{}", output.axis, part.start, part.end),
                number(part.width),
                match (first, output.ratio) {
                    (false, _) => String::new(),
                    (true, Some(ratio)) => format!("{ratio:.1}"),
                    (true, None) => "inf".to_owned(),
                },
            ]);
        }
    }
    table(out, &["output", "part", "channels (axis: range)", "range width", "widest / narrowest"], &rows);
}

fn render_inputs(out: &mut String, position: usize, section: &Section<InputReport>) {
    heading(out, position, &section.about, Some(section.flagged));
    let rows: Vec<Vec<String>> = section
        .items
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.datatype.clone(),
                format!("{:?}", i.shape),
                optional(i.min),
                optional(i.max),
                optional(i.mean),
                optional(i.std),
                if i.flagged { format!("FLAGGED: {}", i.reasons.join("; ")) } else { "ok".to_owned() },
            ]
        })
        .collect();
    table(out, &["input", "type", "shape", "min", "max", "mean", "std", "status"], &rows);
}

fn render_spread(out: &mut String, position: usize, section: &Section<SpreadReport>) {
    heading(out, position, &section.about, Some(section.flagged));
    let rows: Vec<Vec<String>> = section
        .items
        .iter()
        .map(|s| {
            vec![
                s.tensor.clone(),
                s.kind.to_owned(),
                format!("{} ({})", s.node, s.op),
                s.axis.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                s.channels.to_string(),
                number(s.widest_range),
                number(s.median_range),
                number(s.narrowest_range),
                s.ratio.map_or_else(|| "inf".to_owned(), |r| format!("{r:.2}")),
                flag(s.flagged).to_owned(),
            ]
        })
        .collect();
    table(
        out,
        &["tensor", "kind", "node", "axis", "channels", "widest", "median", "narrowest", "ratio", "status"],
        &rows,
    );
}

fn render_dead(out: &mut String, position: usize, section: &Section<DeadReport>) {
    heading(out, position, &section.about, Some(section.flagged));
    let rows: Vec<Vec<String>> = section
        .items
        .iter()
        .map(|d| {
            let bounds = format!("[{}, {}]", optional(d.low_bound), optional(d.high_bound));
            vec![
                d.node.clone(),
                if d.relu6 { "Clip (ReLU6)".to_owned() } else { d.op.clone() },
                bounds,
                d.channels.to_string(),
                format!("{} + {}", d.dead_at_low, d.dead_at_high),
                format!("{:.3}", d.dead_fraction),
                flag(d.flagged).to_owned(),
            ]
        })
        .collect();
    table(out, &["node", "op", "bounds", "channels", "dead (low + high)", "dead fraction", "status"], &rows);
}

fn render_saturation(out: &mut String, position: usize, section: &Section<SaturationReport>) {
    heading(out, position, &section.about, Some(section.flagged));
    let rows: Vec<Vec<String>> = section
        .items
        .iter()
        .map(|s| {
            vec![
                s.node.clone(),
                s.op.clone(),
                s.tensor.clone(),
                format!("|x| > {}", s.limit),
                format!("{} / {}", s.saturated, s.values),
                format!("{:.4}", s.fraction),
                flag(s.flagged).to_owned(),
            ]
        })
        .collect();
    table(out, &["node", "op", "input", "saturated when", "saturated", "fraction", "status"], &rows);
}

/// Not a flagging section: no flagged count, and a total line under the table.
fn render_maccs(out: &mut String, position: usize, section: &MaccsSection) {
    heading(out, position, &section.about, None);
    let rows: Vec<Vec<String>> = section
        .nodes
        .iter()
        .map(|n| {
            let share = match n.maccs {
                Some(m) if section.per_sample > 0 => format!("{:.1}%", m as f64 * 100.0 / section.per_sample as f64),
                _ => "-".to_owned(),
            };
            vec![n.node.clone(), n.op.clone(), n.maccs.map_or_else(|| "?".to_owned(), |m| m.to_string()), share]
        })
        .collect();
    table(out, &["node", "op", "MACCs", "share"], &rows);
    let _ = writeln!(out, "   total: {} MACCs per sample", section.per_sample);
}

/// The INT8 settings and, when the twin could not be measured, why; then the ranked nodes.
fn render_sensitivity(out: &mut String, position: usize, section: &SensitivitySection) {
    heading(out, position, &section.about, None);
    let _ = writeln!(out, "   INT8 settings: {}", section.settings);
    if let Some(error) = &section.error {
        let _ = writeln!(out, "   not measured: {error}");
    }
    let rows: Vec<Vec<String>> = section
        .nodes
        .iter()
        .enumerate()
        .map(|(rank, n)| {
            vec![
                (rank + 1).to_string(),
                n.node.clone(),
                n.op.clone(),
                n.tensor.clone(),
                n.sqnr_db.map_or_else(|| "inf".to_owned(), |s| format!("{s:.2}")),
                format!("{:.6}", n.cosine),
                number(n.max_abs),
                if n.flagged { format!("FLAGGED (< {SQNR_LIMIT_DB} dB)") } else { "ok".to_owned() },
            ]
        })
        .collect();
    table(out, &["#", "node", "op", "output", "SQNR dB", "cosine", "max abs err", "status"], &rows);
    let _ = writeln!(
        out,
        "   {} of {} quantized nodes shown, lowest SQNR first",
        section.nodes.len(),
        section.quantized_nodes
    );
}

//! Finds the line of a key path in YAML text, so that errors found after parsing (an unknown
//! variant named in routing, a zero thread count) can still point at a line.

/// Returns the 1-based line on which the last key of `path` is written, following block-style
/// nesting by indentation. Falls back to the deepest ancestor that was found.
pub(crate) fn line_of_key(text: &str, path: &[&str]) -> Option<usize> {
    let mut found_line = None;
    let mut parent_indent: Option<usize> = None;
    let mut lines = text.lines().enumerate();
    'components: for component in path {
        for (index, line) in lines.by_ref() {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            if let Some(parent) = parent_indent
                && indent <= parent
            {
                // Left the parent's block without finding the component.
                return found_line;
            }
            let key = trimmed.split(':').next().unwrap_or("").trim().trim_matches(['"', '\'']);
            if trimmed.contains(':') && key == *component {
                found_line = Some(index + 1);
                parent_indent = Some(indent);
                continue 'components;
            }
        }
        return found_line;
    }
    found_line
}

#[cfg(test)]
mod tests {
    use super::line_of_key;

    const TEXT: &str = "# comment\nserving:\n  instances: 2\nvariants:\n  fp32:\n    precision: fp32\n  other:\n    serving:\n      instances: 0\nrouting:\n  default: nope\n";

    #[test]
    fn finds_nested_keys() {
        assert_eq!(line_of_key(TEXT, &["serving", "instances"]), Some(3));
        assert_eq!(line_of_key(TEXT, &["variants", "other", "serving", "instances"]), Some(9));
        assert_eq!(line_of_key(TEXT, &["routing", "default"]), Some(11));
    }

    #[test]
    fn falls_back_to_deepest_ancestor() {
        assert_eq!(line_of_key(TEXT, &["routing", "missing"]), Some(10));
        assert_eq!(line_of_key(TEXT, &["absent"]), None);
    }
}

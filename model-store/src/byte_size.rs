//! Sizes as written in configuration (`8GiB`, `512 MiB`, `2GB`, or a plain number of bytes).

/// Parses a non-negative decimal number with an optional unit: `B`, the decimal `KB`, `MB`,
/// `GB`, `TB` (powers of 1000) or the binary `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024);
/// without a unit the number is bytes. Whitespace around and between is ignored. Fractions
/// round down to whole bytes (`1.5KiB` is 1536).
///
/// The error is a message without location, for the caller to place.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let expected = || format!("expected a size like 8GiB, 512MiB or 2GB, got '{}'", text.trim());
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number.parse().map_err(|_| expected())?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(expected()),
    };
    let bytes = (value * scale).floor();
    // 2^63 bytes is far beyond any device; it keeps the value exact in both u64 and i64.
    if !bytes.is_finite() || bytes >= 9.2e18 {
        return Err(format!("size '{trimmed}' is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_byte_size;

    #[test]
    fn units_convert() {
        assert_eq!(parse_byte_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_byte_size(" 512 MiB "), Ok(512 << 20));
        assert_eq!(parse_byte_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_byte_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert_eq!(parse_byte_size("10B"), Ok(10));
    }

    #[test]
    fn malformed_sizes_say_what_is_expected() {
        for text in ["8 gigs", "GiB", "-1GiB", "", "8g"] {
            let err = parse_byte_size(text).unwrap_err();
            assert!(err.contains("expected a size like 8GiB"), "{text}: {err}");
        }
        assert!(parse_byte_size("99999999TiB").unwrap_err().contains("too large"));
    }
}

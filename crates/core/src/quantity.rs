//! Kubernetes resource quantities ("500m", "4", "8Gi", "1.5G") parsed into integer base units.
//!
//! Planning arithmetic is integer-only (millicores, bytes) so that sums never drift.

/// A quantity string that is not a valid Kubernetes quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The string is empty.
    #[error("empty quantity")]
    Empty,
    /// The numeric part is not a non-negative decimal number.
    #[error(
        "{0:?} is not a quantity (expected a number with an optional suffix such as m, Ki, Mi, Gi, k, M, G)"
    )]
    Malformed(String),
    /// The suffix is not one Kubernetes knows.
    #[error(
        "unknown suffix {suffix:?} in {input:?} (expected one of m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei)"
    )]
    UnknownSuffix {
        /// The whole input.
        input: String,
        /// The suffix found.
        suffix: String,
    },
    /// The value does not fit in 63 bits of base units.
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// Multiplier of a suffix as a fraction `num / den` of the base unit.
fn suffix_factor(suffix: &str) -> Option<(u128, u128)> {
    let binary = |p: u32| Some((1u128 << (10 * p), 1));
    let decimal = |p: u32| Some((10u128.pow(3 * p), 1));
    match suffix {
        "" => Some((1, 1)),
        "m" => Some((1, 1000)),
        "k" => decimal(1),
        "M" => decimal(2),
        "G" => decimal(3),
        "T" => decimal(4),
        "P" => decimal(5),
        "E" => decimal(6),
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        _ => None,
    }
}

/// Parses a quantity and returns it scaled by `scale` (1000 for millis, 1 for bytes), rounded up
/// as Kubernetes rounds requests up.
fn parse_scaled(input: &str, scale: u128) -> Result<i64, QuantityError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    // Exponent notation ("1e3") is legal in Kubernetes but never seen in pool specs; refuse it
    // explicitly rather than misread it as a suffix.
    let (num, den) = suffix_factor(suffix).ok_or_else(|| QuantityError::UnknownSuffix {
        input: input.to_string(),
        suffix: suffix.to_string(),
    })?;
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(QuantityError::Malformed(input.to_string()));
    }
    if frac_part.contains('.') || frac_part.len() > 18 {
        return Err(QuantityError::Malformed(input.to_string()));
    }
    let overflow = || QuantityError::Overflow(input.to_string());
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| overflow())?
    };
    let frac: u128 = if frac_part.is_empty() {
        0
    } else {
        frac_part
            .parse()
            .map_err(|_| QuantityError::Malformed(input.to_string()))?
    };
    let frac_den = 10u128.pow(frac_part.len() as u32);
    // value = (int + frac/frac_den) * num/den * scale, rounded up.
    let numerator = int
        .checked_mul(frac_den)
        .and_then(|v| v.checked_add(frac))
        .and_then(|v| v.checked_mul(num))
        .and_then(|v| v.checked_mul(scale))
        .ok_or_else(overflow)?;
    let denominator = frac_den * den;
    let value = numerator.div_ceil(denominator);
    i64::try_from(value).map_err(|_| overflow())
}

/// Parses a CPU quantity ("250m", "2", "1.5") into millicores.
pub fn parse_cpu_millis(input: &str) -> Result<i64, QuantityError> {
    parse_scaled(input, 1000)
}

/// Parses a memory or storage quantity ("512Mi", "8Gi", "1G", "1024") into bytes.
pub fn parse_memory_bytes(input: &str) -> Result<i64, QuantityError> {
    parse_scaled(input, 1)
}

/// Formats millicores the way kubectl prints them ("250m", "4").
pub fn format_cpu_millis(millis: i64) -> String {
    if millis % 1000 == 0 {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Formats bytes with the largest exact binary suffix ("8Gi", "1536Mi", "1000").
pub fn format_memory_bytes(bytes: i64) -> String {
    for (suffix, shift) in [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ] {
        let unit = 1i64 << shift;
        if bytes != 0 && bytes % unit == 0 {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu_millis("250m"), Ok(250));
        assert_eq!(parse_cpu_millis("4"), Ok(4000));
        assert_eq!(parse_cpu_millis("1.5"), Ok(1500));
        assert_eq!(parse_cpu_millis("0.1"), Ok(100));
        // Kubernetes rounds sub-milli CPU up.
        assert_eq!(parse_cpu_millis("0.0001"), Ok(1));
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory_bytes("8Gi"), Ok(8 << 30));
        assert_eq!(parse_memory_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_memory_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_memory_bytes("1024"), Ok(1024));
    }

    #[test]
    fn bad_quantities_name_the_problem() {
        assert_eq!(parse_cpu_millis(""), Err(QuantityError::Empty));
        assert!(
            matches!(parse_memory_bytes("8GB"), Err(QuantityError::UnknownSuffix { suffix, .. }) if suffix == "GB")
        );
        assert!(matches!(
            parse_memory_bytes("-1Gi"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_memory_bytes("1.2.3"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_memory_bytes("99999999Ei"),
            Err(QuantityError::Overflow(_))
        ));
        assert!(matches!(
            parse_cpu_millis("."),
            Err(QuantityError::Malformed(_))
        ));
    }

    #[test]
    fn formatting_round_trips() {
        assert_eq!(format_cpu_millis(250), "250m");
        assert_eq!(format_cpu_millis(4000), "4");
        assert_eq!(format_memory_bytes(8 << 30), "8Gi");
        assert_eq!(format_memory_bytes(1536 << 20), "1536Mi");
        assert_eq!(format_memory_bytes(1000), "1000");
    }

    proptest! {
        #[test]
        fn never_panics_on_any_input(s in ".{0,24}") {
            let _ = parse_cpu_millis(&s);
            let _ = parse_memory_bytes(&s);
        }

        #[test]
        fn formatted_values_parse_back(millis in 0i64..1_000_000_000, bytes in 0i64..(1i64 << 50)) {
            prop_assert_eq!(parse_cpu_millis(&format_cpu_millis(millis)), Ok(millis));
            prop_assert_eq!(parse_memory_bytes(&format_memory_bytes(bytes)), Ok(bytes));
        }
    }
}

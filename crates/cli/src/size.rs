//! Byte sizes as users type them: `20G`, `512MiB`, `1.5GB`, `4096`.
//!
//! Units (case-insensitive): none or `B` = bytes; `K`, `KiB`, `M`, `MiB`, `G`, `GiB`, `T`,
//! `TiB` are powers of 1024 (as `du` and `sort -h` read them); `KB`, `MB`, `GB`, `TB` are
//! powers of 1000. A decimal fraction is allowed with a unit larger than a byte and rounds down
//! to whole bytes. Anything else — signs, exponents, hex, thousands separators, values above
//! `u64::MAX` — is rejected rather than guessed at, because the value decides what gets deleted.

use std::fmt;

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeParseError {
    input: String,
    problem: &'static str,
}

impl fmt::Display for SizeParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid size `{}`: {} (examples: 4096, 512MiB, 20G, 1.5GB)",
            self.input, self.problem
        )
    }
}

impl std::error::Error for SizeParseError {}

/// The most fraction digits accepted; more precision than this is never meaningful for bytes
/// and keeps the exact integer arithmetic below far from overflow.
const MAX_FRACTION_DIGITS: usize = 9;

fn unit_multiplier(unit: &str) -> Option<u64> {
    const KI: u64 = 1 << 10;
    const K: u64 = 1_000;
    let m = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KI,
        "m" | "mib" => KI * KI,
        "g" | "gib" => KI * KI * KI,
        "t" | "tib" => KI * KI * KI * KI,
        "kb" => K,
        "mb" => K * K,
        "gb" => K * K * K,
        "tb" => K * K * K * K,
        _ => return None,
    };
    Some(m)
}

/// Parses a size in bytes (see the module docs for the accepted forms).
pub fn parse_size(input: &str) -> Result<u64, SizeParseError> {
    let err = |problem| SizeParseError {
        input: input.to_owned(),
        problem,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(number_end);
    // One optional space between number and unit ("20 GB"), nothing else.
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    if number.is_empty() {
        return Err(err("it does not start with a number"));
    }
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (number, None),
    };
    if int_part.is_empty() {
        return Err(err("no digits before the decimal point"));
    }
    if let Some(f) = frac_part {
        if f.is_empty() {
            return Err(err("no digits after the decimal point"));
        }
        if f.contains('.') {
            return Err(err("more than one decimal point"));
        }
        if f.len() > MAX_FRACTION_DIGITS {
            return Err(err("too many decimal places"));
        }
    }
    if !unit.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(err("unexpected characters after the number"));
    }
    let multiplier = unit_multiplier(unit)
        .ok_or_else(|| err("unknown unit (use B, K/KiB, M/MiB, G/GiB, T/TiB or KB, MB, GB, TB)"))?;
    let overflow = || err("larger than 2^64 - 1 bytes");

    let mut whole: u128 = 0;
    for d in int_part.bytes() {
        whole = whole
            .checked_mul(10)
            .and_then(|w| w.checked_add(u128::from(d - b'0')))
            .ok_or_else(overflow)?;
        if whole > u128::from(u64::MAX) {
            return Err(overflow());
        }
    }
    let mut bytes = whole
        .checked_mul(u128::from(multiplier))
        .ok_or_else(overflow)?;
    if let Some(f) = frac_part {
        if multiplier == 1 {
            return Err(err("a fraction of a byte"));
        }
        let digits: u128 = f
            .bytes()
            .fold(0u128, |acc, d| acc * 10 + u128::from(d - b'0'));
        let scale = 10u128.pow(f.len() as u32);
        // digits < 10^9 and multiplier <= 2^40, so the product fits easily in u128.
        bytes = bytes
            .checked_add(digits * u128::from(multiplier) / scale)
            .ok_or_else(overflow)?;
    }
    u64::try_from(bytes).map_err(|_| overflow())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_and_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("1KB"), Ok(1000));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("20GB"), Ok(20_000_000_000));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("2TB"), Ok(2_000_000_000_000));
    }

    #[test]
    fn case_and_spacing() {
        assert_eq!(parse_size("20g"), Ok(20 << 30));
        assert_eq!(parse_size("512mib"), Ok(512 << 20));
        assert_eq!(parse_size(" 20 GB "), Ok(20_000_000_000));
        assert!(parse_size("20  GB").is_err());
        assert!(parse_size("2 0G").is_err());
    }

    #[test]
    fn fractions_are_exact_and_round_down() {
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5KiB"), Ok(512));
        // 1.1 KiB = 1126.4 bytes.
        assert_eq!(parse_size("1.1K"), Ok(1126));
        assert_eq!(parse_size("0.000000001GB"), Ok(1));
        assert!(parse_size("0.0000000001GB").is_err(), "10 fraction digits");
        assert!(parse_size("1.5").is_err(), "fraction of a byte");
        assert!(parse_size("1.5B").is_err(), "fraction of a byte");
    }

    #[test]
    fn overflow_is_rejected() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("18446744073709551616").is_err());
        assert!(parse_size("99999999999999999999999999999999999999999999").is_err());
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 << 40));
        assert!(parse_size("16777216T").is_err(), "2^64 exactly");
        assert!(parse_size("18446744073709551615K").is_err());
        assert!(parse_size("18446744073.709551616GB").is_err());
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [
            "", " ", "G", "GB", "-1", "+1", "-1G", "1e9", "0x10", "1,5G", ".5G", "5.G", "1.2.3G",
            "20X", "20GBB", "20 G B", "inf", "NaN", "20G!", "１G", "20gigs", "1_000",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
    }

    /// Sizes are shown with `indicatif::HumanBytes` (the text `list`, `stats`, `cleanup` and
    /// `detect` print, and docs/cli.md shows).
    #[test]
    fn human_formatting() {
        let human_bytes = |b| indicatif::HumanBytes(b).to_string();
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(20 << 30), "20.00 GiB");
    }
}

//! Units of scenario files (SIMULATION.md C2): sizes with k, M, G (powers of 1024), times
//! with ns, us, ms, s, and half-open byte ranges `a..b` that are multiples of 512.

/// Parses a size: an integer with an optional k, M or G suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'M')) => (&s[..i], 1 << 20),
        Some((i, 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (an integer with an optional k, M or G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' overflows"))
}

/// Parses a duration into nanoseconds: a number with ns, us, ms or s.
pub fn parse_time_ns(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let units = [("ns", 1.0), ("us", 1e3), ("ms", 1e6), ("s", 1e9)];
    for (suffix, mult) in units {
        if let Some(num) = s.strip_suffix(suffix) {
            if suffix == "s" && (num.ends_with('n') || num.ends_with('u') || num.ends_with('m')) {
                continue;
            }
            let x: f64 = num
                .trim()
                .parse()
                .map_err(|_| format!("'{s}' is not a time (a number with ns, us, ms or s)"))?;
            if !x.is_finite() || x < 0.0 {
                return Err(format!("time '{s}' must be a non-negative number"));
            }
            return Ok((x * mult).round() as u64);
        }
    }
    Err(format!(
        "'{s}' is not a time (a number with ns, us, ms or s)"
    ))
}

/// Parses a half-open byte range `a..b` of whole sectors.
pub fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("'{s}' is not a range (a..b)"))?;
    let (a, b) = (parse_size(a)?, parse_size(b)?);
    if a >= b {
        return Err(format!("range '{s}' is empty or reversed"));
    }
    if a % 512 != 0 || b % 512 != 0 {
        return Err(format!("range '{s}' is not a multiple of 512 bytes"));
    }
    Ok((a, b))
}

/// Formats a byte count with the largest exact unit.
pub fn fmt_size(n: u64) -> String {
    for (suffix, shift) in [("G", 30), ("M", 20), ("k", 10)] {
        if n > 0 && n % (1u64 << shift) == 0 {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

/// Formats nanoseconds with the largest exact unit.
pub fn fmt_time(ns: u64) -> String {
    for (suffix, div) in [("s", 1_000_000_000u64), ("ms", 1_000_000), ("us", 1000)] {
        if ns > 0 && ns % div == 0 {
            return format!("{}{suffix}", ns / div);
        }
    }
    format!("{ns}ns")
}

/// 1234567 as "1,234,567" (reports, the sweep's progress line).
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_read_as_people_write_them() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn c2_units_parse_exactly() {
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("16896"), Ok(16896));
        assert_eq!(parse_time_ns("200ms"), Ok(200_000_000));
        assert_eq!(parse_time_ns("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_time_ns("30us"), Ok(30_000));
        assert_eq!(parse_time_ns("7ns"), Ok(7));
        assert_eq!(parse_range("16k..16896"), Ok((16384, 16896)));
        assert_eq!(
            parse_range("0..100"),
            Err("range '0..100' is not a multiple of 512 bytes".to_string())
        );
        assert_eq!(
            parse_size("4X"),
            Err("'4X' is not a size (an integer with an optional k, M or G)".to_string())
        );
        assert_eq!(
            parse_time_ns("5"),
            Err("'5' is not a time (a number with ns, us, ms or s)".to_string())
        );
        assert_eq!(fmt_size(4 << 20), "4M");
        assert_eq!(fmt_time(200_000_000), "200ms");
    }
}

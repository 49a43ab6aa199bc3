//! Readable output for the client commands.

/// A name a guest chose (a timer's key: any 1 to 256 bytes) quoted, with quotes,
/// backslashes, control and invisible formatting characters (a right-to-left override)
/// escaped as Rust writes them: it cannot pass for the text around it, such as a due time.
pub fn quoted(name: &str) -> String {
    format!("{name:?}")
}

/// `text` (an effect's payload: JSON a guest wrote) as the terminal should show it: control
/// and invisible formatting characters (a newline, an escape sequence, a right-to-left
/// override) written as Rust escapes them (`\n`, `\u{1b}`, `\u{202e}`), so a guest cannot
/// forge lines of the output or drive the terminal; the rest, quotes and backslashes
/// included, as is.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '"' | '\'') {
            out.push(c);
        } else {
            out.extend(c.escape_debug());
        }
    }
    out
}

/// `ms` since the Unix epoch as an RFC 3339 UTC timestamp with milliseconds.
pub fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `value` as indented JSON, each line prefixed with `indent`.
pub fn pretty(value: &serde_json::Value, indent: &str) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.lines()
        .map(|l| format!("{indent}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(one_line("heartbeat"), "heartbeat");
        assert_eq!(one_line(r#"{"a": "b\"c"}"#), r#"{"a": "b\"c"}"#);
        assert_eq!(one_line("evil\nfake  due 1970"), "evil\\nfake  due 1970");
        assert_eq!(one_line("\u{1b}[31mRED"), "\\u{1b}[31mRED");
        assert_eq!(one_line("tab\there é"), "tab\\there é");
        assert_eq!(one_line("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(quoted("heartbeat"), r#""heartbeat""#);
        assert_eq!(
            quoted("a\\nb"),
            r#""a\\nb""#,
            "a backslash is not a newline"
        );
        assert_eq!(quoted("x\u{202e}y"), r#""x\u{202e}y""#);
        assert_eq!(quoted("k\"  due 1970"), r#""k\"  due 1970""#);
    }
}

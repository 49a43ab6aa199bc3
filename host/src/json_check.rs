//! The one check that JSON text from outside (an event, a message or command payload a guest
//! made) is a document any reader of the journal can read back.
//!
//! Events are kept as the text they came as, so nothing parses them on the way in but this
//! check. `serde_json`'s cheap skim (`IgnoredAny`, and the `RawValue` a batch holds its items
//! in) checks the syntax only: it passes a string escape that names half of a UTF-16 pair
//! (`"\ud800"`, no character at all) and a number past `f64` (`1e400`). Such an event reached
//! the plugin, whose own parser refused it, so its sender got `422 rejected` ("the plugin
//! refused it") for what is malformed JSON, and a lenient plugin would have recorded text
//! that no strict reader (the export's, another language's) can read back.
//!
//! [`check`] reads each string escape and each number as a strict reader does, then the
//! syntax with that same skim, which keeps no stack of its own and so takes nesting as deep
//! as the size limit allows (the host sets no depth limit: a plugin may take deeper documents
//! than serde_json's default 128 levels, and a reader that recursed would run the host's
//! thread off its stack first). [`strict`] is the first half, for text whose syntax is known
//! good (a `RawValue`).
//!
//! The same rule holds wherever JSON text crosses the server's edge: an import refuses such
//! text as JSON (`crate::export`), and an answer embeds text that fails it as a string
//! (`crate::http::json`), as it does text that is not JSON at all.

/// Whether `text` is one JSON document whose strings are all Unicode text and whose numbers
/// all fit an `f64`; the error says where and why not.
pub(crate) fn check(text: &str) -> Result<(), String> {
    // The strict reading first: its messages say what is wrong with an escape, where
    // serde_json's skim says "unexpected end of hex escape" of a lone `"\ud800"`.
    strict(text)?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// [`check`] but the syntax: every `\u` escape of a string names a character, every number
/// fits an `f64`. Meant for text known to be JSON; any other text is read without panic, and
/// what it finds wrong is then wrong.
pub(crate) fn strict(text: &str) -> Result<(), String> {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => i = past_string(text, i + 1)?,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let number = text.get(start..i).unwrap_or_default();
                if number.parse::<f64>().is_ok_and(f64::is_infinite) {
                    return Err(format!(
                        "number out of range at byte {start}: `{}` is past what a 64-bit float \
                         holds",
                        cut(number)
                    ));
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// At most 40 bytes of `number` (a number may be 64 KiB of digits), on a char boundary.
fn cut(number: &str) -> String {
    match number.get(..40) {
        Some(head) if head.len() < number.len() => format!("{head}..."),
        _ => number.to_string(),
    }
}

/// The index just past the string whose text begins at `i` (after its opening quote) of
/// JSON `text`, once each `\u` escape in it is found to name a character.
fn past_string(text: &str, mut i: usize) -> Result<usize, String> {
    let b = text.as_bytes();
    let hex = |at: usize| {
        text.get(at..at + 4)
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    let lone = |at: usize, unit: u16, half: &str, missing: &str| {
        format!(
            "`\\u{unit:04x}` at byte {at} is the {half} half of a UTF-16 surrogate pair with no \
             {missing}: it names no character"
        )
    };
    while i < b.len() {
        match b[i] {
            b'"' => return Ok(i + 1),
            b'\\' if b.get(i + 1) == Some(&b'u') => match hex(i + 2) {
                Some(high @ 0xD800..=0xDBFF) => {
                    let low = (b.get(i + 6..i + 8) == Some(b"\\u"))
                        .then(|| hex(i + 8))
                        .flatten();
                    if !matches!(low, Some(0xDC00..=0xDFFF)) {
                        return Err(lone(i, high, "leading", "trailing half after it"));
                    }
                    i += 12;
                }
                Some(low @ 0xDC00..=0xDFFF) => {
                    return Err(lone(i, low, "trailing", "leading half before it"));
                }
                _ => i += 6,
            },
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn text_a_strict_reader_refuses_is_refused() {
        for bad in [
            r#""\ud800""#,
            r#"{"a":"x\udc00y"}"#,
            r#"{"\ud83d":1}"#,
            r#"[1e400]"#,
            r#"{"t":-1e309}"#,
            r#"{"a":1,}"#,
            "",
            "{} {}",
        ] {
            assert!(check(bad).is_err(), "{bad} passed");
            if bad.contains("e4") || bad.contains("e3") {
                let e = check(bad).unwrap_err();
                assert!(e.contains("number out of range"), "{bad}: {e}");
            }
        }
        let e = check(r#"{"a":"x\udc00y"}"#).unwrap_err();
        assert_eq!(
            e,
            "`\\udc00` at byte 7 is the trailing half of a UTF-16 surrogate pair with no \
             leading half before it: it names no character"
        );
        let e = check(r#"["\ud83d\u0041"]"#).unwrap_err();
        assert_eq!(
            e,
            "`\\ud83d` at byte 2 is the leading half of a UTF-16 surrogate pair with no \
             trailing half after it: it names no character"
        );
        // serde_json's skim said "unexpected end of hex escape" of these.
        assert!(check(r#""\ud800""#).unwrap_err().contains("leading half"));
        assert!(
            check(r#""\udc00\ud800""#)
                .unwrap_err()
                .contains("trailing half")
        );
        let e = check(&format!("[1{}]", "0".repeat(400))).unwrap_err();
        assert!(
            e.ends_with(
                "`1000000000000000000000000000000000000000...` is past what a 64-bit float holds"
            ),
            "{e}"
        );
    }

    #[test]
    fn any_other_json_passes() {
        for good in [
            r#"{"type":"reading","celsius":20.5}"#,
            r#""\ud83d\ude00 \u00e9 \n""#,
            r#"[null,true,false,-0,1.7976931348623157e308,18446744073709551615,123456789012345678901234567890]"#,
            r#"{"nested":[{"a":[[]]},{}],"e":1e-400}"#,
            r#"{"t":"\\ud800 is text, not an escape","s":"\"1e400\"","u":"\u00e91e400"}"#,
            r#"[0.5E+3,-2e-2,"é\u20ac",true]"#,
            " 7 ",
        ] {
            assert!(check(good).is_ok(), "{good}: {:?}", check(good));
        }
        // No depth limit of the host's own: a plugin may read deeper documents, and the
        // check keeps no stack.
        let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
        assert!(check(&deep).is_ok());
    }
}

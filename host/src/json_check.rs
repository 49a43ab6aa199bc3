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
//! [`check`] reads the syntax with that same skim, which keeps no stack of its own and so takes
//! nesting as deep as the size limit allows (the host sets no depth limit: a plugin may take
//! deeper documents than serde_json's default 128 levels, and a reader that recursed would
//! run the host's thread off its stack first). It then reads each string escape and each
//! number of the text it now knows to be well formed, as a strict reader does.

/// Whether `text` is one JSON document whose strings are all Unicode text and whose numbers
/// all fit an `f64`; the error says where and why not.
pub(crate) fn check(text: &str) -> Result<(), String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| e.to_string())?;
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
                // serde_json's own words for it, where it reads a number into an `f64`.
                if text
                    .get(start..i)
                    .and_then(|n| n.parse::<f64>().ok())
                    .is_none_or(f64::is_infinite)
                {
                    return Err(format!("number out of range at byte {start}"));
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// The index just past the string whose text begins at `i` (after its opening quote) of
/// well-formed JSON `text`, once each `\u` escape in it is found to name a character.
fn past_string(text: &str, mut i: usize) -> Result<usize, String> {
    let b = text.as_bytes();
    let hex = |at: usize| {
        text.get(at..at + 4)
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    while i < b.len() {
        match b[i] {
            b'"' => return Ok(i + 1),
            b'\\' if b.get(i + 1) == Some(&b'u') => match hex(i + 2) {
                Some(0xD800..=0xDBFF) => {
                    let low = (b.get(i + 6..i + 8) == Some(b"\\u"))
                        .then(|| hex(i + 8))
                        .flatten();
                    if !matches!(low, Some(0xDC00..=0xDFFF)) {
                        return Err(format!("lone leading surrogate in hex escape at byte {i}"));
                    }
                    i += 12;
                }
                Some(0xDC00..=0xDFFF) => {
                    return Err(format!("lone trailing surrogate in hex escape at byte {i}"));
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
        assert_eq!(e, "lone trailing surrogate in hex escape at byte 7");
        let e = check(r#"["\ud83d\u0041"]"#).unwrap_err();
        assert_eq!(e, "lone leading surrogate in hex escape at byte 2");
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

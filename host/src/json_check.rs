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
//! [`check`] reads every string and number as a strict reader does, without building the
//! document: strings without escapes are borrowed, not copied.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Whether `text` is one JSON document whose strings are all Unicode text and whose numbers
/// all fit an `f64`; the error says where and why not.
pub(crate) fn check(text: &str) -> Result<(), serde_json::Error> {
    serde_json::from_str::<Strict>(text).map(drop)
}

/// A JSON value read in full and kept as nothing.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Strict)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }

    // serde_json itself refuses a number past `f64` ("number out of range") on this path.
    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }

    // A string reaches a visitor only once its escapes are decoded, which is where a lone
    // surrogate is refused.
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        while map.next_entry::<Strict, Strict>()?.is_some() {}
        Ok(Strict)
    }
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
                let e = check(bad).unwrap_err().to_string();
                assert!(e.contains("number out of range"), "{bad}: {e}");
            }
        }
        let e = check(r#"{"a":"x\udc00y"}"#).unwrap_err().to_string();
        assert!(e.contains("surrogate"), "{e}");
    }

    #[test]
    fn any_other_json_passes() {
        for good in [
            r#"{"type":"reading","celsius":20.5}"#,
            r#""\ud83d\ude00 \u00e9 \n""#,
            r#"[null,true,false,-0,1.7976931348623157e308,18446744073709551615,123456789012345678901234567890]"#,
            r#"{"nested":[{"a":[[]]},{}],"e":1e-400}"#,
            " 7 ",
        ] {
            assert!(check(good).is_ok(), "{good}: {:?}", check(good));
        }
    }
}

//! Raw JSON in answers.
//!
//! Events, transitions and states reach the HTTP layer as JSON text (from the journal or the
//! guest). Parsing them into `serde_json::Value` only to print them again would cost more
//! than the rest of the request, so they are wrapped in [`Json`], which writes the text
//! through verbatim as a [`RawValue`] after one allocation-free validity scan.
//!
//! A guest is untrusted code and could answer text that is not one JSON document. Such text
//! is written as a JSON *string* instead, so the answer stays valid JSON, and a warning is
//! logged; so is text a strict reader refuses (`crate::json_check`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// JSON text embedded as is in a serialized answer (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json(pub String);

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Also text a strict reader refuses (a lone surrogate escape, a number past `f64`;
        // see `json_check`), which an older server or an import may have recorded: embedded
        // whole, it made the whole answer unreadable to such a client.
        match serde_json::from_str::<&RawValue>(&self.0) {
            Ok(raw) if crate::json_check::strict(raw.get()).is_ok() => raw.serialize(s),
            _ => {
                // At most once a second: a journal page of such records logged a line each,
                // at every read of it.
                static NOT_JSON: parking_lot::Mutex<crate::log_limit::LogLimit> =
                    parking_lot::Mutex::new(crate::log_limit::LogLimit::new());
                if let Some(times) = NOT_JSON.lock().due() {
                    tracing::warn!(
                        times,
                        "guest or journal text is not JSON a strict reader reads; embedding it \
                         as a string (times since the last such line, at most one a second: \
                         {times})"
                    );
                }
                s.serialize_str(&self.0)
            }
        }
    }
}

/// Each of `texts` as [`Json`].
pub fn all(texts: Vec<String>) -> Vec<Json> {
    texts.into_iter().map(Json).collect()
}

/// A JSON answer with `status`.
pub fn reply(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "answer not serializable");
            super::ApiError::from(crate::Error::Internal(format!(
                "answer not serializable: {e}"
            )))
            .into_response()
        }
    }
}

/// A 200 JSON answer.
pub fn ok(body: &impl Serialize) -> Response {
    reply(StatusCode::OK, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_that_is_not_json_stays_valid_json() {
        let text = |s: &str| serde_json::to_string(&Json(s.into())).unwrap();
        assert_eq!(text(r#"{"a": 1}"#), r#"{"a": 1}"#);
        assert_eq!(text(" 7 "), "7");
        assert_eq!(text("not json"), r#""not json""#);
        assert_eq!(text("{} {}"), r#""{} {}""#);
        let list = serde_json::to_string(&all(vec!["1".into(), "[".into()])).unwrap();
        assert_eq!(list, r#"[1,"["]"#);
    }
}

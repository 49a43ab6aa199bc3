//! Raw JSON in answers.
//!
//! Events, transitions and states reach the HTTP layer as JSON text (from the journal or the
//! guest). Parsing them into `serde_json::Value` only to print them again would cost more
//! than the rest of the request, so they are embedded as [`RawValue`]s: checked to be one
//! well-formed JSON document (a scan without allocation) and copied through verbatim.
//!
//! A guest is untrusted code and could answer text that is not JSON. Such text is embedded as
//! a JSON *string* instead, so the answer stays valid JSON, and a warning is logged.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;

/// `text` as a raw JSON value, or as a JSON string if it is not one JSON document (see the
/// module docs).
pub fn raw_or_string(text: String) -> Box<RawValue> {
    // Checking first keeps the text for the fallback; the check is an allocation-free scan.
    if serde_json::from_str::<&RawValue>(&text).is_ok() {
        if let Ok(raw) = RawValue::from_string(text) {
            return raw;
        }
        return RawValue::NULL.to_owned();
    }
    tracing::warn!("guest or journal text is not JSON; embedding it as a string");
    serde_json::value::to_raw_value(&text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Each of `texts` as a raw JSON value.
pub fn raw_all(texts: Vec<String>) -> Vec<Box<RawValue>> {
    texts.into_iter().map(raw_or_string).collect()
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
            super::ApiError::from(crate::Error::Internal(format!("answer not serializable: {e}")))
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
        assert_eq!(raw_or_string(r#"{"a": 1}"#.into()).get(), r#"{"a": 1}"#);
        assert_eq!(raw_or_string("not json".into()).get(), r#""not json""#);
        assert_eq!(raw_or_string("{} {}".into()).get(), r#""{} {}""#);
        let all = raw_all(vec!["1".into(), "[".into()]);
        let text = serde_json::to_string(&all).unwrap();
        assert_eq!(text, r#"[1,"["]"#);
    }
}

//! The blocking HTTP client behind the one-call commands (`send`, `state`, `journal`, ...).
//!
//! Each command makes one or a few requests, so a blocking client keeps them simple. A failed
//! request becomes an [`ApiFailure`] carrying the server's error code and message, which
//! `main` prints before exiting non-zero.

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::de::DeserializeOwned;

/// The server client commands talk to unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// Options every client command takes.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Base URL of the server.
    #[arg(
        long,
        global = true,
        env = "DROVER_SERVER",
        default_value = DEFAULT_SERVER
    )]
    pub server: String,
    /// Print the server's JSON answer as is instead of readable text (`devices`, which
    /// pages: JSON lines, one device each).
    #[arg(long, global = true)]
    pub json: bool,
}

/// The server answered with an error. Shown message first, as the server wrote it, then the
/// code scripts match on: most messages already start with the code's words
/// (`deploy refused: ...` for `deploy-refused`), which `code: message` printed twice.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// How long a request may wait for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a deploy, rollback or dry-run may take to answer: each runs to its end on the
/// server whatever the client does (a forced deploy of a version that spins can hold each
/// live device for its activation budget), and the report is what the command is for.
pub const LONG_OPERATION_TIMEOUT: Duration = Duration::from_secs(3600);

/// Runs `f` with SIGPIPE blocked in this thread, so that the threads `f` spawns start with
/// it blocked. A one-shot command dies of SIGPIPE when its reader goes away (see `main`),
/// but a write to a socket the server has closed raises SIGPIPE too: a server that refuses a
/// large body before reading it (413, or 400 for a bad name) and closes the connection
/// killed the client mid-upload, silently, with status 141. Blocked in the client's thread,
/// that write fails with `EPIPE` instead (the signal stays pending on a thread that never
/// unblocks it), and the server's answer is read and shown.
fn with_sigpipe_blocked<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(unix)]
    {
        // SAFETY: plain signal-set manipulation on this thread's own mask, with sets
        // initialised by `sigemptyset` / filled in by `pthread_sigmask`.
        let old = unsafe {
            let mut pipe: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut pipe);
            libc::sigaddset(&mut pipe, libc::SIGPIPE);
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut old);
            old
        };
        let out = f();
        // SAFETY: restores the mask saved above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
        out
    }
    #[cfg(not(unix))]
    f()
}

/// Whether the request failed because the server closed the connection while its body was
/// being written (`EPIPE`, or a reset).
fn closed_mid_body(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// A client for one server.
pub struct ApiClient {
    base: String,
    http: Client,
}

impl ApiClient {
    /// A client for the server in `opts`.
    pub fn new(opts: &ClientOpts) -> anyhow::Result<ApiClient> {
        if !opts.server.contains("://") {
            anyhow::bail!(
                "--server `{}` is not a URL: give its scheme too, as in http://{}",
                opts.server,
                opts.server
            );
        }
        // The client's requests run on a thread it spawns here, which inherits this
        // thread's signal mask.
        let http = with_sigpipe_blocked(|| Client::builder().timeout(REQUEST_TIMEOUT).build())
            .context("creating the HTTP client")?;
        Ok(ApiClient {
            base: opts.server.trim_end_matches('/').to_string(),
            http,
        })
    }

    /// The server's base URL, as given (without a trailing `/`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A GET request for `path`.
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.http.get(self.url(path))
    }

    /// A POST request for `path`.
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.http.post(self.url(path))
    }

    /// A PUT request for `path`.
    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.http.delete(self.url(path))
    }

    pub fn put(&self, path: &str) -> RequestBuilder {
        self.http.put(self.url(path))
    }

    /// Sends `req`; a non-2xx answer becomes an [`ApiFailure`]. Returns the status and the
    /// body text.
    pub fn call(&self, req: RequestBuilder) -> anyhow::Result<(u16, String)> {
        let req = req.build().context("building the request")?;
        let path = req.url().path().to_string();
        let body_len = req.body().and_then(|b| b.as_bytes()).map_or(0, <[u8]>::len);
        let response = self.http.execute(req).map_err(|e| {
            if e.is_timeout() {
                // Reached, but slow: "cannot reach" would say nothing happened.
                let hint = if path.ends_with("/deploy") || path.ends_with("/rollback") {
                    " (a deploy or rollback runs to its end: `drover plugin show NAME` shows \
                     the current version, `drover devices` each device's)"
                } else {
                    ""
                };
                anyhow::anyhow!(
                    "the server at {} did not answer in time ({e}); what was asked may still be \
                     going on there{hint}",
                    self.base
                )
            } else if body_len > 0 && closed_mid_body(&e) {
                // Reached: it answered (413, or 400) and closed before reading the body, and
                // the answer was lost with the connection.
                anyhow::Error::new(e).context(format!(
                    "the server at {} closed the connection before it had read the request's \
                     body of {body_len} bytes: it refused the request without reading it, most \
                     likely because the body is over its limit (`drover serve` \
                     --max-plugin-bytes, default {} MiB, for plugins; --max-event-bytes, \
                     default {} KiB, for events)",
                    self.base,
                    drover::config::defaults::MAX_PLUGIN_BYTES >> 20,
                    drover::config::defaults::MAX_EVENT_BYTES >> 10,
                ))
            } else {
                anyhow::Error::new(e).context(format!("cannot reach the server at {}", self.base))
            }
        })?;
        read(response)
    }

    /// Like [`ApiClient::call`], parsing the body as JSON into `T` as well.
    pub fn call_json<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
    ) -> anyhow::Result<(String, T)> {
        let (_, text) = self.call(req)?;
        let value = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "the server at {} answered something unexpected ({e}); is a Drover server at \
                 that address? It said: {}",
                self.base,
                excerpt(&text)
            )
        })?;
        Ok((text, value))
    }
}

/// Reads a response: the body on success, an [`ApiFailure`] otherwise.
fn read(response: Response) -> anyhow::Result<(u16, String)> {
    let status = response.status().as_u16();
    let text = response.text().context("reading the answer")?;
    if (200..300).contains(&status) {
        return Ok((status, text));
    }
    #[derive(serde::Deserialize)]
    struct Shape {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        code: String,
        message: String,
    }
    let failure = match serde_json::from_str::<Shape>(&text) {
        Ok(Shape { error }) => ApiFailure {
            status,
            code: error.code,
            message: error.message,
        },
        // Another server at that address (a proxy's error page, another service): say so,
        // rather than print its page whole, or nothing for an empty body.
        Err(_) => ApiFailure {
            status,
            code: "http".into(),
            message: format!(
                "the answer is not in Drover's error shape; is a Drover server at that \
                 address? It said: {}",
                excerpt(&text)
            ),
        },
    };
    Err(failure.into())
}

/// The start of an answer that is not Drover's, on one line.
fn excerpt(text: &str) -> String {
    let said: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match said.char_indices().nth(200) {
        Some((cut, _)) => format!("{} ...", &said[..cut]),
        None if said.is_empty() => "an empty body".to_string(),
        None => said,
    }
}

/// `s` as one path segment: percent-encodes everything but unreserved characters, so an id
/// the server would refuse reaches it as typed instead of changing the path. `.` and `..`
/// are refused here: a URL library resolves them (encoded too, as `%2E`), so the request
/// would go to another route or device, such as `drover send ..` to the batch endpoint.
pub fn segment(s: &str) -> anyhow::Result<String> {
    if s.is_empty() {
        anyhow::bail!("an empty id names no device, plugin or command (invalid-id)");
    }
    if s == "." || s == ".." {
        anyhow::bail!(
            "`{s}` cannot be a device, plugin or command id (invalid-id): it names a path, \
             not a segment of one"
        );
    }
    Ok(query_value(s))
}

/// `s` percent-encoded as a query parameter's value (where `.` and `..` mean nothing).
pub fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("hall-1").unwrap(), "hall-1");
        assert_eq!(segment("a/b c").unwrap(), "a%2Fb%20c");
        assert_eq!(segment("site:a@3").unwrap(), "site:a@3");
        assert_eq!(segment("..a").unwrap(), "..a");
        for dots in ["", ".", ".."] {
            let err = segment(dots).expect_err("a path, not a segment");
            assert!(err.to_string().contains("invalid-id"), "{err}");
        }
        assert_eq!(query_value(".."), "..");
    }
}

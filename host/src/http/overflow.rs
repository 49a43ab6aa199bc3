//! Connections past the connection cap: a health or readiness probe is still answered;
//! anything else gets `503 too-many-connections`.
//!
//! Refusing every connection past [`Limits::max_connections`](super::Limits) refused
//! `/healthz` and `/readyz` too. A flood of connections (slow clients holding theirs until
//! the header timeout, a burst of gateways) then failed an orchestrator's liveness probe, and
//! it restarted a server that was only busy: that frees nothing the flood will not take
//! again, and drops every request in flight. So past the cap the request line is read (for at
//! most [`LINE_WAIT`], and for at most [`PROBES_PAST_CAP`] connections at once; past those,
//! the 503 goes at once, as before): `GET /healthz` and `GET /readyz` are answered as usual,
//! and the connection closed after.
//!
//! Each answer past the cap holds its connection, and a file descriptor, for up to a second
//! (the probe's line, then the lingering close), so at most [`ANSWERED_PAST_CAP`] are
//! answered at once; past those a connection is closed at once, unanswered. Unbounded, a
//! flood of new connections took the descriptors the cap had left for the journal, and a
//! removal's archive failed with "Too many open files" (a review).

use std::time::Duration;

use axum::body::Body;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Connections past the cap whose request line is read at once, to answer probes.
pub(crate) const PROBES_PAST_CAP: usize = 64;

/// Connections past the cap answered at once (probes included); see the module docs. Within
/// the descriptors `drover serve` keeps beside the cap (`cli/serve.rs`).
pub(crate) const ANSWERED_PAST_CAP: usize = 256;

/// How long the request line of a connection past the cap may take to arrive.
pub(crate) const LINE_WAIT: Duration = Duration::from_secs(1);

/// The longest request line read past the cap (a probe's is a few dozen bytes).
const LINE_MAX: usize = 1024;

/// The answer to a connection over the cap that is not a probe (code
/// [`super::error::codes::TOO_MANY_CONNECTIONS`]).
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 94\r\n\r\n\
{\"error\":{\"code\":\"too-many-connections\",\"message\":\"the server has too many open connections\"}}";

/// Answers a connection over the cap and closes it: a probe (when given `probe_place`, a
/// place among the [`PROBES_PAST_CAP`]) through `app`, anything else with
/// [`TOO_MANY_CONNECTIONS`], after calling `refused`. The place is given back once the answer
/// is known, before it is written and the connection lingers: held through the lingering
/// close too, each connection that sent nothing kept it for up to 2 s, and 64 of them every
/// 2 s failed every probe (a review's flood of 80).
pub(crate) async fn answer(
    mut tcp: TcpStream,
    probe_place: Option<tokio::sync::OwnedSemaphorePermit>,
    app: axum::Router,
    refused: impl FnOnce(),
) {
    let mut head = Vec::new();
    let probe = if probe_place.is_some() {
        tokio::time::timeout(LINE_WAIT, read_request_line(&mut tcp, &mut head))
            .await
            .ok()
            .and_then(|read| read.ok())
            .and_then(|()| probe_of(&head))
    } else {
        None
    };
    let answer = match probe {
        Some((head_only, target)) => probe_answer(app, target, head_only).await,
        None => None,
    };
    drop(probe_place);
    let answer = answer.unwrap_or_else(|| {
        refused();
        TOO_MANY_CONNECTIONS.to_vec()
    });
    // A lingering close: closing with the client's request unread would make the kernel
    // answer with a reset, which can reach a client still sending before the answer does
    // (RFC 9112, 9.6). So: the answer, our half closed, and what the client sends read and
    // dropped, for 1 s.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(&answer).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

/// Reads into `head` up to the end of the first line (or [`LINE_MAX`] bytes, or the end).
async fn read_request_line(tcp: &mut TcpStream, head: &mut Vec<u8>) -> std::io::Result<()> {
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < LINE_MAX {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// The probe a request line asks for: `GET` or `HEAD` of `/healthz` or `/readyz` (with any
/// query, which probes add and the routes ignore), HTTP/1.x, its line ended by CRLF or a
/// bare LF (as hyper takes both below the cap); whether it is a `HEAD`, and its target as
/// sent.
fn probe_of(head: &[u8]) -> Option<(bool, &str)> {
    let end = head.iter().position(|b| *b == b'\n')?;
    let line = head[..end].strip_suffix(b"\r").unwrap_or(&head[..end]);
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    let (method, target, version) = (words.next()?, words.next()?, words.next()?);
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    if words.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    matches!(path, "/healthz" | "/readyz").then_some((head_only, target))
}

/// The API's own answer to `GET target` (without its body for a `HEAD`), as bytes to write,
/// with the connection closed after and the `date` hyper adds below the cap.
async fn probe_answer(app: axum::Router, target: &str, head_only: bool) -> Option<Vec<u8>> {
    let request = axum::http::Request::get(target).body(Body::empty()).ok()?;
    let service = TowerToHyperService::new(app);
    let response = hyper::service::Service::call(&service, request)
        .await
        .ok()?;
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, 64 << 10).await.ok()?;
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        if name == axum::http::header::CONTENT_LENGTH || name == axum::http::header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "date: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            httpdate::fmt_http_date(std::time::SystemTime::now()),
            body.len()
        )
        .as_bytes(),
    );
    if !head_only {
        out.extend_from_slice(&body);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_probes_are_probes() {
        assert_eq!(
            probe_of(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"),
            Some((false, "/healthz"))
        );
        assert_eq!(
            probe_of(b"GET /readyz HTTP/1.0\r\n"),
            Some((false, "/readyz"))
        );
        // Probes add queries, which the routes ignore.
        assert_eq!(
            probe_of(b"GET /readyz?probe=1 HTTP/1.1\r\n"),
            Some((false, "/readyz?probe=1"))
        );
        // `HEAD`, and a bare LF, as below the cap (a review saw both refused past it).
        assert_eq!(
            probe_of(b"HEAD /healthz HTTP/1.1\r\n"),
            Some((true, "/healthz"))
        );
        assert_eq!(
            probe_of(b"GET /healthz HTTP/1.1\nHost: x\n"),
            Some((false, "/healthz"))
        );
        for line in [
            &b"GET /healthz HTTP/1.1"[..],
            b"POST /healthz HTTP/1.1\r\n",
            b"GET /healthz/ HTTP/1.1\r\n",
            b"GET /healthzx?x=1 HTTP/1.1\r\n",
            b"GET /v1/devices HTTP/1.1\r\n",
            b"GET /healthz HTTP/2.0\r\n",
            b"GET  /healthz HTTP/1.1\r\n",
            b"GET /healthz HTTP/1.1 x\r\n",
        ] {
            assert_eq!(probe_of(line), None, "{}", String::from_utf8_lossy(line));
        }
    }
}

//! Guest stdout and stderr, written to the server's log under the device's id.
//!
//! Rust's `wasm32-wasip2` std prints through `wasi:cli/stdout` (and `stderr`) and the
//! `wasi:io/streams` output stream they hand out. A plugin author's `println!` while
//! debugging should show up in the log, not trap every event, so the host defines just what a
//! print needs: the two `get-std*` functions, the output stream's `check-write`, `write`,
//! `blocking-write-and-flush`, `flush`, `blocking-flush` and `subscribe` (with a pollable that
//! is always ready), and `get-terminal-*` (no terminal). Every other WASI function stays a
//! trap (see [`super::Engine`]): no input, no environment, no clock.
//!
//! Output is line-buffered per stream and store: each complete line becomes one log record
//! (`info` for stdout, `warn` for stderr, target `drover::guest`), capped at 4 KiB; a partial
//! line waits for its newline, up to 4 KiB. Writing never blocks; a write larger than the
//! 4 KiB `check-write` allows fails as a closed stream, so one host call does bounded work
//! and the event's time budget bounds the rest.

use wasmtime::component::{ComponentType, Lift, Linker, Lower, Resource, ResourceType};

use super::GuestState;

/// The WASI 0.2 version these definitions carry; guests built against any 0.2.x resolve to
/// them (wasmtime matches semver-compatible import names).
const WASI: &str = "0.2.6";

/// Longest line kept; longer output is cut into records of this size.
const MAX_LINE: usize = 4096;

/// Host side of `wasi:io/streams.output-stream`; rep 1 is stdout, 2 is stderr.
pub struct OutputStream;
/// Host side of `wasi:io/streams.input-stream` (never handed out: there is no input).
pub struct InputStream;
/// Host side of `wasi:io/poll.pollable` (always ready).
pub struct Pollable;
/// Host side of `wasi:io/error.error` (never handed out: writes do not fail).
pub struct IoError;
/// Host side of `wasi:cli/terminal-output` (never handed out: there is no terminal).
pub struct TerminalOutput;
/// Host side of `wasi:cli/terminal-input` (never handed out).
pub struct TerminalInput;

const STDOUT: u32 = 1;
const STDERR: u32 = 2;

/// `wasi:io/streams.stream-error`.
#[derive(ComponentType, Lift, Lower)]
#[component(variant)]
pub enum StreamError {
    #[component(name = "last-operation-failed")]
    LastOperationFailed(Resource<IoError>),
    #[component(name = "closed")]
    Closed,
}

/// Partial lines of a store's stdout and stderr.
#[derive(Default)]
pub struct Buffers {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Buffers {
    fn of(&mut self, stream: u32) -> &mut Vec<u8> {
        if stream == STDERR {
            &mut self.stderr
        } else {
            &mut self.stdout
        }
    }
}

/// Appends `bytes` to `stream`'s buffer and logs every complete (or over-long) line. A
/// write longer than `check-write` allowed is refused (the guest broke the stream's
/// contract), so one call costs at most [`MAX_LINE`] bytes of work.
fn write(state: &mut GuestState, stream: u32, bytes: &[u8]) -> Result<(), StreamError> {
    if bytes.len() > MAX_LINE {
        return Err(StreamError::Closed);
    }
    let device = state.device.clone();
    let quiet = state.quiet;
    let buf = state.stdio.of(stream);
    buf.extend_from_slice(bytes);
    let mut start = 0;
    while start < buf.len() {
        let rest = &buf[start..];
        let (line, next) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], start + i + 1),
            None if rest.len() >= MAX_LINE => (&rest[..MAX_LINE], start + MAX_LINE),
            None => break,
        };
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        start = next;
        if stream == STDERR {
            // A guest's last words before a trap often come this way (Rust's "memory
            // allocation of N bytes failed" on the way to an abort): the trap's message
            // quotes them, as it does an error `host.log` line.
            state.last_error = Some(text.to_string());
        }
        if !state.log_budget.take(&device) {
            continue;
        }
        // As for `host.log`: a log write that fails must not take down the guest call.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if quiet {
                tracing::debug!(target: "drover::guest", device = &*device, stream = if stream == STDERR { "stderr" } else { "stdout" }, "{text:?}");
            } else if stream == STDERR {
                tracing::warn!(target: "drover::guest", device = &*device, stream = "stderr", "{text:?}");
            } else {
                tracing::info!(target: "drover::guest", device = &*device, stream = "stdout", "{text:?}");
            }
        }));
    }
    state.stdio.of(stream).drain(..start);
    Ok(())
}

/// Defines the print path of `wasi:io` and `wasi:cli` in `linker` (see the module docs).
pub fn add_to_linker(linker: &mut Linker<GuestState>) -> anyhow::Result<()> {
    let no_drop = |_: wasmtime::StoreContextMut<'_, GuestState>, _: u32| Ok(());
    {
        let mut poll = linker.instance(&format!("wasi:io/poll@{WASI}"))?;
        poll.resource("pollable", ResourceType::host::<Pollable>(), no_drop)?;
        poll.func_wrap(
            "[method]pollable.block",
            |_, (_,): (Resource<Pollable>,)| Ok(()),
        )?;
        poll.func_wrap(
            "[method]pollable.ready",
            |_, (_,): (Resource<Pollable>,)| Ok((true,)),
        )?;
    }
    {
        let mut error = linker.instance(&format!("wasi:io/error@{WASI}"))?;
        error.resource("error", ResourceType::host::<IoError>(), no_drop)?;
    }
    {
        let mut streams = linker.instance(&format!("wasi:io/streams@{WASI}"))?;
        streams.resource("error", ResourceType::host::<IoError>(), no_drop)?;
        streams.resource("pollable", ResourceType::host::<Pollable>(), no_drop)?;
        streams.resource("input-stream", ResourceType::host::<InputStream>(), no_drop)?;
        streams.resource(
            "output-stream",
            ResourceType::host::<OutputStream>(),
            no_drop,
        )?;
        streams.func_wrap(
            "[method]output-stream.check-write",
            |_, (_,): (Resource<OutputStream>,)| Ok((Ok::<u64, StreamError>(MAX_LINE as u64),)),
        )?;
        streams.func_wrap(
            "[method]output-stream.write",
            |mut store, (this, bytes): (Resource<OutputStream>, Vec<u8>)| {
                Ok((write(store.data_mut(), this.rep(), &bytes),))
            },
        )?;
        streams.func_wrap(
            "[method]output-stream.blocking-write-and-flush",
            |mut store, (this, bytes): (Resource<OutputStream>, Vec<u8>)| {
                Ok((write(store.data_mut(), this.rep(), &bytes),))
            },
        )?;
        for name in [
            "[method]output-stream.flush",
            "[method]output-stream.blocking-flush",
        ] {
            streams.func_wrap(name, |_, (_,): (Resource<OutputStream>,)| {
                Ok((Ok::<(), StreamError>(()),))
            })?;
        }
        streams.func_wrap(
            "[method]output-stream.subscribe",
            |_, (_,): (Resource<OutputStream>,)| Ok((Resource::<Pollable>::new_own(0),)),
        )?;
    }
    for (interface, function, rep) in [
        ("stdout", "get-stdout", STDOUT),
        ("stderr", "get-stderr", STDERR),
    ] {
        let mut cli = linker.instance(&format!("wasi:cli/{interface}@{WASI}"))?;
        cli.resource(
            "output-stream",
            ResourceType::host::<OutputStream>(),
            no_drop,
        )?;
        cli.func_wrap(function, move |_, (): ()| {
            Ok((Resource::<OutputStream>::new_own(rep),))
        })?;
    }
    {
        // No input: `get-stdin` stays a trap, but its resource type must be the streams' one.
        let mut cli = linker.instance(&format!("wasi:cli/stdin@{WASI}"))?;
        cli.resource("input-stream", ResourceType::host::<InputStream>(), no_drop)?;
    }
    {
        let mut cli = linker.instance(&format!("wasi:cli/terminal-output@{WASI}"))?;
        cli.resource(
            "terminal-output",
            ResourceType::host::<TerminalOutput>(),
            no_drop,
        )?;
    }
    {
        let mut cli = linker.instance(&format!("wasi:cli/terminal-input@{WASI}"))?;
        cli.resource(
            "terminal-input",
            ResourceType::host::<TerminalInput>(),
            no_drop,
        )?;
    }
    for (interface, function) in [
        ("terminal-stdout", "get-terminal-stdout"),
        ("terminal-stderr", "get-terminal-stderr"),
    ] {
        let mut cli = linker.instance(&format!("wasi:cli/{interface}@{WASI}"))?;
        cli.resource(
            "terminal-output",
            ResourceType::host::<TerminalOutput>(),
            no_drop,
        )?;
        cli.func_wrap(function, |_, (): ()| {
            Ok((None::<Resource<TerminalOutput>>,))
        })?;
    }
    {
        let mut cli = linker.instance(&format!("wasi:cli/terminal-stdin@{WASI}"))?;
        cli.resource(
            "terminal-input",
            ResourceType::host::<TerminalInput>(),
            no_drop,
        )?;
        cli.func_wrap("get-terminal-stdin", |_, (): ()| {
            Ok((None::<Resource<TerminalInput>>,))
        })?;
    }
    Ok(())
}

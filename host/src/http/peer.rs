//! Whether the client of a request that waits (a long poll, a command stream) is still there.
//!
//! hyper reads a connection only for a request's head and body: while a handler waits, it
//! does not see the client go. A long poll of `wait_ms=60000` whose client reset its socket
//! held its place under `--max-connections` for the full minute, and the command stream
//! until its next 15 s comment, so a few thousand abandoned polls (a second of work for a
//! client) kept every new connection, `/healthz` included, refused for a minute. A waiting
//! handler now races its wait against [`Peer::gone`].
//!
//! The check peeks at the socket without taking anything from it (`MSG_PEEK`), every
//! [`PEER_CHECK`]: a reset or any error is a client gone; an end of stream (the client
//! closed its side) ends the wait early, since `drover serve` keeps half-closed connections
//! open to answer them (`half_close`), and the client then gets the answer as it is now;
//! bytes waiting (a pipelined request) are left for hyper.

use std::os::fd::RawFd;
use std::time::Duration;

/// How often a waiting handler looks at its client.
pub const PEER_CHECK: Duration = Duration::from_millis(250);

/// The client connection of a request, put into its extensions by the server.
///
/// It holds the socket's descriptor number, not the socket: it is only looked at from a
/// handler of a request on that connection, which the connection owns and drops before the
/// socket closes.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    fd: RawFd,
}

impl Peer {
    pub(crate) fn new(fd: RawFd) -> Peer {
        Peer { fd }
    }

    /// Resolves once the client has closed its side of the connection, reset it, or the
    /// socket failed.
    pub async fn gone(self) {
        loop {
            tokio::time::sleep(PEER_CHECK).await;
            if self.closed() {
                return;
            }
        }
    }

    fn closed(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: `byte` is valid for one byte of writes for the call; a descriptor that
        // is not a socket (it cannot be, see the type's docs) only makes the call fail.
        let read = unsafe {
            libc::recv(
                self.fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match read {
            0 => true,
            n if n > 0 => false,
            _ => !matches!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EAGAIN | libc::EINTR)
            ),
        }
    }
}

/// Resolves when `peer` is gone; never without one (a request not from `drover serve`'s
/// listener, as in tests that call the router directly).
pub async fn gone(peer: Option<Peer>) {
    match peer {
        Some(peer) => peer.gone().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::fd::AsRawFd;

    #[tokio::test]
    async fn a_client_that_closes_or_resets_is_gone_and_one_sending_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let peer = Peer::new(server.as_raw_fd());
        assert!(!peer.closed(), "connected, nothing sent");
        client.write_all(b"GET / HTTP/1.1\r\n").expect("write");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!peer.closed(), "bytes waiting");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        std::thread::sleep(Duration::from_millis(50));
        // The bytes sent come first; the end of stream only behind them.
        assert!(!peer.closed(), "bytes still waiting before the end");
        drop(client);

        let client = std::net::TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let peer = Peer::new(server.as_raw_fd());
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        tokio::time::timeout(Duration::from_secs(5), peer.gone())
            .await
            .expect("an end of stream is seen");
        drop((client, server));
    }
}

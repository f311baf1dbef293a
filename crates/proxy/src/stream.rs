//! A TCP, TLS or Unix stream behind one type, used non-blocking: wait for readiness, then read or
//! write without blocking. Waiting for readiness needs no buffer.
//!
//! Reads are hand-written on the socket (the hot path): a read that returns less than the
//! buffer could take drained the socket, so Weir tells Tokio the socket is no longer readable
//! right away. Tokio would otherwise keep it marked readable until a further read returned
//! WouldBlock, which costs one empty `recv` per direction per transaction. Tokio's readiness
//! tick makes the clearing safe: an event that arrives meanwhile is not lost.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};

/// What a look at a socket's readiness found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeekState {
    /// No event since the socket was last drained.
    Quiet,
    /// Marked readable: data, a FIN, an error (a reset), or a stale mark.
    Readable,
}

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Boxed: TLS state is large and most connections are plain.
    Tls(Box<crate::tls::TlsStream>),
}

impl Stream {
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            Stream::Unix(s) => s.readable().await,
            Stream::Tls(s) => std::future::poll_fn(|cx| s.poll_read_ready(cx)).await,
        }
    }

    pub fn poll_read_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
            Stream::Tls(s) => s.poll_read_ready(cx),
        }
    }

    pub fn poll_write_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_write_ready(cx),
            Stream::Unix(s) => s.poll_write_ready(cx),
            Stream::Tls(s) => s.poll_write_ready(cx),
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.writable().await,
            Stream::Unix(s) => s.writable().await,
            Stream::Tls(s) => std::future::poll_fn(|cx| s.poll_write_ready(cx)).await,
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.tcp.as_raw_fd(),
        }
    }

    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        match self {
            Stream::Tcp(s) => s.try_io(interest, f),
            Stream::Unix(s) => s.try_io(interest, f),
            Stream::Tls(s) => s.tcp.try_io(interest, f),
        }
    }

    /// Reads into the spare capacity of `buf` (reserve first). `Ok(0)` is end of stream;
    /// WouldBlock means nothing to read now.
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        if let Stream::Tls(s) = self {
            return s.try_read_buf(buf);
        }
        let spare = buf.spare_capacity_mut();
        let cap = spare.len();
        if cap == 0 {
            return Err(io::Error::other("read into a full buffer"));
        }
        let (fd, ptr) = (self.fd(), spare.as_mut_ptr());
        let mut got = 0usize;
        let r = self.try_io(Interest::READABLE, || {
            // SAFETY: `ptr` points at `cap` writable bytes of `buf`'s spare capacity, which
            // nothing else touches during the call; `fd` is our open socket.
            let n = unsafe { libc::recv(fd, ptr.cast(), cap, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            got = n as usize;
            if got > 0 && got < cap {
                // Drained: let Tokio clear the readiness now (the bytes are kept in `got`).
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(got)
        });
        // Bytes read win over the error that cleared the readiness (decided by `got`, not by
        // asking the error its kind: a read is the hot path).
        if got > 0 {
            // SAFETY: the kernel initialised `got` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + got) };
            return Ok(got);
        }
        r
    }

    /// Registers the socket with the calling thread's runtime instead of the one it was
    /// registered with: a worker that takes a server connection opened on another worker
    /// moves it here, so the connection's replies wake this worker directly rather than
    /// passing through the other one. The socket is duplicated and the duplicate registered;
    /// dropping the original deregisters it from the old runtime before closing it, which
    /// leaves the connection itself open. A dup, two epoll_ctl and a close.
    pub fn rehome(&mut self) -> io::Result<()> {
        use std::os::fd::AsFd;
        fn tcp(s: &mut TcpStream) -> io::Result<()> {
            let fd = s.as_fd().try_clone_to_owned()?;
            *s = TcpStream::from_std(std::net::TcpStream::from(fd))?;
            Ok(())
        }
        match self {
            Stream::Tcp(s) => tcp(s),
            Stream::Tls(s) => tcp(&mut s.tcp),
            Stream::Unix(s) => {
                let fd = s.as_fd().try_clone_to_owned()?;
                *s = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?;
                Ok(())
            }
        }
    }

    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write(data),
            Stream::Unix(s) => s.try_write(data),
            Stream::Tls(s) => s.try_write(data),
        }
    }

    /// A send that does not ask Tokio first, for a socket just registered with this runtime
    /// (a server connection moved to this worker: see [`Stream::rehome`]). Tokio has no
    /// readiness recorded for a new registration until its reactor's next turn, so
    /// [`Stream::try_write`] would report WouldBlock without trying and the session would wait
    /// a turn for nothing. Clears no readiness (only a send inside `try_io` may), so at worst
    /// a later wait for writability wakes once for nothing.
    pub fn send_unready(&self, data: &[u8]) -> io::Result<usize> {
        if let Stream::Tls(s) = self {
            return s.try_write(data);
        }
        // SAFETY: `data` is valid for `data.len()` bytes; the fd is our open socket.
        let n = unsafe {
            libc::send(
                self.fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(data).await,
            Stream::Unix(s) => s.write_all(data).await,
            Stream::Tls(s) => s.write_all(data).await,
        }
    }

    /// Reads at least one byte more into `buf`, waiting as needed. `Ok(0)` is end of stream.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        loop {
            std::future::poll_fn(|cx| self.poll_read_ready(cx)).await?;
            match self.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// What the reactor has already seen of the socket: no system call. Readable covers a
    /// FIN too (an idle server connection that PostgreSQL terminated, by a shutdown or
    /// `pg_terminate_backend`), and is often stale (Tokio skips clearing it when a newer
    /// event, such as a write-space wakeup, slipped in): callers confirm with a read.
    ///
    /// This runs at every checkout, so it only loads the readiness Tokio recorded (through
    /// `try_io` with an operation that does nothing): no waker is registered and no
    /// waiter-list lock taken, where `poll_read_ready` took that lock whenever the socket was
    /// quiet.
    pub fn peek_state(&self) -> PeekState {
        if let Stream::Tls(s) = self
            && s.has_buffered()
        {
            return PeekState::Readable;
        }
        // Tokio answers WouldBlock itself when no readiness is recorded; the closure runs
        // only when some is.
        match self.try_io(Interest::READABLE, || Ok(())) {
            Ok(()) => PeekState::Readable,
            Err(_) => PeekState::Quiet,
        }
    }

    /// The peer's address (`None` for a Unix socket).
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match self.tcp() {
            Some(s) => s.peer_addr().ok(),
            None => None,
        }
    }

    /// Our own address (`None` for a Unix socket).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self.tcp() {
            Some(s) => s.local_addr().ok(),
            None => None,
        }
    }

    pub fn set_nodelay(&self) {
        if let Some(s) = self.tcp() {
            let _ = s.set_nodelay(true);
        }
    }

    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Tls(s) => Some(&s.tcp),
            Stream::Unix(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// TCP without TLS (what `tls.mode = "require"` refuses; Unix sockets are exempt).
    pub fn is_plain_tcp(&self) -> bool {
        matches!(self, Stream::Tcp(_))
    }

    /// `tls-server-end-point` data of the certificate Weir presented on this connection.
    pub fn channel_binding(&self) -> Option<&[u8]> {
        match self {
            Stream::Tls(s) => s.end_point(),
            _ => None,
        }
    }

    /// Encrypted output is still waiting for the socket (TLS only): wait for writability.
    pub fn wants_flush(&self) -> bool {
        match self {
            Stream::Tls(s) => s.wants_flush(),
            _ => false,
        }
    }
}

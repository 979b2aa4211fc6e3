//! `AsyncRead + AsyncWrite` over one HTTP/2 CONNECT stream.
//!
//! Reads hand out the DATA frames h2 already buffered (one copy into the
//! caller's buffer) and return flow-control credit immediately, so the peer
//! can keep the window full. Writes reserve send capacity for the whole
//! buffer and send as much as the windows allow. `poll_shutdown` sends an
//! empty DATA frame with END_STREAM (TCP FIN across the tunnel); END_STREAM
//! from the peer reads as EOF. A peer RST_STREAM(NO_ERROR/CANCEL) reads as
//! EOF like ztunnel treats it; other resets are errors.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::Reason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Keeps per-connection accounting alive while a stream exists (the client
/// pool counts active streams per connection with it).
pub(crate) type StreamGuard = Box<dyn Send + Sync>;

/// One HBONE tunnel: a CONNECT stream after a 200 response.
pub struct HboneStream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// Received bytes not yet handed to the reader.
    pending: Bytes,
    write_closed: bool,
    _guard: Option<StreamGuard>,
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("stream_id", &self.send.stream_id())
            .field("pending", &self.pending.len())
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

impl HboneStream {
    pub(crate) fn new(
        send: h2::SendStream<Bytes>,
        recv: h2::RecvStream,
        guard: Option<StreamGuard>,
    ) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            _guard: guard,
        }
    }

    /// Aborts the tunnel with RST_STREAM (the peer sees a reset, not a clean
    /// close) — for errors on the other side of a splice.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }

    /// Next chunk of received data without copying (`Bytes::new()` at EOF).
    pub fn poll_read_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(std::mem::take(&mut self.pending)));
        }
        loop {
            return match ready!(self.recv.poll_data(cx)) {
                None => Poll::Ready(Ok(Bytes::new())),
                Some(Ok(data)) => {
                    if data.is_empty() {
                        continue;
                    }
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    Poll::Ready(Ok(data))
                }
                Some(Err(e)) => match e.reason() {
                    Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Poll::Ready(Ok(Bytes::new())),
                    Some(Reason::STREAM_CLOSED) => {
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, e)))
                    }
                    _ => Poll::Ready(Err(h2_to_io(e))),
                },
            };
        }
    }

    /// Sends a prefix of `data` without copying; returns how much was sent.
    pub fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &Bytes,
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(data.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(data.len());
                    if self.send.send_data(data.slice(..n), false).is_ok() {
                        return Poll::Ready(Ok(n));
                    }
                    return self.poll_reset_error(cx);
                }
                // Stream closed or errored: the reset reason tells why.
                Some(Err(_)) | None => return self.poll_reset_error(cx),
            }
        }
    }

    fn poll_reset_error<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        Poll::Ready(Err(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR) | Ok(Reason::CANCEL) | Ok(Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => io::Error::other(h2::Error::from(reason)),
            Err(e) => h2_to_io(e),
        }))
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            this.pending = ready!(this.poll_read_bytes(cx))?;
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        bytes::Buf::advance(&mut this.pending, n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Reserve first and copy only as much as we may send now, so a large
        // buffer costs one copy of what actually goes out.
        this.send.reserve_capacity(buf.len());
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    if this
                        .send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .is_ok()
                    {
                        return Poll::Ready(Ok(n));
                    }
                    return this.poll_reset_error(cx);
                }
                Some(Err(_)) | None => return this.poll_reset_error(cx),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames out as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        if this.send.send_data(Bytes::new(), true).is_ok() {
            this.write_closed = true;
            return Poll::Ready(Ok(()));
        }
        match ready!(this.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR) => {
                this.write_closed = true;
                Poll::Ready(Ok(()))
            }
            Ok(Reason::CANCEL) | Ok(Reason::STREAM_CLOSED) => {
                Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
            }
            Ok(reason) => Poll::Ready(Err(io::Error::other(h2::Error::from(reason)))),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }
}

pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

//! The streams a copy can drive chunk by chunk without intermediate copies
//! ([`Splice`]): TCP reads land in a `BytesMut` that is frozen and handed to
//! the writer as is, and several chunks go out in one vectored write; HBONE
//! reads hand out h2's received `Bytes` and HBONE writes queue `Bytes` into
//! h2 without copying. What to read when is `copy.rs`'s.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::HboneStream;

/// Most chunks gathered for one vectored write.
pub(super) const MAX_GATHER: usize = 16;

/// A stream [`super::copy_bidirectional`] can drive chunk by chunk without
/// intermediate copies: TCP reads land in a `BytesMut` that is frozen and
/// handed to the writer as is; HBONE reads hand out h2's received `Bytes`;
/// HBONE writes queue the `Bytes` into h2 without copying.
pub trait Splice: AsyncRead + AsyncWrite + Unpin {
    /// Reads the next chunk (at most about `want` bytes), using `buf` as
    /// allocation space. An empty chunk means EOF.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Bytes>> {
        // Generic path: zero-filled space and a copy-free split.
        buf.clear();
        buf.resize(want, 0);
        let mut rb = ReadBuf::new(&mut buf[..]);
        ready!(Pin::new(&mut *self).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        Poll::Ready(Ok(buf.split_to(n).freeze()))
    }

    /// Writes a prefix of `chunk`; returns how much.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &Bytes) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self).poll_write(cx, chunk)
    }

    /// Writes a prefix of the concatenation of `chunks` (not empty); returns
    /// how much. Streams with vectored writes send several chunks at once.
    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &[Bytes],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_chunk(cx, &chunks[0])
    }

    /// Whether chunks may already be waiting after one was read, so reading
    /// on (until `Pending`) before writing is cheap: true for HBONE streams
    /// (frames h2 buffered), false for sockets (a read already takes all
    /// that is there; another would be a wasted syscall).
    fn gathers(&self) -> bool {
        false
    }

    /// Whether reads land in the caller's buffer (and so larger chunks
    /// cost memory of the copy path and take budget); false for HBONE
    /// streams, whose chunks are h2's received frames (bounded by the
    /// receive window).
    fn reads_into_buffer(&self) -> bool {
        true
    }
}

impl Splice for TcpStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Bytes>> {
        loop {
            // Wait for data before taking memory: an idle connection holds
            // no copy buffer.
            ready!(self.poll_read_ready(cx))?;
            buf.clear();
            // Reuses the allocation when every chunk cut from it was dropped.
            buf.reserve(want);
            // Reads into spare capacity: no zero-fill.
            match self.try_read_buf(buf) {
                Ok(n) => return Poll::Ready(Ok(buf.split_to(n).freeze())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &[Bytes],
    ) -> Poll<io::Result<usize>> {
        if chunks.len() == 1 {
            return Pin::new(self).poll_write(cx, &chunks[0]);
        }
        let mut slices = [IoSlice::new(&[]); MAX_GATHER];
        let n = chunks.len().min(MAX_GATHER);
        for (slice, chunk) in slices.iter_mut().zip(chunks) {
            *slice = IoSlice::new(chunk);
        }
        Pin::new(self).poll_write_vectored(cx, &slices[..n])
    }
}

impl Splice for HboneStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut BytesMut,
        _want: usize,
    ) -> Poll<io::Result<Bytes>> {
        self.poll_read_bytes(cx)
    }

    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &Bytes) -> Poll<io::Result<usize>> {
        self.poll_write_bytes(cx, chunk)
    }

    fn gathers(&self) -> bool {
        true
    }

    fn reads_into_buffer(&self) -> bool {
        false
    }
}

impl Splice for tokio::io::DuplexStream {}
impl Splice for tokio::net::UnixStream {}

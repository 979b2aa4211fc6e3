//! Bidirectional splice of two byte streams (HBONE ↔ TCP, or TCP ↔ TCP for
//! passthrough) with byte counts for metrics and access logs.
//!
//! Data moves as `Bytes` chunks without intermediate copies (see [`Splice`]).
//! Each direction reads up to 16 KiB at first and doubles up to 256 KiB while reads keep filling it (bulk
//! transfers then move large chunks: fewer syscalls and bigger TLS records).
//! TCP reads take buffer memory only once data is ready, so an idle spliced
//! connection holds no copy buffers.
//! EOF on one side is propagated as a half-close (`shutdown`) to the other
//! and the opposite direction keeps flowing until its own EOF.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::HboneStream;

const INITIAL_CHUNK: usize = 16 * 1024;
const MAX_CHUNK: usize = 256 * 1024;

/// A stream [`copy_bidirectional`] can drive chunk by chunk without
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
}

impl Splice for tokio::io::DuplexStream {}
impl Splice for tokio::net::UnixStream {}

/// Outcome of a splice. Byte counts are valid even when `error` is set.
#[derive(Debug, Default)]
pub struct CopyResult {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
    /// The first I/O error, if the splice did not end with EOF on both sides.
    pub error: Option<io::Error>,
}

/// Live byte counters, updated as data moves (for metrics of long-lived
/// connections). Optional.
#[derive(Debug, Default)]
pub struct CopyCounters {
    pub a_to_b: AtomicU64,
    pub b_to_a: AtomicU64,
}

struct Direction {
    buf: BytesMut,
    want: usize,
    /// Read but not yet written.
    pending: Bytes,
    total: u64,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl Direction {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            want: INITIAL_CHUNK,
            pending: Bytes::new(),
            total: 0,
            read_done: false,
            need_flush: false,
            done: false,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        counter: Option<&AtomicU64>,
    ) -> Poll<io::Result<()>>
    where
        R: Splice + ?Sized,
        W: Splice + ?Sized,
    {
        loop {
            if self.pending.is_empty() && !self.read_done {
                match reader.poll_read_chunk(cx, &mut self.buf, self.want) {
                    Poll::Pending => {
                        // Nothing more to read for now: push out what we wrote.
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(chunk)) if chunk.is_empty() => self.read_done = true,
                    Poll::Ready(Ok(chunk)) => {
                        // A full read means bulk data: read bigger next time.
                        if chunk.len() >= self.want {
                            self.want = (self.want * 2).min(MAX_CHUNK);
                        }
                        self.pending = chunk;
                    }
                }
            }
            while !self.pending.is_empty() {
                let n = ready!(writer.poll_write_chunk(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
                self.total += n as u64;
                self.need_flush = true;
                if let Some(c) = counter {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                // Nothing more flows this way: give the memory back.
                self.buf = BytesMut::new();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies `a → b` and `b → a` until both directions reached EOF (each EOF
/// half-closes the other side) or an error occurs. Never panics; returns the
/// counts moved so far together with the first error.
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    counters: Option<&CopyCounters>,
) -> CopyResult
where
    A: Splice + ?Sized,
    B: Splice + ?Sized,
{
    let mut ab = Direction::new();
    let mut ba = Direction::new();
    let error = poll_fn(|cx| {
        if !ab.done
            && let Poll::Ready(Err(e)) = ab.poll_copy(cx, a, b, counters.map(|c| &c.a_to_b))
        {
            return Poll::Ready(Some(e));
        }
        if !ba.done
            && let Poll::Ready(Err(e)) = ba.poll_copy(cx, b, a, counters.map(|c| &c.b_to_a))
        {
            return Poll::Ready(Some(e));
        }
        if ab.done && ba.done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    })
    .await;
    CopyResult {
        a_to_b: ab.total,
        b_to_a: ba.total,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (mut client, mut proxy_a) = tokio::io::duplex(4096);
        let (mut proxy_b, mut server) = tokio::io::duplex(4096);
        let counters = CopyCounters::default();
        let splice = async {
            let r = copy_bidirectional(&mut proxy_a, &mut proxy_b, Some(&counters)).await;
            assert!(r.error.is_none(), "{:?}", r.error);
            r
        };
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let peers = async {
            let c = async {
                client.write_all(&data).await.unwrap();
                client.shutdown().await.unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                back
            };
            let s = async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                // Half-closed: the server can still answer.
                server.write_all(b"done").await.unwrap();
                server.shutdown().await.unwrap();
                got
            };
            tokio::join!(c, s)
        };
        let (r, (back, got)) = tokio::join!(splice, peers);
        assert_eq!(got, data);
        assert_eq!(back, b"done");
        assert_eq!(r.a_to_b, data.len() as u64);
        assert_eq!(r.b_to_a, 4);
        assert_eq!(counters.a_to_b.load(Ordering::Relaxed), data.len() as u64);
    }
}

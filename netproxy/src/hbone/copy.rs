//! Bidirectional splice of two byte streams (HBONE ↔ TCP, or TCP ↔ TCP for
//! passthrough) with byte counts for metrics and access logs.
//!
//! Data moves as `Bytes` chunks without intermediate copies (see [`Splice`]).
//! Each direction reads up to 16 KiB at first and doubles up to 256 KiB while
//! reads keep filling it (bulk transfers then move large chunks: fewer
//! syscalls and bigger TLS records). Growth past 16 KiB takes bytes from
//! the process-wide [`CopyBudget`] (`--copy-buffer-budget`); without room a
//! direction keeps its chunk size. A grown direction falls back to 16 KiB
//! (returning its buffers and budget) when a short read is followed by a
//! wait for data: the sender is not keeping a large buffer busy.
//! In bulk mode each direction keeps two read buffers and reuses whichever
//! the writer has released: h2 holds a chunk until its connection task
//! encrypted it, and allocating a fresh 256 KiB buffer per read made the
//! allocator map and trim pages on every chunk (page faults of the receive
//! buffer were ~4% of a bulk profile). Below bulk size a direction waiting
//! for data holds no buffer at all.
//! Chunks an HBONE stream already holds are gathered and written to TCP with
//! one vectored write. How each kind of stream reads and writes chunks is
//! [`Splice`]'s (`splice.rs`); this module decides how much to read, when,
//! into which buffer, and drives both directions.
//! EOF on one side is propagated as a half-close (`shutdown`) to the other
//! and the opposite direction keeps flowing until its own EOF.
//!
//! Per proxied connection the copy path's own read buffers hold at most
//! [`CONNECTION_COPY_CAP`] (two buffers of [`MAX_CHUNK`] per direction).
//! What h2 queues for sending on an HBONE stream are slices of those
//! buffers, but a queued tail pins its buffer and makes the reader allocate
//! another: that is bounded by h2's `max_send_buffer_size` ([`SEND_BUFFER`]
//! on the server; the stream window on the client, see `client.rs`) and, per
//! HBONE connection, by the peer's connection window. The receiving side is
//! bounded by the HTTP/2 windows.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};

use super::budget::{CopyBudget, Grant};
use super::splice::{MAX_GATHER, Splice};

/// First read size of a direction; traffic that never fills it (requests,
/// responses, interactive use) never touches the budget.
pub const INITIAL_CHUNK: usize = 16 * 1024;
/// Largest read size of a bulk direction.
pub const MAX_CHUNK: usize = 256 * 1024;
/// Read buffers a bulk direction keeps (see the module comment); a grown
/// direction takes `BUFFERS × chunk size` from the budget.
const BUFFERS: usize = 2;
/// h2's per-stream send buffer on the server (`max_send_buffer_size`): two
/// chunks queued keep the connection task and the socket busy while the
/// copy reads the next one.
pub const SEND_BUFFER: usize = 2 * MAX_CHUNK;
/// Most memory the copy path's read buffers of one proxied connection hold:
/// both directions' two buffers at the largest chunk.
pub const CONNECTION_COPY_CAP: usize = 2 * BUFFERS * MAX_CHUNK;

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

struct Direction<'b> {
    buf: BytesMut,
    /// The other read buffer (see the module comment).
    spare: BytesMut,
    want: usize,
    /// Read but not yet written, in order.
    pending: Vec<Bytes>,
    total: u64,
    read_done: bool,
    /// A read error met while gathering, reported once `pending` is out.
    deferred: Option<io::Error>,
    need_flush: bool,
    done: bool,
    /// Budget held for read buffers above [`INITIAL_CHUNK`].
    grant: Grant<'b>,
    /// Length of the last chunk read.
    last_read: usize,
    /// A growth was refused (counted once until the direction shrinks).
    refused: bool,
}

impl<'b> Direction<'b> {
    fn new(budget: &'b CopyBudget) -> Self {
        Self {
            buf: BytesMut::new(),
            spare: BytesMut::new(),
            want: INITIAL_CHUNK,
            pending: Vec::new(),
            total: 0,
            read_done: false,
            deferred: None,
            need_flush: false,
            done: false,
            grant: budget.grant(),
            last_read: 0,
            refused: false,
        }
    }

    /// Doubles the chunk size after a full read, if the budget has room
    /// for the larger buffers (readers that do not use them grow freely).
    fn grow(&mut self, buffered: bool) {
        if self.want >= MAX_CHUNK {
            return;
        }
        let next = (self.want * 2).min(MAX_CHUNK);
        if buffered && !self.grant.try_resize(BUFFERS * next) {
            if !self.refused {
                self.refused = true;
                self.grant.budget().count_refusal();
            }
            return;
        }
        self.want = next;
    }

    /// Back to [`INITIAL_CHUNK`]: returns the budget and drops the grown
    /// buffers (chunks the writer still holds keep theirs alive until
    /// written).
    fn shrink(&mut self) {
        self.want = INITIAL_CHUNK;
        self.buf = BytesMut::new();
        self.spare = BytesMut::new();
        self.grant.release();
        self.refused = false;
    }

    /// Makes `buf` able to take `want` bytes without allocating when either
    /// buffer's earlier chunks were all released by the writer.
    fn prepare_buf(&mut self) {
        if self.buf.capacity() >= self.want || self.buf.try_reclaim(self.want) {
            return;
        }
        std::mem::swap(&mut self.buf, &mut self.spare);
        if !self.buf.try_reclaim(self.want) {
            // Both still in use: the reader allocates afresh into `buf`;
            // the busier one stays as the spare.
            self.buf = BytesMut::new();
        }
    }

    /// Reads one chunk, then (for gathering readers) whatever else is ready.
    /// `Ready(Ok(()))` means `pending` holds data or `read_done` is set.
    fn poll_fill<R>(&mut self, cx: &mut Context<'_>, reader: &mut R) -> Poll<io::Result<()>>
    where
        R: Splice + ?Sized,
    {
        let mut gathered = 0;
        loop {
            self.prepare_buf();
            let r = reader.poll_read_chunk(cx, &mut self.buf, self.want);
            match r {
                Poll::Pending if self.pending.is_empty() => {
                    if self.grant.bytes() > 0 && self.last_read < INITIAL_CHUNK {
                        // Grown, but data now comes slower than we drain
                        // it: large buffers would sit idle.
                        self.shrink();
                    }
                    if self.want == INITIAL_CHUNK {
                        // Not bulk (request/response, or idle): hold no
                        // buffer while waiting. A readiness left over from
                        // the last read makes the reader reserve before it
                        // sees `WouldBlock`; keeping that buffer and the
                        // spare cost idle connections 16–32 KiB each.
                        self.buf = BytesMut::new();
                        self.spare = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) if self.pending.is_empty() => return Poll::Ready(Err(e)),
                Poll::Ready(Err(e)) => {
                    self.deferred = Some(e);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(chunk)) if chunk.is_empty() => {
                    self.read_done = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(chunk)) => {
                    self.last_read = chunk.len();
                    // A full read means bulk data: read bigger next time.
                    if chunk.len() >= self.want {
                        self.grow(reader.reads_into_buffer());
                    }
                    gathered += chunk.len();
                    self.pending.push(chunk);
                    if !reader.gathers()
                        || gathered >= self.want
                        || self.pending.len() >= MAX_GATHER
                    {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }

    /// Drops what was written from the front of `pending`.
    fn consume(&mut self, mut n: usize) {
        let mut whole = 0;
        for c in &mut self.pending {
            if n < c.len() {
                c.advance(n);
                break;
            }
            n -= c.len();
            whole += 1;
        }
        self.pending.drain(..whole);
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
                if let Some(e) = self.deferred.take() {
                    return Poll::Ready(Err(e));
                }
                match self.poll_fill(cx, reader) {
                    Poll::Pending => {
                        // Nothing more to read for now: push out what we wrote.
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                }
            }
            while !self.pending.is_empty() {
                let n = ready!(writer.poll_write_chunks(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.consume(n);
                self.total += n as u64;
                self.need_flush = true;
                if let Some(c) = counter {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            if let Some(e) = self.deferred.take() {
                return Poll::Ready(Err(e));
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                // Nothing more flows this way: give the memory back.
                self.shrink();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies `a → b` and `b → a` until both directions reached EOF (each EOF
/// half-closes the other side) or an error occurs. Never panics; returns the
/// counts moved so far together with the first error. Grown read buffers
/// take from [`CopyBudget::global`].
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    counters: Option<&CopyCounters>,
) -> CopyResult
where
    A: Splice + ?Sized,
    B: Splice + ?Sized,
{
    copy_with_budget(a, b, counters, CopyBudget::global()).await
}

/// [`copy_bidirectional`] with grown buffers taken from `budget`.
pub(crate) async fn copy_with_budget<A, B>(
    a: &mut A,
    b: &mut B,
    counters: Option<&CopyCounters>,
    budget: &CopyBudget,
) -> CopyResult
where
    A: Splice + ?Sized,
    B: Splice + ?Sized,
{
    let mut ab = Direction::new(budget);
    let mut ba = Direction::new(budget);
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
mod tests;

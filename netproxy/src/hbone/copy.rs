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
//! one vectored write.
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
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::HboneStream;
use super::budget::{CopyBudget, Grant};

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
/// Most chunks gathered for one vectored write.
const MAX_GATHER: usize = 16;

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

    /// `AsyncRead` for a test double read only through `poll_read_chunk`.
    macro_rules! chunk_reads_only {
        ($t:ty) => {
            impl AsyncRead for $t {
                fn poll_read(
                    self: Pin<&mut Self>,
                    _cx: &mut Context<'_>,
                    _buf: &mut ReadBuf<'_>,
                ) -> Poll<io::Result<()>> {
                    unreachable!("reads go through poll_read_chunk")
                }
            }
        };
    }

    /// Reads whole chunks from a queue (gathering, like an HBONE stream)
    /// and records the writes made to it.
    #[derive(Default)]
    struct Recorder {
        queued: std::collections::VecDeque<Bytes>,
        written: Vec<u8>,
        /// Chunks offered per write call.
        calls: Vec<usize>,
    }

    chunk_reads_only!(Recorder);

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Splice for Recorder {
        fn poll_read_chunk(
            &mut self,
            _cx: &mut Context<'_>,
            _buf: &mut BytesMut,
            _want: usize,
        ) -> Poll<io::Result<Bytes>> {
            Poll::Ready(Ok(self.queued.pop_front().unwrap_or_default()))
        }

        fn poll_write_chunks(
            &mut self,
            _cx: &mut Context<'_>,
            chunks: &[Bytes],
        ) -> Poll<io::Result<usize>> {
            self.calls.push(chunks.len());
            // Accept all but the last byte: the rest must be retried.
            let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            let n = if all.len() > 1 { all.len() - 1 } else { 1 };
            self.written.extend_from_slice(&all[..n]);
            Poll::Ready(Ok(n))
        }

        fn gathers(&self) -> bool {
            true
        }

        fn reads_into_buffer(&self) -> bool {
            false
        }
    }

    /// One scripted read of [`Filler`].
    #[derive(Clone, Copy)]
    enum Step {
        /// Fills the whole chunk the direction asks for.
        Full,
        Short(usize),
        Eof,
    }

    /// Reads into the direction's buffer (like a socket) as scripted;
    /// `Pending` once the script is empty.
    #[derive(Default)]
    struct Filler {
        script: std::collections::VecDeque<Step>,
    }

    impl Filler {
        fn push(&mut self, steps: &[Step]) {
            self.script.extend(steps);
        }
    }

    chunk_reads_only!(Filler);

    impl AsyncWrite for Filler {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            unreachable!("only read from")
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Splice for Filler {
        fn poll_read_chunk(
            &mut self,
            _cx: &mut Context<'_>,
            buf: &mut BytesMut,
            want: usize,
        ) -> Poll<io::Result<Bytes>> {
            let n = match self.script.pop_front() {
                None => return Poll::Pending,
                Some(Step::Eof) => 0,
                Some(Step::Full) => want,
                Some(Step::Short(n)) => n,
            };
            buf.clear();
            buf.resize(n, 0x5a);
            Poll::Ready(Ok(buf.split_to(n).freeze()))
        }
    }

    /// Polls `d` once with a no-op waker.
    fn poll_once(d: &mut Direction<'_>, from: &mut Filler, to: &mut Recorder) -> Poll<()> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        d.poll_copy(&mut cx, from, to, None)
            .map(|r| r.expect("scripted copy"))
    }

    #[test]
    fn growth_takes_budget_stops_when_it_is_full_and_gives_it_back() {
        const K: usize = 1024;
        // Room for one direction at 64 KiB (2 × 32 KiB, then 2 × 64 KiB).
        let budget = CopyBudget::new(BUFFERS * 64 * K);
        let (mut from, mut to) = (Filler::default(), Recorder::default());
        let mut d = Direction::new(&budget);
        from.push(&[Step::Full; 8]);
        assert!(poll_once(&mut d, &mut from, &mut to).is_pending());
        assert_eq!(d.want, 64 * K, "grew while the budget had room");
        assert_eq!((d.grant.bytes(), budget.held()), (128 * K, 128 * K));
        assert_eq!(budget.refused(), 1, "counted once, not per full read");

        // A second bulk direction finds the budget full: it stays small
        // and correct, and counts one refusal.
        let (mut from2, mut to2) = (Filler::default(), Recorder::default());
        let mut d2 = Direction::new(&budget);
        from2.push(&[Step::Full; 4]);
        assert!(poll_once(&mut d2, &mut from2, &mut to2).is_pending());
        assert_eq!((d2.want, d2.grant.bytes()), (INITIAL_CHUNK, 0));
        assert_eq!(d2.total, 4 * INITIAL_CHUNK as u64);
        assert_eq!(budget.refused(), 2);

        // A short read, then a wait: the first shrinks and returns it all.
        from.push(&[Step::Short(100)]);
        assert!(poll_once(&mut d, &mut from, &mut to).is_pending());
        assert_eq!((d.want, budget.held()), (INITIAL_CHUNK, 0));
        assert_eq!(d.buf.capacity() + d.spare.capacity(), 0);

        // Now the second one grows; dropping it mid-transfer returns it.
        from2.push(&[Step::Full; 2]);
        assert!(poll_once(&mut d2, &mut from2, &mut to2).is_pending());
        assert_eq!((d2.want, budget.held()), (64 * K, 128 * K));
        drop(d2);
        assert_eq!(budget.held(), 0);

        // EOF returns the budget too.
        from.push(&[Step::Full, Step::Full, Step::Eof]);
        assert!(poll_once(&mut d, &mut from, &mut to).is_ready());
        assert_eq!(budget.held(), 0);
        let kib = (16 + 32 + 6 * 64) + (16 + 32);
        assert_eq!(d.total, kib * K as u64 + 100);
    }

    #[test]
    fn small_chunks_never_touch_the_budget() {
        let budget = CopyBudget::new(0);
        let (mut from, mut to) = (Filler::default(), Recorder::default());
        let mut d = Direction::new(&budget);
        from.push(&[Step::Short(1000), Step::Short(INITIAL_CHUNK - 1), Step::Eof]);
        assert!(poll_once(&mut d, &mut from, &mut to).is_ready());
        assert_eq!(d.total, (1000 + INITIAL_CHUNK - 1) as u64);
        assert_eq!((budget.held(), budget.refused()), (0, 0));
    }

    #[tokio::test]
    async fn concurrent_bulk_copies_within_a_tiny_budget_deliver_every_byte() {
        let budget = CopyBudget::new(BUFFERS * 64 * 1024);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut transfers = Vec::new();
        for seed in 0..6u8 {
            let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (proxied, _) = l.accept().await.unwrap();
            let data: Vec<u8> = (0..3_000_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
                .collect();
            transfers.push(transfer(app, proxied, data, &budget));
        }
        tokio::time::timeout(std::time::Duration::from_secs(60), async {
            futures::future::join_all(transfers).await
        })
        .await
        .expect("copies finished in time");
        assert_eq!(budget.held(), 0);
        assert!(budget.refused() > 0, "six bulk copies must not all fit");
    }

    /// Sends `data` from `app` through a copy of `proxied` into an
    /// in-memory pipe and checks that all of it arrived intact.
    async fn transfer(
        mut app: TcpStream,
        mut proxied: TcpStream,
        data: Vec<u8>,
        budget: &CopyBudget,
    ) {
        let (mut near, mut far) = tokio::io::duplex(64 * 1024);
        let copy = copy_with_budget(&mut proxied, &mut near, None, budget);
        let send = async {
            app.write_all(&data).await.unwrap();
            app.shutdown().await.unwrap();
        };
        let recv = async {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            far.shutdown().await.unwrap();
            got
        };
        let (r, (), got) = tokio::join!(copy, send, recv);
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.a_to_b, data.len() as u64);
        assert!(got == data, "stream corrupted");
        assert!(budget.held() <= budget.limit());
    }

    #[tokio::test]
    async fn ready_chunks_are_gathered_into_one_write() {
        let mut from = Recorder::default();
        for part in [&b"abc"[..], b"defg", b"h"] {
            from.queued.push_back(Bytes::copy_from_slice(part));
        }
        let mut to = Recorder::default();
        let mut d = Direction::new(CopyBudget::global());
        poll_fn(|cx| d.poll_copy(cx, &mut from, &mut to, None))
            .await
            .unwrap();
        assert_eq!(to.written, b"abcdefgh");
        // Three chunks in one call; then the unwritten byte on its own.
        assert_eq!(to.calls, [3, 1]);
        assert_eq!(d.total, 8);
    }

    #[tokio::test]
    async fn a_waiting_direction_below_bulk_size_holds_no_buffer() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut from, _) = l.accept().await.unwrap();
        let mut to = Recorder::default();
        let mut d = Direction::new(CopyBudget::global());
        app.write_all(b"x").await.unwrap();
        // Copies the byte, then waits for more.
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            poll_fn(|cx| match d.poll_copy(cx, &mut from, &mut to, None) {
                Poll::Pending if d.total == 1 => Poll::Ready(()),
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => panic!("copy ended: {r:?}"),
            })
            .await
        })
        .await
        .unwrap();
        assert_eq!(to.written, b"x");
        assert_eq!(d.buf.capacity() + d.spare.capacity(), 0);
    }

    #[test]
    fn read_buffers_are_reused_once_the_writer_released_them() {
        let mut d = Direction::new(CopyBudget::global());
        d.buf.reserve(d.want);
        let first = d.buf.as_ptr();
        let held = d.buf.split_to(0).freeze();
        // Fill the buffer completely, as a full read does.
        d.buf.resize(d.buf.capacity(), 0);
        let chunk = d.buf.split().freeze();
        // The writer still holds the chunk: the other buffer is used.
        d.prepare_buf();
        assert_ne!(d.buf.as_ptr(), first);
        d.buf.reserve(d.want);
        let second = d.buf.as_ptr();
        d.buf.resize(d.buf.capacity(), 0);
        let chunk2 = d.buf.split().freeze();
        // Once released, the first allocation comes back without allocating.
        drop((held, chunk));
        d.prepare_buf();
        assert_eq!(d.buf.as_ptr(), first);
        assert!(d.buf.capacity() >= d.want);
        drop(chunk2);
        d.buf.resize(d.buf.capacity(), 0);
        let _chunk3 = d.buf.split().freeze();
        d.prepare_buf();
        assert_eq!(d.buf.as_ptr(), second);
    }
}

//! Unit tests of the copy: half-close and counts, chunk growth against the
//! budget, gathering, buffer reuse and release.

use super::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

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
async fn transfer(mut app: TcpStream, mut proxied: TcpStream, data: Vec<u8>, budget: &CopyBudget) {
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

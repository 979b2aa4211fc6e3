//! The parts of an HBONE CONNECT request a peer controls: `:authority`
//! (the destination; must be ip:port), `forwarded` (original client and
//! service host), `baggage` and `traceparent`. Input: one line each, then a
//! source address and a service host for the client-side writer. Checks
//! round trips against the functions that write those headers.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use netproxy::hbone::{
    Baggage, TraceParent, forwarded_for, forwarded_header, forwarded_host, parse_authority,
};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let mut next = || lines.next().unwrap_or_default();
    let authority = next();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (forwarded, baggage, traceparent) = (text(next()), text(next()), text(next()));
    let src: Option<SocketAddr> = text(next()).parse().ok();
    let host = text(next());

    if let Ok(uri) = http::Uri::try_from(authority)
        && let Ok(dst) = parse_authority(&uri)
    {
        assert_ne!(dst.port(), 0);
        let again = http::Uri::try_from(dst.to_string()).expect("a socket address is a URI");
        assert_eq!(parse_authority(&again), Ok(dst));
    }

    let _ = forwarded_for(&forwarded);
    let _ = forwarded_host(&forwarded);
    // What our client writes, our server reads back.
    if let Some(src) = src {
        let host = Some(host.as_str()).filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        });
        let written = forwarded_header(src, host);
        assert_eq!(forwarded_for(&written), Some(src.ip()), "{written}");
        assert_eq!(forwarded_host(&written).as_deref(), host, "{written}");
    }

    let b = Baggage::parse(&baggage);
    assert_eq!(Baggage::parse(&b.to_header()), b, "{:?}", b.to_header());

    if let Some(t) = TraceParent::parse(&traceparent) {
        assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
        assert_eq!(
            t.to_string(),
            traceparent.to_ascii_lowercase(),
            "a traceparent that is not 00-<32 hex>-<16 hex>-<2 hex> was accepted"
        );
    }
});

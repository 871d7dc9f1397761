//! Fuzz targets: one function per kind of input pgpilot takes from a peer it
//! does not trust (client framing and the server stream's scanner, the
//! startup packet, SASL and MD5 messages, `hba_file` text, SQL for the
//! classifier). Each takes arbitrary bytes and must return without a panic,
//! a hang or an allocation beyond the limit the input's length check sets;
//! each also checks the invariants a caller relies on (a frame never exceeds
//! `max_message_size`, a statement starting with a write keyword is a write).
//!
//! The same functions serve two runners: `tests/fuzz.rs` (a seed corpus plus
//! bounded random mutations, seconds, in CI) and the `fuzz/` crate for
//! `cargo +nightly fuzz run <target>` (libFuzzer, for hours by hand; see
//! `docs/fuzzing.md`).

use std::sync::OnceLock;

use bytes::{Buf, BytesMut};

use crate::config::hba::{HbaRules, Peer};
use crate::protocol::auth::{
    ScramKeyClient, ScramKeys, ScramServer, ScramVerifier, md5_check, md5_check_stored,
};
use crate::protocol::frame::{BackendScanner, ErrorFields, cstr, missing_bytes, next_frame};
use crate::protocol::startup::{InitialPacket, MAX_STARTUP_PACKET, parse_initial};
use crate::router::cache::ClassifyCache;
use crate::router::classify::SqlParserClassifier;
use crate::router::classify::check::check_classification;

/// A fuzz target: any bytes in, a panic on a broken invariant.
pub type Target = fn(&[u8]);

/// The targets by name, as `cargo fuzz run <name>` and `tests/fuzz.rs` know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame", frame),
    ("startup", startup),
    ("sasl", sasl),
    ("hba", hba),
    ("classify", classify),
];

/// The largest bytes the server stream scanner holds whole (its decoded
/// messages: ReadyForQuery, ErrorResponse …), as `protocol::frame` bounds them.
const SCANNER_HOLD_LIMIT: usize = 1 << 20;

/// Client → pgpilot framing, and pgpilot's scan of a server's stream.
///
/// The first byte sets `max_message_size` (1 KiB to 17 KiB) and the size of
/// the reads the bytes arrive in; the rest is the stream. A frame is never
/// longer than the maximum, and the read buffer never grows past it by more
/// than what one read adds (the length prefix is checked before anything is
/// reserved). The scanner forwards only what it has seen and holds at most
/// one decoded message.
pub fn frame(data: &[u8]) {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let max = 1024 + usize::from(sel) * 64;
    let read = usize::from(sel % 13) + 1;
    let mut buf = BytesMut::new();
    'client: for piece in stream.chunks(read) {
        buf.extend_from_slice(piece);
        loop {
            match next_frame(&mut buf, max) {
                Ok(Some(f)) => {
                    assert!((5..=max + 1).contains(&f.wire_len), "{f:?} max {max}");
                    let body = f.body(&buf);
                    let _ = ErrorFields::parse(body);
                    let _ = cstr(body);
                    buf.advance(f.wire_len);
                }
                Ok(None) => {
                    assert!(missing_bytes(&buf) <= max + 1);
                    break;
                }
                // The session answers 08P01 and closes.
                Err(_) => break 'client,
            }
        }
        // BytesMut may double its capacity when it grows.
        assert!(
            buf.capacity() <= 2 * (max + 1 + read) + 64,
            "{}",
            buf.capacity()
        );
    }

    let mut scanner = BackendScanner::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    for piece in stream.chunks(read) {
        pending.extend_from_slice(piece);
        events.clear();
        let Ok(n) = scanner.scan(&pending, &mut events) else {
            return;
        };
        assert!(n <= pending.len());
        for e in &events {
            assert!(e.start < e.end && e.end <= n, "{e:?} past {n}");
        }
        pending.drain(..n);
        assert!(pending.len() <= SCANNER_HOLD_LIMIT + read);
    }
}

/// The first packet's body (after its length, which pgpilot checks against
/// [`MAX_STARTUP_PACKET`] before reading it).
pub fn startup(data: &[u8]) {
    let body = &data[..data.len().min(MAX_STARTUP_PACKET - 4)];
    if let Ok(InitialPacket::Startup(m)) = parse_initial(body) {
        let _ = m.get("user");
        let _ = m.get("database");
        assert!(m.params.len() + m.protocol_options.len() <= body.len() / 2);
    }
}

/// A verifier (4096 iterations, derived once).
fn verifier() -> &'static ScramVerifier {
    static V: OnceLock<ScramVerifier> = OnceLock::new();
    V.get_or_init(|| {
        ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(b"fuzz"))
            .expect("postgres-protocol makes valid verifiers")
    })
}

/// The client's SASL messages to pgpilot's SCRAM server, the nodes' messages
/// to its SCRAM client (pass-through), and MD5 answers.
///
/// The input is two messages separated by the first `0xff` byte. Each runs
/// raw (as a client may send it), and wrapped: the first as a well-formed
/// SASLInitialResponse, the second with `@N` replaced by the nonce the server
/// chose, so the fuzzer's bytes also reach the attribute and proof checks.
/// No guessed input may authenticate.
pub fn sasl(data: &[u8]) {
    let (first, last) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let v = verifier();
    let mut raw = ScramServer::new(v.clone());
    if raw.client_first(first).is_ok() {
        assert!(raw.client_final(last).is_err(), "a guessed proof verified");
    }
    let mut wrapped = ScramServer::new(v.clone());
    let mut initial = b"SCRAM-SHA-256\0".to_vec();
    initial.extend_from_slice(&(first.len() as i32).to_be_bytes());
    initial.extend_from_slice(first);
    if let Ok(server_first) = wrapped.client_first(&initial) {
        let nonce = server_first
            .split(|b| *b == b',')
            .find_map(|a| a.strip_prefix(b"r="))
            .unwrap_or_default()
            .to_vec();
        let mut last = last.to_vec();
        if let Some(i) = last.windows(2).position(|w| w == b"@N") {
            last.splice(i..i + 2, nonce);
        }
        assert!(
            wrapped.client_final(&last).is_err(),
            "a guessed proof verified"
        );
        assert!(wrapped.proven_keys().is_none());
    }
    let keys = ScramKeys {
        client_key: [7; 32],
        verifier: v.clone(),
    };
    let (mut client, _) = ScramKeyClient::new(keys);
    if client.server_first(first).is_ok() {
        assert!(
            client.server_final(last).is_err(),
            "a forged server signature"
        );
    }
    assert!(!md5_check("u", "p", [1, 2, 3, 4], data));
    assert!(!md5_check_stored(
        "md5a8b2c3d4e5f60718293a4b5c6d7e8f9",
        [1, 2, 3, 4],
        data
    ));
    let _ = ScramVerifier::parse(&String::from_utf8_lossy(data));
}

/// `hba_file` text; when it parses, its lookup for a few clients.
pub fn hba(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(rules) = HbaRules::parse(&text) else {
        return;
    };
    assert!(rules.len() <= text.lines().count());
    for (addr, tls) in [
        ("127.0.0.1", false),
        ("10.1.2.3", true),
        ("::1", false),
        ("2001:db8::7", true),
        ("::ffff:192.168.0.1", false),
    ] {
        for (user, database) in [("app", "app"), ("postgres", "replication"), ("", "")] {
            let peer = Peer {
                addr: addr.parse().expect("an address"),
                tls,
                user,
                database,
            };
            if let Some(v) = rules.lookup(&peer) {
                assert!(v.line >= 1 && v.line <= text.lines().count().max(1));
            }
        }
    }
}

/// SQL as a client sends it (any bytes: the cache refuses what is not UTF-8).
pub fn classify(data: &[u8]) {
    static SHARED: OnceLock<(SqlParserClassifier, ClassifyCache)> = OnceLock::new();
    let (classifier, cache) =
        SHARED.get_or_init(|| (SqlParserClassifier::default(), ClassifyCache::new(4096)));
    let Ok(sql) = std::str::from_utf8(data) else {
        assert!(cache.classify(data, || classifier).is_none());
        return;
    };
    let bits = data
        .iter()
        .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(*b));
    check_classification(classifier, cache, sql, bits);
}

//! Reading the SNI of a TLS ClientHello without terminating TLS.
//!
//! A Gateway server in `tls.mode: PASSTHROUGH` routes by the VirtualService's `tls:` rules,
//! which match on `sniHosts`. veer never decrypts: it peeks at the client's first flight,
//! parses just enough of the ClientHello to find `server_name`, and leaves every byte in the
//! socket so the relay forwards the hello to the backend unchanged.
//!
//! [`parse_client_hello`] is pure (bytes in, verdict out) so it can be tested at every
//! truncation and on garbage; [`peek_sni`] is the small async loop around `peek`.

use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// TLS record header: content type (1), legacy version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;
/// Handshake header: message type (1), length (3).
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXTENSION_SERVER_NAME: u16 = 0x0000;
const SERVER_NAME_HOST_NAME: u8 = 0x00;
/// RFC 8446 §5.1: a plaintext record fragment is at most 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;

/// Largest ClientHello handshake message (its 4-byte header included) veer reads. One
/// maximum-size record: browsers send ~0.5–2 KiB even with post-quantum key shares and PSK
/// tickets, so a bigger hello is not worth buffering for every connection on a gateway.
pub const MAX_CLIENT_HELLO_LEN: usize = MAX_RECORD_PAYLOAD;

/// Largest number of bytes [`peek_sni`] buffers: the hello plus the headers of up to 16
/// records. A hello only needs to span records when it exceeds one record (which the bound
/// above refuses anyway), so 16 is generous for odd clients without letting a client that
/// sends one-byte records grow the buffer five-fold.
pub const MAX_PEEK_BYTES: usize = MAX_CLIENT_HELLO_LEN + 16 * RECORD_HEADER_LEN;

/// What veer needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `server_name` extension's host name, lowercased; `None` if the client sent none.
    pub sni: Option<String>,
    /// Bytes of the connection's first flight the hello occupied (record headers included).
    pub wire_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsParseError {
    /// Parsing can only go on once the buffer holds at least `needed` bytes in total.
    #[error("incomplete ClientHello: need at least {needed} bytes")]
    Incomplete { needed: usize },
    #[error("not a TLS handshake")]
    NotTls,
    #[error("the first TLS handshake message is not a ClientHello")]
    NotClientHello,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO_LEN} bytes")]
    TooLarge,
}

/// Parses the ClientHello at the start of a connection's bytes.
///
/// The handshake message may be split over several consecutive handshake records; their
/// payloads are reassembled. Bytes after the hello (e.g. early data) are ignored.
pub fn parse_client_hello(buf: &[u8]) -> Result<ClientHello, TlsParseError> {
    // Reject plain-text protocols on the first bytes, so a non-TLS client is not kept waiting
    // for a record header it will never send.
    if buf.first().is_some_and(|&b| b != CONTENT_TYPE_HANDSHAKE)
        || buf.get(1).is_some_and(|&b| b != 3)
    {
        return Err(TlsParseError::NotTls);
    }
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        if buf.len() < pos + RECORD_HEADER_LEN {
            return Err(incomplete(pos + RECORD_HEADER_LEN));
        }
        let header = &buf[pos..pos + RECORD_HEADER_LEN];
        if header[0] != CONTENT_TYPE_HANDSHAKE {
            // Only the first record decides whether this is TLS at all; a later one of another
            // type means the hello was cut short by, say, an alert.
            return Err(if pos == 0 {
                TlsParseError::NotTls
            } else {
                TlsParseError::Malformed("ClientHello interrupted by a non-handshake record")
            });
        }
        if header[1] != 3 {
            return Err(if pos == 0 {
                TlsParseError::NotTls
            } else {
                TlsParseError::Malformed("record version is not TLS")
            });
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            // RFC 8446 §5.1: zero-length handshake fragments must not be sent.
            return Err(TlsParseError::Malformed("empty handshake record"));
        }
        if len > MAX_RECORD_PAYLOAD {
            return Err(TlsParseError::Malformed("record longer than 2^14 bytes"));
        }
        let record_end = pos + RECORD_HEADER_LEN + len;
        if record_end > MAX_PEEK_BYTES {
            return Err(TlsParseError::TooLarge);
        }
        let payload_start = pos + RECORD_HEADER_LEN;
        let available = &buf[payload_start..record_end.min(buf.len())];
        handshake.extend_from_slice(available);

        if handshake.len() >= HANDSHAKE_HEADER_LEN {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(TlsParseError::NotClientHello);
            }
            let msg_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if HANDSHAKE_HEADER_LEN + msg_len > MAX_CLIENT_HELLO_LEN {
                return Err(TlsParseError::TooLarge);
            }
            let total = HANDSHAKE_HEADER_LEN + msg_len;
            if handshake.len() >= total {
                let consumed_here = total - (handshake.len() - available.len());
                return Ok(ClientHello {
                    sni: parse_body(&handshake[HANDSHAKE_HEADER_LEN..total])?,
                    wire_len: payload_start + consumed_here,
                });
            }
        } else if handshake
            .first()
            .is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO)
        {
            return Err(TlsParseError::NotClientHello);
        }
        if buf.len() < record_end {
            return Err(incomplete(record_end));
        }
        pos = record_end;
    }
}

fn incomplete(needed: usize) -> TlsParseError {
    if needed > MAX_PEEK_BYTES {
        TlsParseError::TooLarge
    } else {
        TlsParseError::Incomplete { needed }
    }
}

/// A cursor over a complete message: running short here is malformation, not incompleteness.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TlsParseError> {
        if self.0.len() < n {
            return Err(TlsParseError::Malformed(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, TlsParseError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, TlsParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], TlsParseError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], TlsParseError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

/// The ClientHello body (RFC 8446 §4.1.2; the TLS 1.0–1.2 layout is the same).
fn parse_body(body: &[u8]) -> Result<Option<String>, TlsParseError> {
    let mut r = Reader(body);
    r.take(2, "truncated legacy_version")?;
    r.take(32, "truncated random")?;
    if r.vec8("truncated session id")?.len() > 32 {
        return Err(TlsParseError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16("truncated cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(TlsParseError::Malformed("bad cipher suites length"));
    }
    if r.vec8("truncated compression methods")?.is_empty() {
        return Err(TlsParseError::Malformed("no compression methods"));
    }
    if r.0.is_empty() {
        // Pre-TLS 1.2 clients may omit the extensions block entirely.
        return Ok(None);
    }
    let mut extensions = Reader(r.vec16("truncated extensions")?);
    if !r.0.is_empty() {
        return Err(TlsParseError::Malformed("bytes after the extensions"));
    }
    let mut sni = None;
    let mut seen_server_name = false;
    while !extensions.0.is_empty() {
        let kind = extensions.u16("truncated extension type")?;
        let data = extensions.vec16("truncated extension")?;
        if kind != EXTENSION_SERVER_NAME {
            continue;
        }
        // RFC 8446 §4.2: at most one extension of each type.
        if seen_server_name {
            return Err(TlsParseError::Malformed("duplicate server_name extension"));
        }
        seen_server_name = true;
        sni = parse_server_name(data)?;
    }
    Ok(sni)
}

/// The `server_name` extension data (RFC 6066 §3): a list of (type, name); veer wants the
/// host name, of which there is at most one.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, TlsParseError> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16("truncated server name list")?);
    if !r.0.is_empty() {
        return Err(TlsParseError::Malformed("bytes after the server name list"));
    }
    if list.0.is_empty() {
        return Err(TlsParseError::Malformed("empty server name list"));
    }
    let mut host = None;
    while !list.0.is_empty() {
        let name_type = list.u8("truncated server name type")?;
        let name = list.vec16("truncated server name")?;
        if name_type != SERVER_NAME_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err(TlsParseError::Malformed("more than one host_name"));
        }
        host = Some(host_name(name)?);
    }
    Ok(host)
}

/// Validates a host name the way a router needs: ASCII letters, digits, `-` and `_` in dot
/// separated labels of 1–63 bytes, 253 bytes at most; lowercased. A trailing dot is dropped
/// (RFC 6066 forbids it, but some clients send it and it names the same host).
fn host_name(raw: &[u8]) -> Result<String, TlsParseError> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > 253 {
        return Err(TlsParseError::Malformed("server name has a bad length"));
    }
    for label in raw.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > 63 {
            return Err(TlsParseError::Malformed("server name has a bad label"));
        }
        if !label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TlsParseError::Malformed(
                "server name is not an ASCII host name",
            ));
        }
    }
    // Checked ASCII above, so this cannot fail.
    Ok(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsPeekError {
    #[error("no complete ClientHello within {waited:?} ({got} bytes received)")]
    Timeout { waited: Duration, got: usize },
    #[error("connection closed before a complete ClientHello ({got} bytes received)")]
    Eof { got: usize },
    #[error(transparent)]
    Tls(#[from] TlsParseError),
    #[error("reading the ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

/// First peek size: a typical ClientHello (300–600 bytes, ~1.8 KiB with post-quantum key
/// shares) arrives in one segment, so it is usually read in one syscall without allocating
/// the full bound for every connection.
const INITIAL_PEEK_BYTES: usize = 2048;
/// Backoff while waiting for the rest of a hello, see [`peek_sni`].
const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(50);

/// Reads the SNI of the ClientHello at the start of `stream` without consuming any bytes.
///
/// Waits at most `timeout` in total and buffers at most [`MAX_PEEK_BYTES`].
///
/// Why it sleeps: `peek` leaves the bytes queued, so the socket stays readable and waiting
/// for readability returns at once — a loop on it would spin on a client that sent half a
/// hello. Instead, when a peek brings nothing new, the task sleeps with a backoff from 1 ms
/// doubling to 50 ms. A hello nearly always arrives in one segment, so this costs nothing in
/// the common case and at most ~50 ms for a client that pauses mid-hello. (`SO_RCVLOWAT`
/// would let the kernel wake us instead, but tokio's cached readiness is not cleared by a
/// successful peek, so it would still spin.)
pub async fn peek_sni(
    stream: &TcpStream,
    timeout: Duration,
) -> Result<Option<String>, TlsPeekError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let timed_out = |got| TlsPeekError::Timeout {
        waited: start.elapsed(),
        got,
    };
    let mut buf = vec![0u8; INITIAL_PEEK_BYTES];
    let mut last_len = 0;
    let mut backoff = MIN_BACKOFF;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| timed_out(last_len))??;
        if n == 0 {
            return Err(TlsPeekError::Eof { got: 0 });
        }
        let needed = match parse_client_hello(&buf[..n]) {
            Ok(hello) => return Ok(hello.sni),
            Err(TlsParseError::Incomplete { needed }) => needed,
            Err(e) => return Err(e.into()),
        };
        if n > last_len {
            last_len = n;
            backoff = MIN_BACKOFF;
        }
        if n == buf.len() && n < MAX_PEEK_BYTES {
            // The buffer was full: more bytes may already be queued. `needed` is bounded by
            // MAX_PEEK_BYTES (the parser says TooLarge beyond it).
            buf.resize(needed.max(n + 1).min(MAX_PEEK_BYTES), 0);
            continue;
        }
        // Everything queued has been seen. A FIN cannot show through `peek` while data is
        // queued (it keeps returning the data), but the readiness tokio tracks records it.
        let ready = stream.ready(Interest::READABLE).await?;
        if ready.is_read_closed() {
            return Err(TlsPeekError::Eof { got: n });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(timed_out(n));
        }
        tokio::time::sleep_until((now + backoff).min(deadline)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `openssl s_client -servername a.example` (OpenSSL 3.0), as captured by a local
    /// listener: one record, TLS 1.3 with TLS 1.2 fallback.
    const OPENSSL_HELLO_SNI: &str = "160301013601000132030369a6122529626e70d208af1c28aa4e87982543a7658bfe404f777d5c568aef3820788796317b2d56b24519099c11bd9c4540c7cf564ab6d498aeac8559ab9fe526003e130213031301c02cc030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010000ab0000000e000c000009612e6578616d706c65000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b0009080304030303020301002d00020101003300260024001d00202d02030711873e2dd4f3872c2aa571427c54502810a4ac8fd8314bbd282a1645";
    /// The same with `-noservername`.
    const OPENSSL_HELLO_NO_SNI: &str = "16030101240100012003032791034e3e5c1af24142b3b4b5f9626017e01c2de7ee2f384e64eacc84c1884820819eccf5426b03f95f4b8a6222ebf7f3c125fa7a740770e3e4c533a0bc811feb003e130213031301c02cc030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff01000099000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b0009080304030303020301002d00020101003300260024001d002006945dc4132968fa1896090f55d6dd8b9bcd47ac4dcb53996483853913311570";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A minimal ClientHello handshake message (header included), per RFC 8446 §4.1.2,
    /// with an optional SNI and a padding extension of `pad` bytes.
    fn hello_message(sni: Option<&str>, pad: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![SERVER_NAME_HOST_NAME];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
            exts.extend_from_slice(&EXTENSION_SERVER_NAME.to_be_bytes());
            exts.extend_from_slice(&(list.len() as u16 + 2).to_be_bytes());
            exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
            exts.extend_from_slice(&list);
        }
        if pad > 0 {
            exts.extend_from_slice(&21u16.to_be_bytes()); // padding (RFC 7685)
            exts.extend_from_slice(&(pad as u16).to_be_bytes());
            exts.extend(std::iter::repeat_n(0u8, pad));
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// Wraps handshake bytes in handshake records, cutting at the given payload offsets.
    fn records(handshake: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(handshake.len());
        for w in bounds.windows(2) {
            let frag = &handshake[w[0]..w[1]];
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(frag.len() as u16).to_be_bytes());
            out.extend_from_slice(frag);
        }
        out
    }

    fn sni(buf: &[u8]) -> Result<Option<String>, TlsParseError> {
        parse_client_hello(buf).map(|h| h.sni)
    }

    #[test]
    fn openssl_hello_with_and_without_sni() {
        let with = hex(OPENSSL_HELLO_SNI);
        let hello = parse_client_hello(&with).unwrap();
        assert_eq!(hello.sni.as_deref(), Some("a.example"));
        assert_eq!(hello.wire_len, with.len());
        assert_eq!(sni(&hex(OPENSSL_HELLO_NO_SNI)), Ok(None));
    }

    #[test]
    fn handmade_hello_lowercases_and_ignores_trailing_bytes() {
        let mut wire = records(&hello_message(Some("API.Example.COM."), 0), &[]);
        let len = wire.len();
        wire.extend_from_slice(&[0x14, 3, 3, 0, 1, 1]); // a ChangeCipherSpec record after it
        let hello = parse_client_hello(&wire).unwrap();
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        assert_eq!(hello.wire_len, len);
    }

    #[test]
    fn hello_fragmented_across_records() {
        let msg = hex(OPENSSL_HELLO_SNI)[RECORD_HEADER_LEN..].to_vec();
        // Cut inside the handshake header, inside the SNI, and in three pieces.
        for cuts in [&[2][..], &[130], &[1, 200], &[HANDSHAKE_HEADER_LEN]] {
            let wire = records(&msg, cuts);
            let hello = parse_client_hello(&wire).unwrap();
            assert_eq!(hello.sni.as_deref(), Some("a.example"), "cuts {cuts:?}");
            assert_eq!(hello.wire_len, wire.len());
        }
    }

    #[test]
    fn every_truncation_is_incomplete_and_asks_for_no_more_than_the_whole() {
        let msg = hex(OPENSSL_HELLO_SNI)[RECORD_HEADER_LEN..].to_vec();
        for wire in [hex(OPENSSL_HELLO_SNI), records(&msg, &[3, 150])] {
            for len in 0..wire.len() {
                match parse_client_hello(&wire[..len]) {
                    Err(TlsParseError::Incomplete { needed }) => {
                        assert!(needed > len && needed <= wire.len(), "{len}: {needed}")
                    }
                    other => panic!("prefix of {len} bytes: {other:?}"),
                }
            }
            // Following `needed` reaches the complete hello.
            let mut have = 0;
            let mut steps = 0;
            while let Err(TlsParseError::Incomplete { needed }) = parse_client_hello(&wire[..have])
            {
                have = needed;
                steps += 1;
                assert!(steps < 10);
            }
            assert_eq!(sni(&wire[..have]), Ok(Some("a.example".into())));
        }
    }

    #[test]
    fn not_tls_and_not_client_hello() {
        assert_eq!(sni(b"GET / HTTP/1.1\r\n"), Err(TlsParseError::NotTls));
        assert_eq!(sni(b"G"), Err(TlsParseError::NotTls));
        assert_eq!(sni(&[0x16, 0x02]), Err(TlsParseError::NotTls));
        // A ServerHello (type 2) where a ClientHello should be.
        let mut msg = hello_message(None, 0);
        msg[0] = 2;
        assert_eq!(sni(&records(&msg, &[])), Err(TlsParseError::NotClientHello));
        assert_eq!(
            sni(&records(&msg, &[])[..6]),
            Err(TlsParseError::NotClientHello)
        );
        // An alert record in the middle of a fragmented hello.
        let mut wire = records(&hello_message(Some("a.example"), 0), &[10]);
        wire[RECORD_HEADER_LEN + 10] = 0x15;
        assert!(matches!(sni(&wire), Err(TlsParseError::Malformed(_))));
    }

    #[test]
    fn malformed_names_and_lists() {
        for bad in [
            "",
            "a..b",
            "a b",
            "é.example",
            &"x".repeat(64),
            "a.example/",
        ] {
            let wire = records(&hello_message(Some(bad), 0), &[]);
            assert!(
                matches!(sni(&wire), Err(TlsParseError::Malformed(_))),
                "{bad:?}"
            );
        }
        // Two server_name extensions.
        let one = hello_message(Some("a.example"), 0);
        let ext = &one[one.len() - 18..]; // type, len, list len, type, name len, "a.example"
        assert_eq!(&ext[..2], &[0, 0]);
        let mut twice = one.clone();
        twice.extend_from_slice(ext);
        let body_len = twice.len() - HANDSHAKE_HEADER_LEN;
        twice[1..4].copy_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        let ext_len_at = HANDSHAKE_HEADER_LEN + 2 + 32 + 1 + 4 + 2;
        let exts = (twice.len() - ext_len_at - 2) as u16;
        twice[ext_len_at..ext_len_at + 2].copy_from_slice(&exts.to_be_bytes());
        assert_eq!(
            sni(&records(&twice, &[])),
            Err(TlsParseError::Malformed("duplicate server_name extension"))
        );
    }

    #[test]
    fn oversized_hello_is_refused_early() {
        // A hello declaring more than the bound is refused from its header alone.
        let big = hello_message(Some("a.example"), MAX_CLIENT_HELLO_LEN);
        let wire = records(&big, &[MAX_RECORD_PAYLOAD]);
        assert_eq!(sni(&wire), Err(TlsParseError::TooLarge));
        assert_eq!(sni(&wire[..9]), Err(TlsParseError::TooLarge));
        // Just under the bound is fine, in one record or split in many small ones.
        let base = hello_message(Some("a.example"), 0).len();
        let fits = hello_message(Some("a.example"), MAX_CLIENT_HELLO_LEN - base - 4);
        assert_eq!(fits.len(), MAX_CLIENT_HELLO_LEN);
        assert!(sni(&records(&fits, &[])).unwrap().is_some());
        let cuts: Vec<usize> = (1..16).map(|i| i * 1000).collect();
        assert!(sni(&records(&fits, &cuts)).unwrap().is_some());
        // Tiny records exhaust the byte budget on headers and are refused, not buffered.
        let cuts: Vec<usize> = (1..fits.len()).step_by(2).collect();
        let wire = records(&fits, &cuts);
        assert_eq!(sni(&wire), Err(TlsParseError::TooLarge));
    }

    /// xorshift64*: a fixed-seed generator so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let real = hex(OPENSSL_HELLO_SNI);
        for i in 0..20_000 {
            let mut buf: Vec<u8> = if i % 2 == 0 {
                let len = (rng.next() % 600) as usize;
                let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                // Half of these get a plausible record header so parsing goes deeper.
                if i % 4 == 0 && b.len() >= 6 {
                    b[..3].copy_from_slice(&[0x16, 3, 1]);
                    b[5] = 1;
                }
                b
            } else {
                // Mutate a real hello in a few places.
                let mut b = real.clone();
                for _ in 0..(1 + rng.next() % 4) {
                    let at = (rng.next() as usize) % b.len();
                    b[at] = rng.next() as u8;
                }
                b
            };
            if i % 3 == 0 {
                let keep = (rng.next() as usize) % (buf.len() + 1);
                buf.truncate(keep);
            }
            if let Err(TlsParseError::Incomplete { needed }) = parse_client_hello(&buf) {
                assert!(needed > buf.len() && needed <= MAX_PEEK_BYTES);
            }
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.set_nodelay(true).unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn peek_reads_a_hello_sent_in_two_chunks_and_leaves_it_queued() {
        let (mut client, mut server) = pair().await;
        let wire = hex(OPENSSL_HELLO_SNI);
        let sent = wire.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent[..100]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
            client.write_all(&sent[100..]).await.unwrap();
            client
        });
        let got = peek_sni(&server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.as_deref(), Some("a.example"));
        let _client = writer.await.unwrap();
        // The relay still sees the hello from its first byte.
        let mut read = vec![0; wire.len()];
        server.read_exact(&mut read).await.unwrap();
        assert_eq!(read, wire);
    }

    #[tokio::test]
    async fn peek_grows_past_the_initial_buffer() {
        let (mut client, server) = pair().await;
        let big = records(&hello_message(Some("big.example"), 6000), &[3000]);
        client.write_all(&big).await.unwrap();
        let got = peek_sni(&server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.as_deref(), Some("big.example"));
    }

    #[tokio::test]
    async fn peek_times_out_on_a_stalled_client() {
        let (mut client, server) = pair().await;
        let wire = hex(OPENSSL_HELLO_SNI);
        client.write_all(&wire[..50]).await.unwrap();
        let start = std::time::Instant::now();
        let err = peek_sni(&server, Duration::from_millis(200))
            .await
            .unwrap_err();
        let waited = start.elapsed();
        assert!(
            matches!(err, TlsPeekError::Timeout { got: 50, .. }),
            "{err}"
        );
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        // A client that never sends anything times out too.
        let (_client, server) = pair().await;
        let err = peek_sni(&server, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, TlsPeekError::Timeout { got: 0, .. }), "{err}");
        drop(client);
    }

    #[tokio::test]
    async fn peek_reports_eof_and_plain_text() {
        let (mut client, server) = pair().await;
        client
            .write_all(&hex(OPENSSL_HELLO_SNI)[..40])
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let err = peek_sni(&server, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, TlsPeekError::Eof { got: 40 }), "{err}");

        let (client, server) = pair().await;
        drop(client);
        let err = peek_sni(&server, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, TlsPeekError::Eof { got: 0 }), "{err}");

        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let err = peek_sni(&server, Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(err, TlsPeekError::Tls(TlsParseError::NotTls)),
            "{err}"
        );
    }
}

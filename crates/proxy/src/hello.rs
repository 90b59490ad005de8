//! An app's first bytes on a connection it speaks TLS on itself: read without answering, so
//! the server name of its ClientHello can be checked before anything is sent on.

use tokio::io::AsyncReadExt;

/// A ClientHello larger than this is not waited for.
const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Why no ClientHello could be checked.
#[derive(Debug)]
pub enum HelloError {
    /// The app sent something that is refused: the metric reason and why.
    Refused(&'static str, String),
    /// The app went away, or reading failed.
    Ended(String),
}

/// A server name as compared: lowercase, without the root dot.
pub fn fold(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// What an app's first bytes turned out to be.
pub enum Hello {
    NotTls,
    Tls(Option<String>),
    /// Encrypted Client Hello (or the older encrypted SNI): the real name is not visible.
    Hidden,
}

/// TLS extension types that hide the server name from anyone on the path.
const HIDING_EXTENSIONS: [u16; 2] = [0xfe0d, 0xffce];

/// The extension types of the ClientHello in `records` (TLS records as sent), if it parses.
fn hello_extensions(records: &[u8]) -> Option<Vec<u16>> {
    // Join the handshake bytes of the records.
    let mut hs = Vec::new();
    let mut rest = records;
    while rest.len() >= 5 && rest[0] == 0x16 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let body = rest.get(5..5 + len)?;
        hs.extend_from_slice(body);
        rest = &rest[5 + len..];
    }
    let take = |at: &mut usize, n: usize| -> Option<std::ops::Range<usize>> {
        let r = *at..at.checked_add(n)?;
        if r.end > hs.len() {
            return None;
        }
        *at = r.end;
        Some(r)
    };
    let mut at = 0;
    if hs.first() != Some(&1) {
        return None;
    }
    take(&mut at, 4)?; // type and length
    take(&mut at, 2 + 32)?; // legacy version and random
    let sid = usize::from(hs[take(&mut at, 1)?.start]);
    take(&mut at, sid)?;
    let suites = take(&mut at, 2)?;
    take(
        &mut at,
        usize::from(u16::from_be_bytes([hs[suites.start], hs[suites.start + 1]])),
    )?;
    let comp = usize::from(hs[take(&mut at, 1)?.start]);
    take(&mut at, comp)?;
    let ext_len = take(&mut at, 2)?;
    let end = at
        + usize::from(u16::from_be_bytes([
            hs[ext_len.start],
            hs[ext_len.start + 1],
        ]));
    let mut types = Vec::new();
    while at + 4 <= end.min(hs.len()) {
        let ty = u16::from_be_bytes([hs[at], hs[at + 1]]);
        let len = usize::from(u16::from_be_bytes([hs[at + 2], hs[at + 3]]));
        types.push(ty);
        at += 4 + len;
    }
    Some(types)
}

/// Reads until a whole ClientHello is buffered (without answering it) and returns its SNI.
pub async fn read_client_hello<R: tokio::io::AsyncRead + Unpin>(
    app: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Hello, HelloError> {
    // Boxed: it is most of this future's size, which the connection's task would copy about.
    let mut acceptor = Box::new(rustls::server::Acceptor::default());
    let mut fed = 0;
    loop {
        // A TLS record starts with type 22 (handshake) and major version 3.
        if buf.len() >= 2 && (buf[0] != 0x16 || buf[1] != 0x03) {
            return Ok(Hello::NotTls);
        }
        // What is buffered is looked at before reading more: the app waits for an answer
        // once its ClientHello is out.
        while fed < buf.len() {
            let mut reader = &buf[fed..];
            let n = acceptor.read_tls(&mut reader).map_err(|e| {
                HelloError::Refused("bad_hello", format!("unreadable TLS record: {e}"))
            })?;
            if n == 0 {
                break;
            }
            fed += n;
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let hidden = hello_extensions(buf)
                        .is_some_and(|types| types.iter().any(|t| HIDING_EXTENSIONS.contains(t)));
                    if hidden {
                        return Ok(Hello::Hidden);
                    }
                    return Ok(Hello::Tls(
                        accepted.client_hello().server_name().map(str::to_string),
                    ));
                }
                Ok(None) => {}
                Err((e, _)) => {
                    return Err(HelloError::Refused(
                        "bad_hello",
                        format!("not a valid ClientHello: {e}"),
                    ))
                }
            }
        }
        if buf.len() > MAX_CLIENT_HELLO {
            return Err(HelloError::Refused(
                "bad_hello",
                "ClientHello too large".into(),
            ));
        }
        let mut chunk = [0u8; 4096];
        let n = app
            .read(&mut chunk)
            .await
            .map_err(|e| HelloError::Ended(format!("reading the app's first bytes failed: {e}")))?;
        if n == 0 {
            return Err(HelloError::Ended(
                "the app closed the connection before sending anything".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    /// Appends an empty extension of type `ty` to a one-record ClientHello, fixing the lengths.
    fn add_extension(record: &[u8], ty: u16) -> Vec<u8> {
        let mut out = record.to_vec();
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        let bump = |v: &mut Vec<u8>, at: usize, width: usize| {
            let mut n = 0usize;
            for b in &v[at..at + width] {
                n = (n << 8) | usize::from(*b);
            }
            n += 4;
            for i in 0..width {
                v[at + width - 1 - i] = ((n >> (8 * i)) & 0xff) as u8;
            }
        };
        bump(&mut out, 3, 2); // record length
        bump(&mut out, 6, 3); // handshake length
                              // The extensions length sits after the fixed fields; find it by walking them.
        let mut at = 5 + 4 + 34;
        at += 1 + usize::from(out[at]);
        at += 2 + usize::from(u16::from_be_bytes([out[at], out[at + 1]]));
        at += 1 + usize::from(out[at]);
        bump(&mut out, at, 2);
        out
    }

    #[tokio::test]
    async fn client_hello_sni_is_read_without_answering() {
        // A real ClientHello from rustls, fed in small pieces.
        let config = Arc::new(
            rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        let name = rustls::pki_types::ServerName::try_from("API.Example.com").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();

        // Its extensions parse, and one that hides the name is found.
        let types = hello_extensions(&hello).unwrap();
        assert!(types.contains(&0x0000), "server_name: {types:x?}");
        assert!(!types.iter().any(|t| HIDING_EXTENSIONS.contains(t)));
        let with_ech = add_extension(&hello, 0xffce);
        assert!(hello_extensions(&with_ech).unwrap().contains(&0xffce));
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&with_ech).await.unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            read_client_hello(&mut server, &mut buf).await.unwrap(),
            Hello::Hidden
        ));

        // Already buffered whole (read by the HTTP layer): answered without waiting for more.
        let (_quiet, mut nothing_more) = tokio::io::duplex(64);
        let mut buffered = hello.clone();
        match read_client_hello(&mut nothing_more, &mut buffered)
            .await
            .unwrap()
        {
            Hello::Tls(Some(sni)) => assert_eq!(fold(&sni), "api.example.com"),
            _ => panic!("expected a ClientHello with SNI"),
        }
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for chunk in hello.chunks(50) {
                client.write_all(chunk).await.unwrap();
            }
            client
        });
        let mut buf = Vec::new();
        match read_client_hello(&mut server, &mut buf).await.unwrap() {
            Hello::Tls(Some(sni)) => assert_eq!(fold(&sni), "api.example.com"),
            _ => panic!("expected a ClientHello with SNI"),
        }
        let _client = writer.await.unwrap();

        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            read_client_hello(&mut server, &mut buf).await.unwrap(),
            Hello::NotTls
        ));
    }
}

//! A minimal HTTP/1.1 client for Patroni's REST API: one `POST` with a JSON
//! body over a plain TCP connection, `Connection: close`, the answer read to
//! the end. Patroni's API server (Python's `BaseHTTPServer`) answers
//! HTTP/1.0 and closes the connection, so nothing more is needed; https is
//! not supported (the configuration refuses `https://` REST URLs).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer read (Patroni's answers are one line).
const MAX_ANSWER: u64 = 64 * 1024;

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RestError {
    /// The URL is not `http://host:port[/path]`.
    #[error("{0:?} is not a plain http URL")]
    BadUrl(String),
    /// Connecting failed or timed out.
    #[error("cannot connect to {url}: {why}")]
    Connect {
        /// The base URL.
        url: String,
        /// What failed.
        why: String,
    },
    /// Sending or reading failed, or the answer did not come in time.
    #[error("no answer from {url}: {why}")]
    Answer {
        /// The base URL.
        url: String,
        /// What failed.
        why: String,
    },
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The status code.
    pub status: u16,
    /// The body, as text (trimmed).
    pub body: String,
}

/// `host:port` of an `http://host:port[/path]` URL.
pub(crate) fn authority(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let a = &rest[..end];
    (!a.is_empty()).then_some(a)
}

/// `POST <authority of base><path>` with `body` (JSON): connect within
/// `connect_limit`, the whole exchange within `limit`.
pub(crate) async fn post_json(
    base: &str,
    path: &str,
    body: &str,
    connect_limit: Duration,
    limit: Duration,
) -> Result<Answer, RestError> {
    let host = authority(base).ok_or_else(|| RestError::BadUrl(base.to_string()))?;
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let mut stream = match tokio::time::timeout(connect_limit, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(RestError::Connect {
                url: base.to_string(),
                why: e.to_string(),
            });
        }
        Err(_) => {
            return Err(RestError::Connect {
                url: base.to_string(),
                why: format!("no connection within {connect_limit:?}"),
            });
        }
    };
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: pgpilot\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        (&mut stream).take(MAX_ANSWER).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => {
            return Err(RestError::Answer {
                url: base.to_string(),
                why: e.to_string(),
            });
        }
        Err(_) => {
            return Err(RestError::Answer {
                url: base.to_string(),
                why: format!("none within {limit:?}"),
            });
        }
    };
    parse_answer(&raw).ok_or_else(|| RestError::Answer {
        url: base.to_string(),
        why: format!(
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        ),
    })
}

/// Status and body of a whole HTTP/1.x answer (chunked bodies decoded).
fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some(Answer {
        status,
        body: body.trim().to_string(),
    })
}

/// A chunked body's data.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let size = size.split(';').next().unwrap_or("").trim();
        let Ok(n) = usize::from_str_radix(size, 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed() {
        let a = parse_answer(
            b"HTTP/1.0 412 Precondition Failed\r\nServer: BaseHTTP/0.6\r\n\r\nleader name does not match",
        )
        .unwrap();
        assert_eq!(a.status, 412);
        assert_eq!(a.body, "leader name does not match");
        let a = parse_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nSucce\r\n3\r\nss!\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            a,
            Answer {
                status: 200,
                body: "Success!".into()
            }
        );
        assert!(parse_answer(b"garbage").is_none());
    }

    #[test]
    fn authority_of_urls() {
        assert_eq!(authority("http://127.0.0.1:8008"), Some("127.0.0.1:8008"));
        assert_eq!(authority("http://h:8008/patroni"), Some("h:8008"));
        assert_eq!(authority("https://h:8008"), None);
        assert_eq!(authority("http:///x"), None);
    }

    #[tokio::test]
    async fn a_post_reaches_a_server_and_its_answer_comes_back() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let mut got = Vec::new();
            // Read until the whole body (its length is known to the test).
            while !String::from_utf8_lossy(&got).ends_with("{\"a\":1}") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.0 503 Service Unavailable\r\n\r\nSwitchover failed\n")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let a = post_json(
            &base,
            "/switchover",
            "{\"a\":1}",
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 503);
        assert_eq!(a.body, "Switchover failed");
        let req = server.await.unwrap();
        assert!(req.starts_with("POST /switchover HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Length: 7\r\n"), "{req}");
        // Nothing listens there any more.
        let e = post_json(
            &base,
            "/x",
            "{}",
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, RestError::Connect { .. }), "{e}");
    }
}

//! A minimal HTTP/1.1 endpoint on tokio for Prometheus and load balancers.
//!
//! * `GET /metrics`: the text exposition format (version 0.0.4).
//! * `GET /healthz`: `200 ok` when pgpilot currently has a primary in service,
//!   `503` otherwise, so a load balancer only sends clients to a pgpilot that
//!   can take writes.
//!
//! One request per connection (`Connection: close`), `GET` and `HEAD` only.
//! Reading the request head is bounded in size ([`MAX_HEAD`]) and time, and so
//! is writing the answer; at most [`MAX_CONNECTIONS`] requests are served at
//! once (the rest wait in the accept queue).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Scrape;
use crate::cluster::ClusterSnapshot;

/// Largest request head accepted.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Requests served at once.
pub(crate) const MAX_CONNECTIONS: usize = 16;
/// Limit for reading the request and for writing the response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `/metrics` and `/healthz` on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, ctx: Arc<impl Scrape>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = ctx.shutdown();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &ctx).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What `/healthz` answers for a snapshot: status code and body.
pub(crate) fn healthz(snapshot: &ClusterSnapshot) -> (u16, &'static str) {
    if snapshot.has_primary() {
        (200, "ok: primary available\n")
    } else {
        (503, "unavailable: no primary\n")
    }
}

async fn handle(mut stream: TcpStream, ctx: &impl Scrape) -> std::io::Result<()> {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => {
            return respond(&mut stream, 400, "text/plain", b"bad request\n", false).await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            405,
            "text/plain",
            b"only GET and HEAD\n",
            false,
        )
        .await;
    }
    match path {
        "/metrics" => {
            let body = ctx.metrics().render(ctx);
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                body.as_bytes(),
                head_only,
            )
            .await
        }
        "/healthz" => {
            let (code, body) = healthz(&ctx.cluster().snapshot());
            respond(&mut stream, code, "text/plain", body.as_bytes(), head_only).await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                b"not found: try /metrics or /healthz\n",
                head_only,
            )
            .await
        }
    }
}

/// Read up to the blank line ending the request head; `None` if it is too
/// large or the peer closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    match tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "metrics response write timed out",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::config::Config;

    #[test]
    fn healthz_is_503_until_a_primary_is_known() {
        let cfg = Config::from_toml("[[backends]]\nhost = \"h\"\n").unwrap();
        let cluster = Cluster::new(&cfg.backends);
        assert_eq!(healthz(&cluster.snapshot()).0, 503);
    }
}

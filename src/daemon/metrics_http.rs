//! `--metrics-addr`: Prometheus text over a minimal HTTP/1.1 responder (one
//! request per connection, any path), so no web framework is linked for one page.

use std::sync::Arc;

use super::DaemonError;
use crate::fs::Fs;
use crate::store::ParameterStore;

/// Serves Prometheus text on `addr` until the process ends.
pub async fn serve_metrics<S: ParameterStore>(
    fs: Arc<Fs<S>>,
    addr: std::net::SocketAddr,
) -> Result<(), DaemonError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|cause| DaemonError::MetricsAddr { addr, cause })?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let fs = fs.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let body = fs.metrics().render(&fs.gauges());
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(())
}

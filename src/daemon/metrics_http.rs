//! `--metrics-addr`: Prometheus text over a minimal HTTP/1.1 responder (one
//! request per connection, any path), so no web framework is linked for one
//! page. The daemon and the CSI plugin serve their pages through it.

use std::sync::Arc;

use super::DaemonError;
use crate::fs::Fs;
use crate::store::ParameterStore;

/// Serves Prometheus text on `addr` until the process ends.
pub async fn serve_metrics<S: ParameterStore>(
    fs: Arc<Fs<S>>,
    addr: std::net::SocketAddr,
) -> Result<(), DaemonError> {
    serve_text(addr, move || fs.metrics().render(&fs.gauges()))
        .await
        .map_err(|cause| DaemonError::MetricsAddr { addr, cause })
}

/// Serves what `render` returns on `addr` until the process ends. `render`
/// runs on a blocking thread, one scrape at a time: however often a
/// scraper asks, a page costs at most one rendering at once.
pub async fn serve_text<F>(addr: std::net::SocketAddr, render: F) -> std::io::Result<()>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let render = Arc::new(render);
    let one_at_a_time = Arc::new(tokio::sync::Mutex::new(()));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (render, one_at_a_time) = (render.clone(), one_at_a_time.clone());
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let body = {
                    let _turn = one_at_a_time.lock().await;
                    tokio::task::spawn_blocking(move || render())
                        .await
                        .unwrap_or_default()
                };
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

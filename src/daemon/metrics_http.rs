//! `--metrics-addr`: Prometheus text over a minimal HTTP/1.1 responder (one
//! request per connection, any path), so no web framework is linked for one
//! page. The daemon and the CSI plugin serve their pages through it.

use std::sync::Arc;

use super::DaemonError;
use crate::fs::Fs;
use crate::store::ParameterStore;

/// Scrapes answered at once; more are closed (an idle connection must not
/// hold an fd forever: the plugin's metrics listen on the host network).
const MAX_CONNECTIONS: usize = 16;
/// How long a connection may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                // Out of fds for a moment: keep serving once they are back.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Past the bound, a connection is closed at once, not queued.
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                continue;
            };
            let (render, one_at_a_time) = (render.clone(), one_at_a_time.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let mut request = [0u8; 1024];
                let asked = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut request));
                if !matches!(asked.await, Ok(Ok(n)) if n > 0) {
                    return;
                }
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

//! `--metrics-addr`: Prometheus text over a minimal HTTP/1.1 responder (one
//! request per connection, any path), so no web framework is linked for one
//! page. The daemon and the CSI plugin serve their pages through it, on a
//! TCP address or a unix socket (`unix:/PATH`: the CSI driver's daemons,
//! whose plugin gathers their pages without sharing a network with them).

use std::sync::Arc;

use super::DaemonError;
use crate::fs::Fs;
use crate::store::ParameterStore;

/// Connections served at once: a scraper needs one; the bound keeps a
/// flood of connections from taking an fd and a task each.
const MAX_CONNECTIONS: usize = 16;
/// How long a connection may take to send its request: a scraper sends it
/// at once.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The whole life of a connection, request, rendering and reply: a peer
/// that reads slowly cannot hold a place longer.
const CONNECTION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Where metrics are served: `HOST:PORT` or `unix:/ABSOLUTE/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => Ok(MetricsAddr::Unix(path.into())),
            Some(_) => Err(format!(
                "{text}: a unix socket's path is absolute (unix:/run/ssmfs/metrics.sock)"
            )),
            None => text
                .parse()
                .map(MetricsAddr::Tcp)
                .map_err(|_| format!("{text}: neither HOST:PORT (127.0.0.1:9108) nor unix:/PATH")),
        }
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(addr) => write!(f, "{addr}"),
            MetricsAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A connection of either kind.
trait Connection: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Connection for T {}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    async fn bind(addr: &MetricsAddr) -> std::io::Result<Self> {
        match addr {
            MetricsAddr::Tcp(addr) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?)),
            MetricsAddr::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                // An earlier daemon's socket (a restart): only a socket is
                // replaced, never another kind of file.
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)?;
                }
                let listener = tokio::net::UnixListener::bind(path)?;
                // Its owner (the serving user) and root only.
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(listener))
            }
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Connection>> {
        match self {
            Listener::Tcp(listener) => Ok(Box::new(listener.accept().await?.0)),
            Listener::Unix(listener) => Ok(Box::new(listener.accept().await?.0)),
        }
    }
}

/// Asks `addr` for its page: bounded in size (`max_bytes`) and in time (2
/// s), `None` on any failure (another process may have taken a port).
pub fn fetch(addr: &MetricsAddr, max_bytes: usize) -> Option<String> {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let timeout = Some(Duration::from_secs(1));
    let mut stream: Box<dyn ReadWrite> = match addr {
        MetricsAddr::Tcp(addr) => {
            let stream = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(1)).ok()?;
            stream.set_read_timeout(timeout).ok()?;
            stream.set_write_timeout(timeout).ok()?;
            Box::new(stream)
        }
        MetricsAddr::Unix(path) => {
            let stream = std::os::unix::net::UnixStream::connect(path).ok()?;
            stream.set_read_timeout(timeout).ok()?;
            stream.set_write_timeout(timeout).ok()?;
            Box::new(stream)
        }
    };
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
        if response.len() > max_bytes || Instant::now() > deadline {
            return None;
        }
    }
    let response = String::from_utf8(response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// Serves Prometheus text on `addr` until the process ends.
pub async fn serve_metrics<S: ParameterStore>(
    fs: Arc<Fs<S>>,
    addr: MetricsAddr,
) -> Result<(), DaemonError> {
    serve_text(addr.clone(), move || fs.metrics().render(&fs.gauges()))
        .await
        .map_err(|cause| DaemonError::MetricsAddr { addr, cause })
}

/// Serves what `render` returns on `addr` until the process ends. `render`
/// runs on a blocking thread, one scrape at a time: however often a
/// scraper asks, a page costs at most one rendering at once.
pub async fn serve_text<F>(addr: MetricsAddr, render: F) -> std::io::Result<()>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = Listener::bind(&addr).await?;
    let render = Arc::new(render);
    let one_at_a_time = Arc::new(tokio::sync::Mutex::new(()));
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Connections still waiting for their request, oldest first: when all
    // places are taken, the oldest of these gives its place to the newest,
    // so idle connections cannot keep a scraper out.
    type Waiting = std::collections::VecDeque<(u64, Option<tokio::task::AbortHandle>)>;
    let waiting: Arc<std::sync::Mutex<Waiting>> = Default::default();
    tokio::spawn(async move {
        let mut next_id = 0u64;
        loop {
            let mut stream = match listener.accept().await {
                Ok(accepted) => accepted,
                // Out of fds for a moment: keep serving once they are back.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let permit = match connections.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let oldest = {
                        let mut list = waiting.lock().unwrap();
                        let at = list.iter().position(|(_, task)| task.is_some());
                        at.and_then(|at| list.remove(at)).and_then(|(_, task)| task)
                    };
                    let Some(task) = oldest else {
                        // Every place is answering a request: this one goes.
                        continue;
                    };
                    task.abort();
                    let freed = connections.clone().acquire_owned();
                    match tokio::time::timeout(std::time::Duration::from_millis(100), freed).await {
                        Ok(Ok(permit)) => permit,
                        _ => continue,
                    }
                }
            };
            next_id += 1;
            let id = next_id;
            let (render, one_at_a_time, waiting_list) =
                (render.clone(), one_at_a_time.clone(), waiting.clone());
            let task = tokio::spawn(async move {
                let _permit = permit;
                let serve = async {
                    let mut request = [0u8; 1024];
                    let asked = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut request));
                    let asked = matches!(asked.await, Ok(Ok(n)) if n > 0);
                    {
                        // Out of the waiting list; if the accept loop has
                        // not put it there yet, a mark tells it not to.
                        let mut list = waiting_list.lock().unwrap();
                        match list.iter().position(|(other, _)| *other == id) {
                            Some(at) => drop(list.remove(at)),
                            None => list.push_back((id, None)),
                        }
                    }
                    if !asked {
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
                };
                let _ = tokio::time::timeout(CONNECTION_DEADLINE, serve).await;
            });
            let mut list = waiting.lock().unwrap();
            match list.iter().position(|(other, _)| *other == id) {
                Some(at) => drop(list.remove(at)),
                None => list.push_back((id, Some(task.abort_handle()))),
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Issue 31: 16 idle connections kept Prometheus' scrapes out (each new
    /// connection was closed at once while they waited out their timeout).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_cannot_keep_a_scrape_out() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        serve_text(MetricsAddr::Tcp(addr), || "ssmfs_up 1\n".to_string())
            .await
            .unwrap();
        let scraped = tokio::task::spawn_blocking(move || {
            let idle: Vec<std::net::TcpStream> = (0..MAX_CONNECTIONS * 2)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(200));
            let started = std::time::Instant::now();
            let mut scraper = std::net::TcpStream::connect(addr).unwrap();
            scraper
                .set_read_timeout(Some(std::time::Duration::from_secs(1)))
                .unwrap();
            scraper.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let mut reply = String::new();
            let _ = scraper.read_to_string(&mut reply);
            drop(idle);
            (reply, started.elapsed())
        })
        .await
        .unwrap();
        let (reply, took) = scraped;
        assert!(
            reply.contains("ssmfs_up 1"),
            "no page in {took:?}: {reply:?}"
        );
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    }
}

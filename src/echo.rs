//! `veer echo`: the tcp-echo server of Istio's samples (design.md §4), used by the demo and
//! the tests. For each complete line it writes back `PREFIX + " " + line` (newline kept); on
//! EOF it closes, dropping any bytes after the last newline.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

use crate::proxy::listen;

/// Serves every port until the process ends. Binding errors are returned before serving.
pub async fn run(bind: Option<IpAddr>, ports: &[u16], prefix: String) -> io::Result<()> {
    let mut listeners = Vec::new();
    for &port in ports {
        let bound = match bind {
            Some(ip) => vec![listen::bind(SocketAddr::new(ip, port))?],
            None => listen::bind_dual(port)?,
        };
        for l in bound {
            tracing::info!(addr = %l.local_addr()?, %prefix, "tcp-echo listening");
            listeners.push(l);
        }
    }
    let prefix: &'static str = Box::leak(prefix.into_boxed_str());
    let mut tasks = tokio::task::JoinSet::new();
    // The echo server never drains; the sender lives as long as the server.
    let (_never_drain, drain) = tokio::sync::watch::channel(false);
    for l in listeners {
        tasks.spawn(listen::accept_loop(
            l,
            drain.clone(),
            None,
            move |stream, _, _| {
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, prefix).await {
                        tracing::debug!(error = %e, "echo connection ended with an error");
                    }
                });
            },
        ));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn serve(stream: TcpStream, prefix: &str) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line).await?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        w.write_all(prefix.as_bytes()).await?;
        w.write_all(b" ").await?;
        w.write_all(&line).await?;
        // Flush when no more input is already buffered: replies go out promptly for
        // interactive clients, in batches for pipelined ones.
        if r.buffer().is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

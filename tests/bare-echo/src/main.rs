//! `bare-echo`: the ceiling of wshost's own stack for the benchmark. A tokio-tungstenite echo
//! server with nothing else: no routing, no plugin, no limits, no metrics. Writes are batched
//! (every message that is already readable is echoed before one flush) and the read buffer is
//! 4 KiB unless told (wshost's is 256 B by default, behind a shared 64 KiB read-ahead buffer
//! per thread).
//!
//! `bare-echo [ADDR] [READ_BUFFER_BYTES]` (default `127.0.0.1:0`, 4096) prints
//! `listening on ws://ADDR` and serves every path.

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Result;

async fn echo(stream: TcpStream, read_buffer: usize) -> Result<()> {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    while let Some(msg) = ws.next().await {
        let mut msg = msg?;
        loop {
            if msg.is_text() || msg.is_binary() {
                ws.feed(msg).await?;
            }
            // Echo whatever else is already buffered before flushing once.
            match ws.next().now_or_never() {
                Some(Some(next)) => msg = next?,
                Some(None) => return ws.flush().await,
                None => break,
            }
        }
        ws.flush().await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let read_buffer = match std::env::args().nth(2) {
        Some(n) => n.parse().map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{n}`: {e}"))
        })?,
        None => 4096,
    };
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on ws://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = echo(stream, read_buffer).await;
        });
    }
}

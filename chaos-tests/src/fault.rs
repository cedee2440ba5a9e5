//! A user-space TCP fault proxy that sits on one link (lower → upper, upper → origin) and
//! misbehaves on command: latency, a bandwidth cap, resets, clean closes, a black hole, or a cut
//! after so many bytes.
//!
//! It exists because the faults a CDN tier must survive happen on the wire between processes,
//! and neither `iptables` (needs root) nor Toxiproxy (no reset-peer, not embeddable) fits a
//! `cargo test`. A fault mode is read when a connection is accepted, so [`FaultProxy::set`]
//! changes what new connections get; [`FaultProxy::sever`] resets the ones already open.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The longest a black-holed connection is held before it is dropped.
const BLACKHOLE_HOLD: Duration = Duration::from_secs(30);
/// How long the proxy waits to connect to its target before resetting the client.
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// How long a cleanly closed connection is drained, so that unread bytes do not turn the
/// close into a reset.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);
/// Read size per forwarded chunk.
const CHUNK: usize = 16 * 1024;

/// What the proxy does to a connection. Read once, when the connection is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both directions untouched.
    Pass,
    /// Forward both directions, waiting this long before each forwarded chunk.
    Latency(Duration),
    /// Forward both directions at about this many bytes per second each (0 is taken as 1).
    Bandwidth {
        /// Rate cap per direction.
        bytes_per_sec: u64,
    },
    /// Accept, then reset (RST) at once; the target is never contacted.
    ResetOnAccept,
    /// Accept, then close cleanly (FIN) before any byte; the target is never contacted.
    CloseOnAccept,
    /// Accept and read everything, never answer; the connection is held at most 30 s.
    Blackhole,
    /// Forward, but after this many bytes of the target → client direction close both sides
    /// cleanly (FIN): a truncated response.
    CloseAfter(usize),
    /// Like [`Fault::CloseAfter`], but reset (RST) both sides. The bytes before the cut arrive
    /// as long as they fit the client's receive window (on loopback, well over 100 kB).
    ResetAfter(usize),
}

/// A running proxy from an ephemeral loopback port to one target. Every task stops and every
/// connection it holds is dropped when this drops.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    connections: Arc<AtomicUsize>,
    /// Connections open now, and the most ever open at once.
    open: Arc<(AtomicUsize, AtomicUsize)>,
    sever: Arc<watch::Sender<u64>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl FaultProxy {
    /// Starts a proxy to `target` on `127.0.0.1:0` in [`Fault::Pass`] mode. Must be called
    /// inside a tokio runtime; its tasks run there.
    pub fn start(target: SocketAddr) -> anyhow::Result<FaultProxy> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| anyhow::anyhow!("FaultProxy::start needs a tokio runtime: {e}"))?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let proxy = FaultProxy {
            addr,
            target,
            fault: Arc::new(Mutex::new(Fault::Pass)),
            connections: Arc::default(),
            open: Arc::default(),
            sever: Arc::new(watch::Sender::new(0)),
            tasks: Arc::default(),
        };
        let (fault, connections, open, sever, tasks) = (
            proxy.fault.clone(),
            proxy.connections.clone(),
            proxy.open.clone(),
            proxy.sever.clone(),
            proxy.tasks.clone(),
        );
        proxy.tasks.lock().spawn_on(
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let mode = *fault.lock();
                    let severed = sever.subscribe();
                    let mut tasks = tasks.lock();
                    // Reap finished connections so a long test does not accumulate them.
                    while tasks.try_join_next().is_some() {}
                    let now_open = open.0.fetch_add(1, Ordering::SeqCst) + 1;
                    open.1.fetch_max(now_open, Ordering::SeqCst);
                    let open = open.clone();
                    tasks.spawn(async move {
                        connection(client, target, mode, severed).await;
                        open.0.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            },
            &runtime,
        );
        Ok(proxy)
    }

    /// The address clients connect to (use it where the target's address would go).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Changes the mode for connections accepted from now on; open ones keep theirs.
    pub fn set(&self, fault: Fault) {
        *self.fault.lock() = fault;
    }

    /// The mode new connections get.
    pub fn fault(&self) -> Fault {
        *self.fault.lock()
    }

    /// Resets (RST) every connection open now, on both sides; later ones are unaffected.
    pub fn sever(&self) {
        self.sever.send_modify(|generation| *generation += 1);
    }

    /// The most connections that were ever open through the proxy at the same time.
    pub fn peak_open(&self) -> usize {
        self.open.1.load(Ordering::SeqCst)
    }

    /// Connections accepted so far, whatever their mode.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.tasks.lock().abort_all();
    }
}

/// How forwarding ended.
enum End {
    /// Both directions reached end of stream and were passed on.
    Done,
    /// The byte budget of the target → client direction ran out.
    Limit,
    /// A peer failed (reset, broken pipe): pass the failure on as a reset.
    Failed,
}

/// Ends a connection with RST instead of FIN: SO_LINGER 0, then close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Sends FIN, then reads and discards until the peer closes or the drain deadline passes, so
/// that the close stays clean (unread bytes would make the kernel send RST).
async fn close_cleanly(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(DRAIN_DEADLINE, discard(&mut stream)).await;
}

/// Reads until end of stream or an error.
async fn discard(stream: &mut TcpStream) {
    let mut sink = vec![0u8; CHUNK];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    fault: Fault,
    mut severed: watch::Receiver<u64>,
) {
    match fault {
        Fault::ResetOnAccept => return reset(client),
        Fault::CloseOnAccept => return close_cleanly(client).await,
        Fault::Blackhole => {
            tokio::select! {
                _ = tokio::time::timeout(BLACKHOLE_HOLD, discard(&mut client)) => drop(client),
                _ = severed.changed() => reset(client),
            }
            return;
        }
        _ => {}
    }
    let upstream = tokio::select! {
        up = tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(target)) => up,
        _ = severed.changed() => return reset(client),
    };
    // A target that refuses or never answers looks, through a proxy, like a reset.
    let Ok(Ok(mut upstream)) = upstream else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let end = tokio::select! {
        end = forward(&mut client, &mut upstream, fault) => end,
        _ = severed.changed() => End::Failed,
    };
    match (end, fault) {
        (End::Done, _) => {}
        (End::Limit, Fault::CloseAfter(_)) => {
            tokio::join!(close_cleanly(client), close_cleanly(upstream));
        }
        (End::Limit | End::Failed, _) => {
            reset(client);
            reset(upstream);
        }
    }
}

/// Forwards both directions under `fault` until both ended, one failed, or the budget ran out.
async fn forward(client: &mut TcpStream, upstream: &mut TcpStream, fault: Fault) -> End {
    let limit = match fault {
        Fault::CloseAfter(n) | Fault::ResetAfter(n) => Some(n),
        _ => None,
    };
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let up = pump(&mut client_read, &mut upstream_write, fault, None);
    let down = pump(&mut upstream_read, &mut client_write, fault, limit);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    // Each round finishes one direction, so two rounds finish both.
    for _ in 0..2 {
        tokio::select! {
            end = &mut up, if !up_done => match end {
                End::Done => up_done = true,
                other => return other,
            },
            end = &mut down, if !down_done => match end {
                End::Done => down_done = true,
                other => return other,
            },
        }
    }
    End::Done
}

/// Copies `from` to `to` chunk by chunk, applying latency and rate, until end of stream (then
/// passes the FIN on), an error, or `limit` bytes.
async fn pump<R, W>(from: &mut R, to: &mut W, fault: Fault, limit: Option<usize>) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let chunk = match fault {
        // Small chunks keep a rate-capped stream smooth (about 20 writes a second).
        Fault::Bandwidth { bytes_per_sec } => {
            usize::try_from(bytes_per_sec / 20).map_or(CHUNK, |c| c.clamp(1, CHUNK))
        }
        _ => CHUNK,
    };
    let mut buf = vec![0u8; chunk];
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut left = limit;
    if left == Some(0) {
        return End::Limit;
    }
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                return match to.shutdown().await {
                    Ok(()) => End::Done,
                    Err(_) => End::Failed,
                };
            }
            Ok(n) => n,
            Err(_) => return End::Failed,
        };
        let n = left.map_or(n, |l| n.min(l));
        match fault {
            Fault::Latency(d) => tokio::time::sleep(d).await,
            Fault::Bandwidth { bytes_per_sec } => {
                let due = Duration::from_secs_f64(sent as f64 / bytes_per_sec.max(1) as f64);
                tokio::time::sleep_until(started + due).await;
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return End::Failed;
        }
        sent += n as u64;
        if let Some(l) = left.as_mut() {
            *l -= n;
            if *l == 0 {
                return End::Limit;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    /// Every exchange in these tests ends well within this.
    const DEADLINE: Duration = Duration::from_secs(10);
    const BODY: usize = 100_000;

    /// How a client's read ended.
    #[derive(Debug, PartialEq, Eq)]
    enum Ending {
        Eof,
        Error(ErrorKind),
        TimedOut,
    }

    /// A tiny target: answers every request head with an HTTP response of `BODY` bytes (then
    /// closes), or echoes when the first bytes are "echo". Counts accepted connections.
    struct Target {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        tasks: JoinSet<()>,
    }

    impl Target {
        async fn start() -> Target {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
            let addr = listener.local_addr().expect("target addr");
            let accepted: Arc<AtomicUsize> = Arc::default();
            let counter = accepted.clone();
            let mut tasks = JoinSet::new();
            tasks.spawn(async move {
                let mut conns = JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    counter.fetch_add(1, Ordering::SeqCst);
                    conns.spawn(serve(stream));
                }
            });
            Target {
                addr,
                accepted,
                tasks,
            }
        }
    }

    impl Drop for Target {
        fn drop(&mut self) {
            self.tasks.abort_all();
        }
    }

    async fn serve(mut stream: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.starts_with(b"echo") {
                if stream.write_all(&buf).await.is_err() {
                    return;
                }
                buf.clear();
            } else if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut response =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
                response.extend(std::iter::repeat_n(b'x', BODY));
                let _ = stream.write_all(&response).await;
                let _ = stream.shutdown().await;
                discard(&mut stream).await;
                return;
            }
        }
    }

    /// Sends a GET through `addr` and reads until the connection ends or `wait` passes.
    async fn fetch(addr: SocketAddr, wait: Duration) -> (Vec<u8>, Ending) {
        let mut stream = TcpStream::connect(addr).await.expect("connect to proxy");
        let mut got = Vec::new();
        let exchange = async {
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                .await?;
            let mut chunk = [0u8; 8192];
            loop {
                match stream.read(&mut chunk).await? {
                    0 => return Ok::<(), std::io::Error>(()),
                    n => got.extend_from_slice(&chunk[..n]),
                }
            }
        };
        let ending = match tokio::time::timeout(wait, exchange).await {
            Ok(Ok(())) => Ending::Eof,
            Ok(Err(e)) => Ending::Error(e.kind()),
            Err(_) => Ending::TimedOut,
        };
        (got, ending)
    }

    fn full_response_len() -> usize {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").len() + BODY
    }

    /// Writes `msg` and reads it back (the target echoes).
    async fn echo(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        stream.read_exact(&mut back).await?;
        Ok(back)
    }

    #[tokio::test]
    async fn pass_forwards_everything() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        let (got, ending) = fetch(proxy.addr(), DEADLINE).await;
        assert_eq!(ending, Ending::Eof);
        assert_eq!(got.len(), full_response_len());
        assert_eq!(proxy.connections(), 1);
        assert_eq!(target.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(proxy.target(), target.addr);
    }

    #[tokio::test]
    async fn latency_delays_each_chunk() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        proxy.set(Fault::Latency(Duration::from_millis(100)));
        let mut stream = TcpStream::connect(proxy.addr()).await.expect("connect");
        let started = std::time::Instant::now();
        let back = tokio::time::timeout(DEADLINE, echo(&mut stream, b"echo 1"))
            .await
            .expect("within deadline")
            .expect("echo");
        assert_eq!(back, b"echo 1");
        // One chunk each way: at least two delays (a lower bound only, never flaky).
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn bandwidth_caps_the_rate() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        proxy.set(Fault::Bandwidth {
            bytes_per_sec: 400_000,
        });
        let started = std::time::Instant::now();
        let (got, ending) = fetch(proxy.addr(), DEADLINE).await;
        assert_eq!(ending, Ending::Eof);
        assert_eq!(got.len(), full_response_len());
        // 100 kB at 400 kB/s: the last chunk is due no earlier than ~0.24 s.
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn reset_on_accept_resets_without_contacting_the_target() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        proxy.set(Fault::ResetOnAccept);
        let (got, ending) = fetch(proxy.addr(), DEADLINE).await;
        assert!(got.is_empty());
        assert_eq!(ending, Ending::Error(ErrorKind::ConnectionReset));
        assert_eq!(proxy.connections(), 1);
        assert_eq!(target.accepted.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn close_on_accept_closes_cleanly() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        proxy.set(Fault::CloseOnAccept);
        let (got, ending) = fetch(proxy.addr(), DEADLINE).await;
        assert!(got.is_empty());
        assert_eq!(ending, Ending::Eof);
        assert_eq!(target.accepted.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn blackhole_never_answers() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        proxy.set(Fault::Blackhole);
        let (got, ending) = fetch(proxy.addr(), Duration::from_millis(500)).await;
        assert!(got.is_empty());
        assert_eq!(ending, Ending::TimedOut);
        assert_eq!(proxy.connections(), 1);
        assert_eq!(target.accepted.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn close_after_truncates_with_fin() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        proxy.set(Fault::CloseAfter(1000));
        let (got, ending) = fetch(proxy.addr(), DEADLINE).await;
        assert_eq!(ending, Ending::Eof);
        assert_eq!(got.len(), 1000);
        assert!(got.starts_with(b"HTTP/1.1 200 OK"));
    }

    #[tokio::test]
    async fn reset_after_truncates_with_rst() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        proxy.set(Fault::ResetAfter(1000));
        let (got, ending) = fetch(proxy.addr(), DEADLINE).await;
        assert_eq!(ending, Ending::Error(ErrorKind::ConnectionReset));
        assert_eq!(got.len(), 1000);
    }

    #[tokio::test]
    async fn a_mode_change_applies_to_new_connections_only() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        let mut open = TcpStream::connect(proxy.addr()).await.expect("connect");
        let first = tokio::time::timeout(DEADLINE, echo(&mut open, b"echo a"))
            .await
            .expect("within deadline")
            .expect("echo");
        assert_eq!(first, b"echo a");
        proxy.set(Fault::ResetOnAccept);
        assert_eq!(proxy.fault(), Fault::ResetOnAccept);
        let (_, ending) = fetch(proxy.addr(), DEADLINE).await;
        assert_eq!(ending, Ending::Error(ErrorKind::ConnectionReset));
        let again = tokio::time::timeout(DEADLINE, echo(&mut open, b"echo b"))
            .await
            .expect("within deadline")
            .expect("the open connection keeps its mode");
        assert_eq!(again, b"echo b");
        assert_eq!(proxy.connections(), 2);
    }

    #[tokio::test]
    async fn sever_resets_open_connections_only() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        let mut open = TcpStream::connect(proxy.addr()).await.expect("connect");
        tokio::time::timeout(DEADLINE, echo(&mut open, b"echo a"))
            .await
            .expect("within deadline")
            .expect("echo");
        proxy.sever();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, open.read_to_end(&mut rest))
            .await
            .expect("severed within deadline");
        assert_eq!(
            read.map_err(|e| e.kind()).err(),
            Some(ErrorKind::ConnectionReset)
        );
        let (got, ending) = fetch(proxy.addr(), DEADLINE).await;
        assert_eq!(ending, Ending::Eof);
        assert_eq!(got.len(), full_response_len());
    }

    #[tokio::test]
    async fn an_unreachable_target_looks_like_a_reset() {
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let proxy = FaultProxy::start(gone).expect("proxy");
        let (got, ending) = fetch(proxy.addr(), DEADLINE).await;
        assert!(got.is_empty());
        assert_eq!(ending, Ending::Error(ErrorKind::ConnectionReset));
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_listener() {
        let target = Target::start().await;
        let proxy = FaultProxy::start(target.addr).expect("proxy");
        let addr = proxy.addr();
        drop(proxy);
        let closed = crate::eventually(DEADLINE, || async {
            TcpStream::connect(addr).await.is_err()
        })
        .await;
        assert!(closed, "listener still accepting after drop");
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let target: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        assert!(FaultProxy::start(target).is_err());
    }
}

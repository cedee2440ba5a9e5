//! A name server for tests: answers `A` queries for the names it is given, with the TTL it is
//! given, counts the queries per name, and can fall silent (to prove a lookup is bounded).
//! Messages are decoded and encoded with hickory-proto, the same library the node's resolver
//! uses, so what it answers is real DNS on the wire.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

#[derive(Default)]
struct Zone {
    /// Lowercase name without the final dot → (addresses, TTL in seconds).
    records: HashMap<String, (Vec<Ipv4Addr>, u32)>,
    /// `A` queries received per name.
    queries: HashMap<String, usize>,
}

/// A UDP name server on 127.0.0.1; stops when dropped.
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    silent: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl TestDns {
    /// Starts serving on an ephemeral port.
    pub async fn start() -> anyhow::Result<TestDns> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let silent: Arc<AtomicBool> = Arc::default();
        let (z, quiet) = (zone.clone(), silent.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if quiet.load(Ordering::SeqCst) {
                    continue;
                }
                if let Some(reply) = answer(&query, &z) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        Ok(TestDns {
            addr,
            zone,
            silent,
            task,
        })
    }

    /// The address to put in `[dns] nameservers`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `name` with `ip`, valid for `ttl` seconds.
    pub fn set(&self, name: &str, ip: Ipv4Addr, ttl: u32) {
        self.set_all(name, &[ip], ttl);
    }

    /// Answers `name` with every address in `ips` (none: the name exists, without addresses),
    /// valid for `ttl` seconds.
    pub fn set_all(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        self.zone.lock().records.insert(
            name.trim_end_matches('.').to_ascii_lowercase(),
            (ips.to_vec(), ttl),
        );
    }

    /// `A` queries received for `name` so far.
    pub fn queries(&self, name: &str) -> usize {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        self.zone.lock().queries.get(&key).copied().unwrap_or(0)
    }

    /// Stops answering (queries are still received and dropped), or answers again.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one query: the address for a known name's `A`, no data for its other types,
/// NXDOMAIN for an unknown name.
fn answer(query: &Message, zone: &Mutex<Zone>) -> Option<Vec<u8>> {
    let question = query.queries.first()?;
    let name = question.name().to_ascii();
    let key = name.trim_end_matches('.').to_ascii_lowercase();
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    let mut zone = zone.lock();
    if question.query_type() == RecordType::A {
        *zone.queries.entry(key.clone()).or_default() += 1;
    }
    match zone.records.get(&key) {
        Some((ips, ttl)) if question.query_type() == RecordType::A => {
            for ip in ips {
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    *ttl,
                    RData::A(A(*ip)),
                ));
            }
        }
        Some(_) => {}
        None => reply.metadata.response_code = ResponseCode::NXDomain,
    }
    reply.to_vec().ok()
}

//! The DNS server of transparent mode. Names the control plane registered are answered with
//! their virtual IPs; every other query is asked of the upstream resolvers, whose answers come
//! back as they were, less any address inside the VIP ranges.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::svcb::{SvcParamValue, SVCB};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use sluice_api::model::Cidr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::metrics::{
    DnsAnswerLabels, DnsFailureLabels, DnsSourceLabels, DnsTransportLabels, Metrics,
};

/// The longest UDP query read; a longer datagram is cut and then fails to parse.
const MAX_UDP_QUERY: usize = 4096;
/// Without EDNS a UDP answer may not be longer (RFC 1035).
const MIN_UDP_PAYLOAD: u16 = 512;
/// The EDNS payload size offered in local answers: large enough for any zone answer, small
/// enough to avoid IP fragmentation (DNS flag day 2020).
const OFFERED_UDP_PAYLOAD: u16 = 1232;
/// Upstream UDP answers are read into this many bytes; one that fills it may have been cut by
/// the read, so the question is asked again over TCP.
const UPSTREAM_UDP_BUFFER: usize = MAX_UDP_QUERY + 1;
/// A pause after a failed accept (out of file descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What the server answers itself: names (lowercase, no trailing dot) to VIPs, and the VIP ranges.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    names: HashMap<String, Vec<IpAddr>>,
    vip_ranges: Vec<Cidr>,
}

impl Zone {
    /// A name given more than once answers with all its addresses, each once; an empty name
    /// (the root) is skipped.
    pub fn new(entries: impl IntoIterator<Item = (String, IpAddr)>, vip_ranges: Vec<Cidr>) -> Zone {
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (name, ip) in entries {
            let name = normalise(&name).into_owned();
            if name.is_empty() {
                continue;
            }
            let ips = names.entry(name).or_default();
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Zone { names, vip_ranges }
    }

    /// The VIPs of `name`; case-insensitive, a trailing dot ignored.
    pub fn lookup(&self, name: &str) -> Option<&[IpAddr]> {
        self.names.get(normalise(name).as_ref()).map(Vec::as_slice)
    }

    /// Whether `ip` is inside a VIP range, an IPv4-mapped IPv6 address counting as its IPv4
    /// address (a dual-stack socket dials it as that).
    pub fn in_vip_range(&self, ip: IpAddr) -> bool {
        let mapped = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.vip_ranges
            .iter()
            .any(|range| range.contains(ip) || mapped.is_some_and(|v4| range.contains(v4)))
    }

    /// How many names the zone answers.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

fn normalise(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Resolvers asked, in order, about names outside the zone; see [`upstreams_from_resolv_conf`].
    pub upstreams: Vec<SocketAddr>,
    /// TTL of zone answers, in seconds.
    pub ttl: u32,
    /// How long one upstream has to answer before the next is asked.
    pub upstream_timeout: Duration,
    /// UDP queries waiting on an upstream at once; more are dropped (the client asks again).
    pub max_in_flight: usize,
    /// TCP connections open at once; more are closed on accept.
    pub max_tcp_connections: usize,
    /// A TCP connection is closed when its next query has not fully arrived within this time,
    /// or its answer could not be written within it.
    pub tcp_idle_timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            ttl: 30,
            upstream_timeout: Duration::from_secs(2),
            max_in_flight: 1024,
            max_tcp_connections: 256,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// `upstreams` without the server itself at `bound` (resolv.conf naming the address the server
/// answers on): a query forwarded there would come straight back. An error when none is left.
pub fn forwarding_targets(
    upstreams: Vec<SocketAddr>,
    bound: SocketAddr,
) -> Result<Vec<SocketAddr>, String> {
    let is_self = |u: &SocketAddr| {
        u.port() == bound.port()
            && (u.ip() == bound.ip()
                || (bound.ip().is_unspecified()
                    && (u.ip().is_loopback() || u.ip().is_unspecified())))
    };
    let given = upstreams.len();
    let kept: Vec<SocketAddr> = upstreams.into_iter().filter(|u| !is_self(u)).collect();
    if given > 0 && kept.is_empty() {
        return Err(format!(
            "{bound}: every upstream is this DNS server itself, so forwarded queries would come back to it; give --dns-upstream IP:PORT with the resolver to forward to"
        ));
    }
    Ok(kept)
}

/// Name servers from resolv.conf text (`nameserver` lines, port 53), each once, in order. A
/// link-local IPv6 server needs a numeric zone id (`fe80::1%2`); one with an interface name or
/// none is skipped. An error line if no server is usable.
pub fn upstreams_from_resolv_conf(text: &str) -> Result<Vec<SocketAddr>, String> {
    let mut upstreams = Vec::new();
    for line in text.lines() {
        // `#` and `;` start comments, also after a value.
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        if let Some(upstream) = words.next().and_then(nameserver_address) {
            if !upstreams.contains(&upstream) {
                upstreams.push(upstream);
            }
        }
    }
    if upstreams.is_empty() {
        Err("resolv.conf has no usable nameserver line".to_string())
    } else {
        Ok(upstreams)
    }
}

fn nameserver_address(text: &str) -> Option<SocketAddr> {
    let (ip, zone) = match text.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (text, None),
    };
    match (ip.parse::<IpAddr>().ok()?, zone) {
        (IpAddr::V4(v4), None) => Some(SocketAddr::new(IpAddr::V4(v4), 53)),
        (IpAddr::V6(v6), None) if !v6.is_unicast_link_local() => {
            Some(SocketAddr::new(IpAddr::V6(v6), 53))
        }
        // Interface names would need the interface table; numeric ids are used as they are.
        (IpAddr::V6(v6), Some(zone)) => Some(SocketAddr::V6(SocketAddrV6::new(
            v6,
            53,
            0,
            zone.parse().ok()?,
        ))),
        _ => None,
    }
}

/// Serves until `stop` is cancelled. `zone` is read per query (latest value), so config changes
/// apply at once. Returns once every query and connection in progress has ended.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    zone: watch::Receiver<Arc<Zone>>,
    settings: DnsSettings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let server = Arc::new(Server {
        zone,
        settings,
        metrics,
    });
    let tasks = TaskTracker::new();
    tokio::join!(
        serve_udp(&server, Arc::new(udp), &tasks, &stop),
        serve_tcp(&server, tcp, &tasks, &stop),
    );
    tasks.close();
    tasks.wait().await;
}

async fn serve_udp(
    server: &Arc<Server>,
    socket: Arc<UdpSocket>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(
        server.settings.max_in_flight.min(Semaphore::MAX_PERMITS),
    ));
    let mut buffer = vec![0u8; MAX_UDP_QUERY];
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buffer) => received,
        };
        let (len, client) = match received {
            Ok(received) => received,
            Err(error) => {
                debug!(%error, "DNS UDP receive failed");
                continue;
            }
        };
        let Some(packet) = buffer.get(..len) else {
            continue;
        };
        server.count_query(Transport::Udp);
        match server.handle(packet, Transport::Udp) {
            Handling::Answer(reply) => send_udp(&socket, &reply, client).await,
            Handling::Drop => {}
            Handling::Forward(request) => {
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    server.count_answer("overflow");
                    debug!(%client, "too many DNS queries in flight; dropped one");
                    continue;
                };
                let (server, socket, stop) = (server.clone(), socket.clone(), stop.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    let reply = tokio::select! {
                        _ = stop.cancelled() => return,
                        reply = server.forward(request, Transport::Udp) => reply,
                    };
                    if let Some(reply) = reply {
                        send_udp(&socket, &reply, client).await;
                    }
                });
            }
        }
    }
}

async fn send_udp(socket: &UdpSocket, reply: &[u8], client: SocketAddr) {
    if let Err(error) = socket.send_to(reply, client).await {
        debug!(%error, %client, "DNS UDP answer not sent");
    }
}

async fn serve_tcp(
    server: &Arc<Server>,
    listener: TcpListener,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(
        server
            .settings
            .max_tcp_connections
            .min(Semaphore::MAX_PERMITS),
    ));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "DNS TCP accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%client, "too many DNS TCP connections; closed one");
            continue;
        };
        let (server, stop) = (server.clone(), stop.clone());
        tasks.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = server.serve_connection(stream) => {}
            }
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Why one exchange with an upstream failed, or a packet from it was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Timeout,
    Io,
    /// An answer with another ID or question than the query sent.
    Mismatch,
    Malformed,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Io => "io",
            Failure::Mismatch => "mismatch",
            Failure::Malformed => "malformed",
        }
    }
}

/// What becomes of a message from a client.
enum Handling {
    Answer(Vec<u8>),
    Forward(Forward),
    /// Not a query that can be answered: too short for a header, or itself an answer.
    Drop,
}

/// A query for a name outside the zone, to be asked upstream.
struct Forward {
    /// The query as the client sent it; it goes upstream unchanged but for its ID.
    packet: Vec<u8>,
    metadata: Metadata,
    query: Query,
    /// Whether the client sent EDNS, which a SERVFAIL then carries too.
    edns: bool,
    /// The longest answer the client takes over UDP.
    udp_limit: usize,
    received: Instant,
}

/// What an upstream's answer must carry to be taken.
struct Expected<'a> {
    id: u16,
    query: &'a Query,
}

enum UdpOutcome {
    Answer(Message, Vec<u8>),
    /// Truncated by the upstream, or possibly by the read: ask again over TCP.
    Truncated,
}

struct Server {
    zone: watch::Receiver<Arc<Zone>>,
    settings: DnsSettings,
    metrics: Arc<Metrics>,
}

impl Server {
    fn current_zone(&self) -> Arc<Zone> {
        self.zone.borrow().clone()
    }

    fn handle(&self, packet: &[u8], transport: Transport) -> Handling {
        let received = Instant::now();
        let Ok(header) = Header::read(&mut BinDecoder::new(packet)) else {
            self.count_answer("dropped");
            return Handling::Drop;
        };
        // Answering answers could set two servers replying to each other forever.
        if header.metadata.message_type == MessageType::Response {
            self.count_answer("dropped");
            return Handling::Drop;
        }
        if header.metadata.op_code != OpCode::Query {
            let reply = error_reply(&header.metadata, ResponseCode::NotImp);
            return self.local(received, "notimp", reply);
        }
        let request = match Message::from_vec(packet) {
            Ok(request) => request,
            Err(error) => {
                debug!(%error, "malformed DNS query");
                let reply = error_reply(&header.metadata, ResponseCode::FormErr);
                return self.local(received, "formerr", reply);
            }
        };
        let [query] = request.queries.as_slice() else {
            let reply = error_reply(&header.metadata, ResponseCode::FormErr);
            return self.local(received, "formerr", reply);
        };
        let udp_limit = usize::from(request.max_payload().max(MIN_UDP_PAYLOAD));
        let zone = self.current_zone();
        if let Some(ips) = zone.lookup(&query.name.to_ascii()) {
            let (reply, kind) = self.zone_answer(&request, query, ips);
            let reply = reply.and_then(|reply| fit(reply, transport, udp_limit));
            return self.local(received, kind, reply);
        }
        Handling::Forward(Forward {
            packet: packet.to_vec(),
            metadata: request.metadata,
            query: query.clone(),
            edns: request.edns.is_some(),
            udp_limit,
            received,
        })
    }

    fn zone_answer(
        &self,
        request: &Message,
        query: &Query,
        ips: &[IpAddr],
    ) -> (Option<Vec<u8>>, &'static str) {
        let mut reply = reply_to(&request.metadata);
        reply.metadata.authoritative = true;
        reply.add_query(query.clone());
        if query.query_class == DNSClass::IN {
            for ip in ips {
                let data = match (query.query_type, ip) {
                    (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                    (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                // The name as asked: resolvers randomising its case check it comes back alike.
                reply.add_answer(Record::from_rdata(
                    query.name.clone(),
                    self.settings.ttl,
                    data,
                ));
            }
        }
        if request.edns.is_some() {
            reply.set_edns(offered_edns());
        }
        let kind = if reply.answers.is_empty() {
            "nodata"
        } else {
            "vip"
        };
        (reply.to_vec().ok(), kind)
    }

    /// Asks the upstreams in order; the first valid answer goes back to the client.
    async fn forward(&self, request: Forward, transport: Transport) -> Option<Vec<u8>> {
        for &upstream in &self.settings.upstreams {
            let id = fresh_id();
            let mut packet = request.packet.clone();
            set_id(&mut packet, id);
            let expected = Expected {
                id,
                query: &request.query,
            };
            let answer = match transport {
                Transport::Udp => match self.exchange_udp(upstream, &packet, &expected).await {
                    Ok(UdpOutcome::Answer(message, bytes)) => Ok((message, bytes)),
                    Ok(UdpOutcome::Truncated) => {
                        self.exchange_tcp(upstream, &packet, &expected).await
                    }
                    Err(failure) => Err(failure),
                },
                Transport::Tcp => self.exchange_tcp(upstream, &packet, &expected).await,
            };
            match answer {
                Ok((message, bytes)) => return self.pass_back(&request, message, bytes, transport),
                Err(failure) => {
                    self.count_failure(failure);
                    debug!(%upstream, reason = failure.label(), name = %request.query.name, "DNS upstream failed");
                }
            }
        }
        self.count_answer("servfail");
        self.observe(&request.received, "upstream");
        let mut reply = reply_to(&request.metadata);
        reply.metadata.response_code = ResponseCode::ServFail;
        reply.add_query(request.query.clone());
        if request.edns {
            reply.set_edns(offered_edns());
        }
        reply.to_vec().ok()
    }

    async fn exchange_udp(
        &self,
        upstream: SocketAddr,
        packet: &[u8],
        expected: &Expected<'_>,
    ) -> Result<UdpOutcome, Failure> {
        let local: SocketAddr = match upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let exchange = async {
            // A fresh socket per query: its random port and the random ID both have to be
            // guessed to forge an answer.
            let socket = UdpSocket::bind(local).await.map_err(|_| Failure::Io)?;
            socket.connect(upstream).await.map_err(|_| Failure::Io)?;
            socket.send(packet).await.map_err(|_| Failure::Io)?;
            let mut buffer = vec![0u8; UPSTREAM_UDP_BUFFER];
            loop {
                let len = socket.recv(&mut buffer).await.map_err(|_| Failure::Io)?;
                if len == buffer.len() {
                    return Ok(UdpOutcome::Truncated);
                }
                let Some(bytes) = buffer.get(..len) else {
                    continue;
                };
                match check_answer(bytes, expected) {
                    Ok(message) if message.truncation => return Ok(UdpOutcome::Truncated),
                    Ok(message) => return Ok(UdpOutcome::Answer(message, bytes.to_vec())),
                    // A forged or broken packet: the real answer may still come.
                    Err(failure) => self.count_failure(failure),
                }
            }
        };
        tokio::time::timeout(self.settings.upstream_timeout, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    async fn exchange_tcp(
        &self,
        upstream: SocketAddr,
        packet: &[u8],
        expected: &Expected<'_>,
    ) -> Result<(Message, Vec<u8>), Failure> {
        let exchange = async {
            let mut stream = TcpStream::connect(upstream)
                .await
                .map_err(|_| Failure::Io)?;
            write_framed(&mut stream, packet)
                .await
                .map_err(|_| Failure::Io)?;
            let bytes = read_framed(&mut stream).await.map_err(|_| Failure::Io)?;
            let message = check_answer(&bytes, expected)?;
            Ok((message, bytes))
        };
        tokio::time::timeout(self.settings.upstream_timeout, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    /// The upstream's answer as it came, under the client's ID, less the records pointing into
    /// the VIP ranges: outside DNS must never steer the app to a VIP.
    fn pass_back(
        &self,
        request: &Forward,
        mut message: Message,
        bytes: Vec<u8>,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let zone = self.current_zone();
        let mut removed = 0u64;
        for section in [
            &mut message.answers,
            &mut message.authorities,
            &mut message.additionals,
        ] {
            section.retain(|record| {
                let into_vips = points_into_vips(&zone, record);
                removed += u64::from(into_vips);
                !into_vips
            });
        }
        let mut reply = if removed == 0 {
            bytes
        } else {
            self.metrics.dns_vip_records_removed.inc_by(removed);
            // What is left was not what the upstream vouched for.
            message.metadata.authentic_data = false;
            debug!(removed, name = %request.query.name, "removed upstream records pointing into the VIP ranges");
            message.to_vec().ok()?
        };
        set_id(&mut reply, request.metadata.id);
        self.count_answer("forwarded");
        self.observe(&request.received, "upstream");
        fit(reply, transport, request.udp_limit)
    }

    async fn serve_connection(&self, mut stream: TcpStream) {
        let idle = self.settings.tcp_idle_timeout;
        loop {
            // The whole message must arrive in time, so a client trickling bytes is cut off too.
            let Ok(Ok(packet)) = tokio::time::timeout(idle, read_framed(&mut stream)).await else {
                return;
            };
            self.count_query(Transport::Tcp);
            let reply = match self.handle(&packet, Transport::Tcp) {
                Handling::Answer(reply) => reply,
                // Whatever this peer speaks, it is not DNS.
                Handling::Drop => return,
                Handling::Forward(request) => match self.forward(request, Transport::Tcp).await {
                    Some(reply) => reply,
                    None => return,
                },
            };
            let written = tokio::time::timeout(idle, write_framed(&mut stream, &reply)).await;
            if !matches!(written, Ok(Ok(()))) {
                return;
            }
        }
    }

    fn local(&self, received: Instant, kind: &'static str, reply: Option<Vec<u8>>) -> Handling {
        self.count_answer(kind);
        self.observe(&received, "local");
        match reply {
            Some(reply) => Handling::Answer(reply),
            None => Handling::Drop,
        }
    }

    fn count_query(&self, transport: Transport) {
        self.metrics
            .dns_queries
            .get_or_create(&DnsTransportLabels {
                transport: transport.label(),
            })
            .inc();
    }

    fn count_answer(&self, kind: &'static str) {
        self.metrics
            .dns_answers
            .get_or_create(&DnsAnswerLabels { kind })
            .inc();
    }

    fn count_failure(&self, failure: Failure) {
        self.metrics
            .dns_upstream_failures
            .get_or_create(&DnsFailureLabels {
                reason: failure.label(),
            })
            .inc();
    }

    fn observe(&self, received: &Instant, source: &'static str) {
        self.metrics
            .dns_query_duration
            .get_or_create(&DnsSourceLabels { source })
            .observe(received.elapsed().as_secs_f64());
    }
}

/// A response to `request` with its ID, opcode, RD and CD, and RA set.
fn reply_to(request: &Metadata) -> Message {
    let mut reply = Message::response(request.id, request.op_code);
    reply.metadata = Metadata::response_from_request(request);
    reply.metadata.recursion_available = true;
    reply
}

/// An error answer to a query that could not be read or taken: header only.
fn error_reply(request: &Metadata, code: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = reply_to(request);
    reply.metadata.response_code = code;
    reply.to_vec().ok()
}

fn offered_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(OFFERED_UDP_PAYLOAD);
    edns
}

/// A new query's ID, drawn by hickory from a cryptographic generator.
fn fresh_id() -> u16 {
    Message::query().metadata.id
}

fn set_id(packet: &mut [u8], id: u16) {
    if let Some(field) = packet.get_mut(..2) {
        field.copy_from_slice(&id.to_be_bytes());
    }
}

/// The answer parsed, if it is a response to the query sent.
fn check_answer(bytes: &[u8], expected: &Expected<'_>) -> Result<Message, Failure> {
    let message = Message::from_vec(bytes).map_err(|_| Failure::Malformed)?;
    if message.metadata.message_type != MessageType::Response || message.metadata.id != expected.id
    {
        return Err(Failure::Mismatch);
    }
    let same_question = match message.queries.as_slice() {
        [query] => query == expected.query,
        // Some servers leave the question out of an error.
        [] => message.metadata.response_code != ResponseCode::NoError,
        _ => false,
    };
    if same_question {
        Ok(message)
    } else {
        Err(Failure::Mismatch)
    }
}

/// Whether the record gives an address inside the VIP ranges: an A or AAAA record, or a
/// service binding (HTTPS, SVCB) whose address hints do.
fn points_into_vips(zone: &Zone, record: &Record) -> bool {
    match &record.data {
        RData::A(A(v4)) => zone.in_vip_range(IpAddr::V4(*v4)),
        RData::AAAA(AAAA(v6)) => zone.in_vip_range(IpAddr::V6(*v6)),
        RData::HTTPS(https) => hints_into_vips(zone, &https.0),
        RData::SVCB(svcb) => hints_into_vips(zone, svcb),
        _ => false,
    }
}

fn hints_into_vips(zone: &Zone, svcb: &SVCB) -> bool {
    svcb.svc_params.iter().any(|(_, value)| match value {
        SvcParamValue::Ipv4Hint(hints) => hints
            .0
            .iter()
            .any(|A(v4)| zone.in_vip_range(IpAddr::V4(*v4))),
        SvcParamValue::Ipv6Hint(hints) => hints
            .0
            .iter()
            .any(|AAAA(v6)| zone.in_vip_range(IpAddr::V6(*v6))),
        _ => false,
    })
}

/// The reply, or over UDP when it is longer than the client takes, its header and question
/// with TC set, so the client asks again over TCP.
fn fit(reply: Vec<u8>, transport: Transport, udp_limit: usize) -> Option<Vec<u8>> {
    if transport == Transport::Tcp || reply.len() <= udp_limit {
        return Some(reply);
    }
    let full = Message::from_vec(&reply).ok()?;
    let mut cut = Message::response(full.metadata.id, full.metadata.op_code);
    cut.metadata = full.metadata;
    cut.metadata.truncation = true;
    cut.queries = full.queries;
    cut.edns = full.edns;
    cut.to_vec().ok()
}

/// A DNS message over TCP: two bytes of length, then the message (RFC 1035 4.2.2).
async fn read_framed<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "empty DNS message",
        ));
    }
    let mut packet = vec![0u8; usize::from(len)];
    stream.read_exact(&mut packet).await?;
    Ok(packet)
}

async fn write_framed<S: AsyncWrite + Unpin>(stream: &mut S, packet: &[u8]) -> io::Result<()> {
    let len = u16::try_from(packet.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "DNS message longer than 65535 bytes",
        )
    })?;
    let mut framed = Vec::with_capacity(packet.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;
    use std::sync::Mutex;
    use tokio::task::JoinHandle;

    /// The bound on every wait for something that should happen.
    const WAIT: Duration = Duration::from_secs(2);
    /// How long a dead upstream is waited on.
    const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(200);

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn ranges() -> Vec<Cidr> {
        vec![
            Cidr::parse("242.0.0.0/8").unwrap(),
            Cidr::parse("fd00:242::/32").unwrap(),
        ]
    }

    fn test_zone() -> Zone {
        Zone::new(
            [
                ("httpbin.mesh".to_string(), ip("242.0.0.1")),
                ("httpbin.mesh".to_string(), ip("fd00:242::1")),
                ("httpbin.extsvc.mesh.local".to_string(), ip("242.0.0.1")),
                ("api.example.com".to_string(), ip("242.0.0.2")),
            ],
            ranges(),
        )
    }

    fn settings(upstreams: Vec<SocketAddr>) -> DnsSettings {
        DnsSettings {
            upstreams,
            upstream_timeout: UPSTREAM_TIMEOUT,
            ..DnsSettings::default()
        }
    }

    struct Running {
        udp: SocketAddr,
        tcp: SocketAddr,
        zone: watch::Sender<Arc<Zone>>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        served: JoinHandle<()>,
    }

    impl Running {
        async fn shut_down(self) {
            self.stop.cancel();
            tokio::time::timeout(WAIT, self.served)
                .await
                .unwrap()
                .unwrap();
        }

        fn answers(&self, kind: &'static str) -> u64 {
            self.metrics
                .dns_answers
                .get_or_create(&DnsAnswerLabels { kind })
                .get()
        }

        fn failures(&self, reason: &'static str) -> u64 {
            self.metrics
                .dns_upstream_failures
                .get_or_create(&DnsFailureLabels { reason })
                .get()
        }
    }

    async fn start(settings: DnsSettings) -> Running {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let (zone, zone_rx) = watch::channel(Arc::new(test_zone()));
        let metrics = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(
            udp,
            tcp,
            zone_rx,
            settings,
            metrics.clone(),
            stop.clone(),
        ));
        Running {
            udp: udp_addr,
            tcp: tcp_addr,
            zone,
            metrics,
            stop,
            served,
        }
    }

    /// A UDP socket and a TCP listener on one port, as a resolver listens.
    async fn bind_pair() -> (UdpSocket, TcpListener) {
        for _ in 0..50 {
            let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = tcp.local_addr().unwrap().port();
            if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)).await {
                return (udp, tcp);
            }
        }
        panic!("no port free for both UDP and TCP");
    }

    type Seen = Arc<Mutex<Vec<(String, Transport)>>>;

    /// A resolver answering from `respond`, each returned message sent in turn; the questions
    /// it got are in `seen`.
    async fn fake_upstream(
        respond: impl Fn(&Message, Transport) -> Vec<Message> + Send + Sync + 'static,
    ) -> (SocketAddr, Seen) {
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let respond = Arc::new(respond);
        let record = {
            let seen = seen.clone();
            move |query: &Message, transport| {
                let name = query.queries[0].name.to_ascii();
                seen.lock().unwrap().push((name, transport));
            }
        };
        {
            let (respond, record) = (respond.clone(), record.clone());
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65535];
                loop {
                    let (len, from) = udp.recv_from(&mut buffer).await.unwrap();
                    let query = Message::from_vec(&buffer[..len]).unwrap();
                    record(&query, Transport::Udp);
                    for reply in respond(&query, Transport::Udp) {
                        udp.send_to(&reply.to_vec().unwrap(), from).await.unwrap();
                    }
                }
            });
        }
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                let (respond, record) = (respond.clone(), record.clone());
                tokio::spawn(async move {
                    while let Ok(packet) = read_framed(&mut stream).await {
                        let query = Message::from_vec(&packet).unwrap();
                        record(&query, Transport::Tcp);
                        for reply in respond(&query, Transport::Tcp) {
                            write_framed(&mut stream, &reply.to_vec().unwrap())
                                .await
                                .unwrap();
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    fn a(name: &Name, text: &str) -> Record {
        let IpAddr::V4(v4) = ip(text) else {
            panic!("{text} is not IPv4")
        };
        Record::from_rdata(name.clone(), 300, RData::A(A(v4)))
    }

    /// The outside world: a few names with fixed answers, NXDOMAIN for the rest.
    fn internet(query: &Message, transport: Transport) -> Vec<Message> {
        let question = query.queries[0].clone();
        let name = question.name.clone();
        let mut reply = reply_to(&query.metadata);
        reply.add_query(question.clone());
        if question.query_type == RecordType::AAAA {
            if name.to_ascii() == "rebind.example." {
                let mapped = Ipv4Addr::new(242, 1, 2, 4).to_ipv6_mapped();
                reply.add_answer(Record::from_rdata(name, 300, RData::AAAA(AAAA(mapped))));
            }
            return vec![reply];
        }
        match (name.to_ascii().as_str(), transport) {
            ("outside.example.", _) => {
                reply.add_answer(a(&name, "93.184.216.34"));
            }
            ("rebind.example.", _) => {
                // Vouched for by the upstream: no longer so once records are removed.
                reply.metadata.authentic_data = true;
                reply.add_answer(a(&name, "242.1.2.3"));
                reply.add_answer(a(&name, "93.184.216.35"));
            }
            ("big.example." | "many.example.", Transport::Udp) => {
                reply.metadata.truncation = true;
            }
            ("big.example.", Transport::Tcp) => {
                reply.add_answer(a(&name, "93.184.216.36"));
            }
            ("many.example.", Transport::Tcp) => {
                for host in 1..=60 {
                    reply.add_answer(a(&name, &format!("198.51.100.{host}")));
                }
            }
            ("spoofed.example.", _) => {
                let mut forged = reply.clone();
                forged.metadata.id ^= 1;
                forged.add_answer(a(&name, "203.0.113.66"));
                reply.add_answer(a(&name, "93.184.216.37"));
                return vec![forged, reply];
            }
            _ => reply.metadata.response_code = ResponseCode::NXDomain,
        }
        vec![reply]
    }

    fn question(name: &str, query_type: RecordType) -> Message {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), query_type));
        message
    }

    async fn ask_udp_raw(server: SocketAddr, packet: &[u8]) -> Vec<u8> {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(packet, server).await.unwrap();
        let mut buffer = vec![0u8; 65535];
        let len = tokio::time::timeout(WAIT, socket.recv(&mut buffer))
            .await
            .expect("no UDP answer in time")
            .unwrap();
        buffer.truncate(len);
        buffer
    }

    async fn ask_udp(server: SocketAddr, query: &Message) -> Message {
        let reply = ask_udp_raw(server, &query.to_vec().unwrap()).await;
        Message::from_vec(&reply).unwrap()
    }

    async fn ask_on(stream: &mut TcpStream, query: &Message) -> Message {
        let exchange = async {
            write_framed(stream, &query.to_vec().unwrap())
                .await
                .unwrap();
            read_framed(stream).await.unwrap()
        };
        let reply = tokio::time::timeout(WAIT, exchange)
            .await
            .expect("no TCP answer in time");
        Message::from_vec(&reply).unwrap()
    }

    async fn ask_tcp(server: SocketAddr, query: &Message) -> Message {
        let mut stream = TcpStream::connect(server).await.unwrap();
        ask_on(&mut stream, query).await
    }

    /// Reads until the server closes the connection; fails if it stays open past `WAIT`.
    async fn assert_closed(stream: &mut TcpStream) {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .expect("connection still open")
            .ok();
        assert!(rest.is_empty());
    }

    fn addresses(reply: &Message) -> Vec<IpAddr> {
        reply
            .answers
            .iter()
            .filter_map(|record| record.data.ip_addr())
            .collect()
    }

    fn assert_echoes(reply: &Message, query: &Message) {
        assert_eq!(reply.metadata.id, query.metadata.id);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.queries, query.queries);
        assert!(reply.metadata.recursion_desired);
        assert!(reply.metadata.recursion_available);
    }

    #[test]
    fn zone_lookup_ignores_case_and_trailing_dot() {
        let zone = test_zone();
        let httpbin = [ip("242.0.0.1"), ip("fd00:242::1")];
        assert_eq!(zone.lookup("httpbin.mesh"), Some(&httpbin[..]));
        assert_eq!(zone.lookup("HTTPBin.Mesh."), Some(&httpbin[..]));
        assert_eq!(
            zone.lookup("api.example.com."),
            Some(&[ip("242.0.0.2")][..])
        );
        assert_eq!(zone.lookup("www.httpbin.mesh"), None);
        assert_eq!(zone.lookup("mesh"), None);
        assert_eq!(zone.len(), 3);

        let zone = Zone::new(
            [
                ("Dup.Mesh.".to_string(), ip("242.0.0.7")),
                ("dup.mesh".to_string(), ip("242.0.0.7")),
                (".".to_string(), ip("242.0.0.8")),
                (String::new(), ip("242.0.0.9")),
            ],
            ranges(),
        );
        assert_eq!(zone.lookup("dup.mesh"), Some(&[ip("242.0.0.7")][..]));
        assert_eq!(zone.lookup("."), None);
        assert_eq!(zone.len(), 1);
        assert!(zone.in_vip_range(ip("242.255.0.1")));
        assert!(zone.in_vip_range(ip("::ffff:242.0.0.1")));
        assert!(zone.in_vip_range(ip("fd00:242::5")));
        assert!(!zone.in_vip_range(ip("93.184.216.34")));
        assert!(!zone.in_vip_range(ip("::ffff:10.0.0.1")));
    }

    #[test]
    fn address_records_and_hints_into_vips_are_recognised() {
        use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey};
        use hickory_proto::rr::rdata::HTTPS;

        let zone = test_zone();
        let name = Name::from_ascii("rebind.example.").unwrap();
        let https = |params| {
            let data = RData::HTTPS(HTTPS(SVCB::new(1, Name::root(), params)));
            Record::from_rdata(name.clone(), 300, data)
        };
        let v4_hint = |text: &str| {
            let IpAddr::V4(v4) = ip(text) else { panic!() };
            vec![(
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(vec![A(v4)])),
            )]
        };
        let v6_hint = |text: &str| {
            let IpAddr::V6(v6) = ip(text) else { panic!() };
            vec![(
                SvcParamKey::Ipv6Hint,
                SvcParamValue::Ipv6Hint(IpHint(vec![AAAA(v6)])),
            )]
        };
        let aaaa = |text: &str| {
            let IpAddr::V6(v6) = ip(text) else { panic!() };
            Record::from_rdata(name.clone(), 300, RData::AAAA(AAAA(v6)))
        };
        assert!(points_into_vips(&zone, &a(&name, "242.1.2.3")));
        assert!(!points_into_vips(&zone, &a(&name, "93.184.216.34")));
        assert!(points_into_vips(&zone, &aaaa("::ffff:242.1.2.3")));
        assert!(points_into_vips(&zone, &aaaa("fd00:242::9")));
        assert!(!points_into_vips(&zone, &aaaa("2606:2800:220:1::1")));
        assert!(points_into_vips(&zone, &https(v4_hint("242.9.9.9"))));
        assert!(points_into_vips(&zone, &https(v6_hint("::ffff:242.9.9.9"))));
        assert!(!points_into_vips(&zone, &https(v4_hint("93.184.216.34"))));
        assert!(!points_into_vips(&zone, &https(Vec::new())));
    }

    #[test]
    fn upstreams_come_from_nameserver_lines() {
        let cases: &[(&str, Result<&[&str], ()>)] = &[
            ("nameserver 10.0.0.2\n", Ok(&["10.0.0.2:53"])),
            (
                "# written by NetworkManager\nsearch default.svc.cluster.local svc.cluster.local\n\
                 nameserver 1.1.1.1 # primary\n; nameserver 9.9.9.9\noptions ndots:5 timeout:1\n\
                 \tnameserver\t8.8.8.8\n",
                Ok(&["1.1.1.1:53", "8.8.8.8:53"]),
            ),
            (
                "nameserver 2001:4860:4860::8888\nnameserver fe80::1%2\n\
                 nameserver fe80::1%eth0\nnameserver fe80::2\n",
                Ok(&["[2001:4860:4860::8888]:53", "[fe80::1%2]:53"]),
            ),
            (
                "nameserver 10.0.0.2\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n",
                Ok(&["10.0.0.2:53", "10.0.0.3:53"]),
            ),
            ("nameserver 127.0.0.53\r\n", Ok(&["127.0.0.53:53"])),
            ("nameserver resolver.example\nnameserver\n", Err(())),
            ("search example.com\noptions edns0 trust-ad\n", Err(())),
            ("#nameserver 10.0.0.2\n", Err(())),
            ("", Err(())),
        ];
        for (text, want) in cases {
            let got = upstreams_from_resolv_conf(text);
            match want {
                Ok(want) => {
                    let want: Vec<SocketAddr> = want.iter().map(|a| a.parse().unwrap()).collect();
                    assert_eq!(got, Ok(want), "{text:?}");
                }
                Err(()) => assert!(got.is_err(), "{text:?}: {got:?}"),
            }
        }
    }

    #[tokio::test]
    async fn zone_names_get_their_vips_authoritatively() {
        let dns = start(settings(Vec::new())).await;
        for name in [
            "httpbin.mesh.",
            "HTTPBIN.extsvc.mesh.local.",
            "api.example.com.",
        ] {
            let query = question(name, RecordType::A);
            for reply in [
                ask_udp(dns.udp, &query).await,
                ask_tcp(dns.tcp, &query).await,
            ] {
                assert_echoes(&reply, &query);
                assert!(reply.metadata.authoritative);
                assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
                assert_eq!(reply.answers.len(), 1, "{name}");
                let record = &reply.answers[0];
                assert_eq!(record.ttl, 30);
                // The name comes back as asked, case and all.
                assert!(record.name.eq_case(&query.queries[0].name));
                assert!(dns
                    .zone
                    .borrow()
                    .in_vip_range(record.data.ip_addr().unwrap()));
            }
        }
        let text = dns.metrics.encode();
        for line in [
            "sluice_dns_queries_total{transport=\"udp\"} 3\n",
            "sluice_dns_queries_total{transport=\"tcp\"} 3\n",
            "sluice_dns_answers_total{kind=\"vip\"} 6\n",
            "sluice_dns_query_duration_seconds_count{source=\"local\"} 6\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        dns.shut_down().await;
    }

    #[tokio::test]
    async fn other_types_for_zone_names_get_no_data() {
        let dns = start(settings(Vec::new())).await;
        for query_type in [RecordType::MX, RecordType::TXT] {
            let query = question("httpbin.mesh.", query_type);
            let reply = ask_udp(dns.udp, &query).await;
            assert_echoes(&reply, &query);
            assert!(reply.metadata.authoritative);
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
            assert!(reply.answers.is_empty(), "{query_type}");
        }
        assert_eq!(dns.answers("nodata"), 2);
        // AAAA: the name's IPv6 VIP, or nothing for a name with IPv4 VIPs only.
        let reply = ask_udp(dns.udp, &question("httpbin.mesh.", RecordType::AAAA)).await;
        assert_eq!(addresses(&reply), [ip("fd00:242::1")]);
        let reply = ask_udp(dns.udp, &question("api.example.com.", RecordType::AAAA)).await;
        assert!(reply.answers.is_empty());
        dns.shut_down().await;
    }

    #[tokio::test]
    async fn other_names_are_forwarded_and_passed_through() {
        let (upstream, seen) = fake_upstream(internet).await;
        let dns = start(settings(vec![upstream])).await;

        let query = question("outside.example.", RecordType::A);
        let reply = ask_udp(dns.udp, &query).await;
        assert_echoes(&reply, &query);
        assert!(!reply.metadata.authoritative);
        assert_eq!(addresses(&reply), [ip("93.184.216.34")]);
        assert_eq!(reply.answers[0].ttl, 300);

        let reply = ask_udp(dns.udp, &question("nowhere.example.", RecordType::A)).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);

        // Asked over TCP, asked upstream over TCP.
        let reply = ask_tcp(dns.tcp, &query).await;
        assert_echoes(&reply, &query);
        assert_eq!(addresses(&reply), [ip("93.184.216.34")]);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                ("outside.example.".to_string(), Transport::Udp),
                ("nowhere.example.".to_string(), Transport::Udp),
                ("outside.example.".to_string(), Transport::Tcp),
            ]
        );
        assert_eq!(dns.answers("forwarded"), 3);
        dns.shut_down().await;
    }

    #[test]
    fn the_server_never_forwards_to_itself() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // (upstreams, where the server listens, what is kept or "refused")
        let cases = [
            ("127.0.0.1:53 10.0.0.2:53", "127.0.0.1:53", "10.0.0.2:53"),
            ("127.0.0.1:53", "0.0.0.0:53", "refused"),
            ("127.0.0.53:53", "127.0.0.1:15053", "127.0.0.53:53"),
            ("[::1]:53 192.0.2.1:53", "[::]:53", "192.0.2.1:53"),
            ("", "127.0.0.1:15053", ""),
        ];
        for (upstreams, bound, want) in cases {
            let upstreams = upstreams.split_whitespace().map(a).collect();
            let got = match forwarding_targets(upstreams, a(bound)) {
                Ok(kept) => kept
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                Err(e) if e.contains("--dns-upstream") => "refused".to_string(),
                Err(e) => e,
            };
            assert_eq!(got, want, "{bound}");
        }
    }

    #[tokio::test]
    async fn upstream_records_pointing_into_vips_are_removed() {
        let (upstream, _) = fake_upstream(internet).await;
        let dns = start(settings(vec![upstream])).await;
        let query = question("rebind.example.", RecordType::A);
        let reply = ask_udp(dns.udp, &query).await;
        assert_echoes(&reply, &query);
        assert_eq!(addresses(&reply), [ip("93.184.216.35")]);
        assert!(!reply.metadata.authentic_data);
        let reply = ask_tcp(dns.tcp, &question("rebind.example.", RecordType::AAAA)).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty());
        assert_eq!(dns.metrics.dns_vip_records_removed.get(), 2);
        dns.shut_down().await;
    }

    #[tokio::test]
    async fn truncated_upstream_answers_are_asked_again_over_tcp() {
        let (upstream, seen) = fake_upstream(internet).await;
        let dns = start(settings(vec![upstream])).await;
        let query = question("big.example.", RecordType::A);
        let reply = ask_udp(dns.udp, &query).await;
        assert_echoes(&reply, &query);
        assert!(!reply.metadata.truncation);
        assert_eq!(addresses(&reply), [ip("93.184.216.36")]);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                ("big.example.".to_string(), Transport::Udp),
                ("big.example.".to_string(), Transport::Tcp),
            ]
        );

        // Too long for a client without EDNS: cut, so it asks over TCP itself.
        let query = question("many.example.", RecordType::A);
        let reply = ask_udp(dns.udp, &query).await;
        assert_echoes(&reply, &query);
        assert!(reply.metadata.truncation);
        assert!(reply.answers.is_empty());
        let reply = ask_tcp(dns.tcp, &query).await;
        assert!(!reply.metadata.truncation);
        assert_eq!(reply.answers.len(), 60);

        // One taking 4096 bytes over UDP gets it all there.
        let mut query = question("many.example.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        query.set_edns(edns);
        let reply = ask_udp(dns.udp, &query).await;
        assert!(!reply.metadata.truncation);
        assert_eq!(reply.answers.len(), 60);
        dns.shut_down().await;
    }

    #[tokio::test]
    async fn forged_upstream_answers_are_ignored() {
        let (upstream, _) = fake_upstream(internet).await;
        let dns = start(settings(vec![upstream])).await;
        let reply = ask_udp(dns.udp, &question("spoofed.example.", RecordType::A)).await;
        assert_eq!(addresses(&reply), [ip("93.184.216.37")]);
        assert_eq!(dns.failures("mismatch"), 1);
        dns.shut_down().await;
    }

    #[tokio::test]
    async fn silent_upstreams_mean_servfail_after_the_timeout() {
        // Bound, never read: queries to it go unanswered over UDP and TCP alike.
        let (dead, _dead_tcp) = bind_pair().await;
        let dead = dead.local_addr().unwrap();
        let dns = start(settings(vec![dead])).await;
        let query = question("outside.example.", RecordType::A);
        let began = Instant::now();
        let reply = ask_udp(dns.udp, &query).await;
        let took = began.elapsed();
        assert_echoes(&reply, &query);
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(
            took >= UPSTREAM_TIMEOUT && took < UPSTREAM_TIMEOUT * 3,
            "{took:?}"
        );
        let reply = ask_tcp(dns.tcp, &query).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(dns.failures("timeout"), 2);
        assert_eq!(dns.answers("servfail"), 2);
        dns.shut_down().await;

        // The next upstream is asked once the first has had its time.
        let (upstream, _) = fake_upstream(internet).await;
        let dns = start(settings(vec![dead, upstream])).await;
        let reply = ask_udp(dns.udp, &query).await;
        assert_eq!(addresses(&reply), [ip("93.184.216.34")]);
        dns.shut_down().await;
    }

    #[tokio::test]
    async fn broken_queries_get_formerr_or_notimp_or_nothing() {
        let dns = start(settings(Vec::new())).await;

        // A readable header announcing a question that is not there.
        let mut garbage = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        garbage.extend_from_slice(&[0xff; 7]);
        let reply = Message::from_vec(&ask_udp_raw(dns.udp, &garbage).await).unwrap();
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert!(reply.metadata.recursion_desired);

        let mut two = question("httpbin.mesh.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("api.example.com.").unwrap(),
            RecordType::A,
        ));
        let reply = ask_udp(dns.udp, &two).await;
        assert_eq!(reply.metadata.id, two.metadata.id);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert!(reply.answers.is_empty());

        let mut none = question("httpbin.mesh.", RecordType::A);
        none.queries.clear();
        let reply = ask_tcp(dns.tcp, &none).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

        let mut status = question("httpbin.mesh.", RecordType::A);
        status.metadata.op_code = OpCode::Status;
        let reply = ask_udp(dns.udp, &status).await;
        assert_eq!(reply.metadata.id, status.metadata.id);
        assert_eq!(reply.metadata.response_code, ResponseCode::NotImp);

        // Too short for a header, or an answer rather than a query: no reply. The valid query
        // sent after them on the same socket is the first thing answered.
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut answer = question("httpbin.mesh.", RecordType::A);
        answer.metadata.message_type = MessageType::Response;
        let query = question("httpbin.mesh.", RecordType::A);
        for packet in [
            vec![0x12, 0x34, 0x01],
            answer.to_vec().unwrap(),
            query.to_vec().unwrap(),
        ] {
            socket.send_to(&packet, dns.udp).await.unwrap();
        }
        let mut buffer = vec![0u8; 4096];
        let len = tokio::time::timeout(WAIT, socket.recv(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        let reply = Message::from_vec(&buffer[..len]).unwrap();
        assert_eq!(reply.metadata.id, query.metadata.id);
        assert_eq!(addresses(&reply), [ip("242.0.0.1")]);
        assert_eq!(dns.answers("formerr"), 3);
        assert_eq!(dns.answers("notimp"), 1);
        assert_eq!(dns.answers("dropped"), 2);
        dns.shut_down().await;
    }

    #[tokio::test]
    async fn zone_changes_apply_to_the_next_query() {
        let (upstream, _) = fake_upstream(internet).await;
        let dns = start(settings(vec![upstream])).await;
        let query = question("new.mesh.", RecordType::A);
        let reply = ask_udp(dns.udp, &query).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);

        dns.zone.send_replace(Arc::new(Zone::new(
            [("new.mesh".to_string(), ip("242.0.0.9"))],
            ranges(),
        )));
        let reply = ask_udp(dns.udp, &query).await;
        assert!(reply.metadata.authoritative);
        assert_eq!(addresses(&reply), [ip("242.0.0.9")]);
        // Names gone from the zone are no longer answered with their VIP.
        let reply = ask_udp(dns.udp, &question("httpbin.mesh.", RecordType::A)).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        dns.shut_down().await;
    }

    #[tokio::test]
    async fn queries_beyond_the_in_flight_limit_are_dropped() {
        let (dead, _dead_tcp) = bind_pair().await;
        let dns = start(DnsSettings {
            max_in_flight: 1,
            ..settings(vec![dead.local_addr().unwrap()])
        })
        .await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let first = question("one.example.", RecordType::A);
        let second = question("two.example.", RecordType::A);
        for query in [&first, &second] {
            socket
                .send_to(&query.to_vec().unwrap(), dns.udp)
                .await
                .unwrap();
        }
        let mut buffer = vec![0u8; 4096];
        let len = tokio::time::timeout(WAIT, socket.recv(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        let reply = Message::from_vec(&buffer[..len]).unwrap();
        assert_eq!(reply.metadata.id, first.metadata.id);
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        // Zone names are answered whatever waits upstream.
        let reply = ask_udp(dns.udp, &question("httpbin.mesh.", RecordType::A)).await;
        assert_eq!(addresses(&reply), [ip("242.0.0.1")]);
        assert_eq!(dns.answers("overflow"), 1);
        dns.shut_down().await;
    }

    #[tokio::test]
    async fn tcp_connections_are_limited_and_closed_when_idle() {
        let dns = start(DnsSettings {
            max_tcp_connections: 1,
            tcp_idle_timeout: Duration::from_millis(300),
            ..settings(Vec::new())
        })
        .await;
        let query = question("httpbin.mesh.", RecordType::A);
        let mut first = TcpStream::connect(dns.tcp).await.unwrap();
        assert_eq!(
            addresses(&ask_on(&mut first, &query).await),
            [ip("242.0.0.1")]
        );
        let mut second = TcpStream::connect(dns.tcp).await.unwrap();
        assert_closed(&mut second).await;
        // Several queries on one connection.
        assert_eq!(
            addresses(&ask_on(&mut first, &query).await),
            [ip("242.0.0.1")]
        );
        // Half a length prefix, then nothing: closed once the idle time has passed.
        first.write_all(&[0]).await.unwrap();
        assert_closed(&mut first).await;

        let mut third = TcpStream::connect(dns.tcp).await.unwrap();
        assert_eq!(
            addresses(&ask_on(&mut third, &query).await),
            [ip("242.0.0.1")]
        );
        assert_closed(&mut third).await;
        dns.shut_down().await;
    }
}

//! The engine: a TUN device and a UDP socket joined by two threads.
//!
//! TX thread: TUN -> (finish checksums, cut TCP super packets) -> route by inner destination ->
//! ESP seal (in place) -> sendmmsg, with UDP GSO for runs to one endpoint.
//! RX thread: recvmmsg -> keepalive / control / ESP open (in place) -> checks -> TUN, merging
//! in-order TCP segments into one write when the TUN takes virtio headers (offload.rs).
//!
//! Wire format and drop rules are those of btmm_core/dataplane/api.py (RFC 4303, 4106, 3948);
//! the offloads only change how packets cross the TUN, never what goes on the wire or what the
//! counters count (one inner packet at a time).
//!
//! Shared state is split so the two threads never wait for each other: the peer table (routes
//! and transmit SAs) is locked by the TX thread once per batch, the SPI table (receive SAs and
//! their replay windows) by the RX thread once per batch; the control plane takes both briefly.
//! Endpoints and counters are atomics, so roaming (RX) is seen by TX without a lock.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

use crate::error::EngineError;
use crate::esp::{self, DropReason, RxSa, TxSa, HEADER_LEN, MAX_TRAILER};
use crate::offload::{
    self, Tcp6Gso, TcpSeg, VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV6, VNET_HDR_LEN,
};
use crate::tun::Tun;
use crate::udp::{Outgoing, RecvBatch, SendBatch, Udp};

/// Packets handled per batch by each thread.
pub const BATCH: usize = 64;
/// Largest IP packet a TUN read can return, and largest UDP datagram received.
const MAX_PACKET: usize = 65535;
/// Room for one TUN read: a 64 KiB packet (or TCP super packet) and its virtio header.
const MAX_READ: usize = MAX_PACKET + 1 + 256;
const TX_SLOT: usize = HEADER_LEN + MAX_READ + MAX_TRAILER + 3;
const RX_SLOT: usize = MAX_PACKET + 1;
/// Largest UDP payload over IPv4 (65535 - 20 - 8).
const MAX_UDP_PAYLOAD: usize = 65507;
/// Receive SAs per peer: the current one and the previous (make-before-break rekey).
pub const MAX_RX_SAS: usize = 2;
/// Largest control message (after the non-ESP marker) handed to the control plane; a
/// handshake message is under 200 bytes, anything longer is dropped as `control_oversize`.
pub const MAX_CONTROL_MESSAGE: usize = 1024;
/// Default bound of the control messages queued for the control plane, in payload bytes.
pub const DEFAULT_CONTROL_QUEUE_BYTES: usize = 4 << 20;
/// Counter slots, indexed by `DropReason as usize` (slot 0 unused).
const DROP_SLOTS: usize = DropReason::ALL.len() + 1;

pub type Inner = [u8; 16];

pub struct Config {
    pub tun_name: Option<String>,
    pub tun_fd: Option<RawFd>,
    pub listen: SocketAddrV4,
    pub mtu: u32,
    pub event_queue: usize,
    /// Bound of the queued control messages' payload bytes (they are unauthenticated).
    pub control_queue_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Control {
        source: SocketAddrV4,
        payload: Vec<u8>,
    },
    Roamed {
        inner: Inner,
        old: Option<SocketAddrV4>,
        new: SocketAddrV4,
    },
    Exhausted {
        inner: Inner,
        spi: u32,
    },
}

#[derive(Default)]
pub struct Counters {
    pub packets_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub keepalives_in: AtomicU64,
    pub control_in: AtomicU64,
    drops: [AtomicU64; DROP_SLOTS],
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub keepalives_in: u64,
    pub control_in: u64,
    /// Indexed by `DropReason as usize`.
    pub drops: [u64; DROP_SLOTS],
}

impl CounterSnapshot {
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
}

fn add(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

impl Counters {
    pub fn drop(&self, r: DropReason) {
        self.drops[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let mut drops = [0; DROP_SLOTS];
        for (d, a) in drops.iter_mut().zip(&self.drops) {
            *d = a.load(Ordering::Relaxed);
        }
        CounterSnapshot {
            packets_in: self.packets_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            packets_out: self.packets_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            keepalives_in: self.keepalives_in.load(Ordering::Relaxed),
            control_in: self.control_in.load(Ordering::Relaxed),
            drops,
        }
    }
}

/// Per-batch totals, added to the shared atomics once per batch.
#[derive(Default)]
struct Tally {
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    bytes_out: u64,
    keepalives_in: u64,
    control_in: u64,
    drops: [u64; DROP_SLOTS],
}

impl Tally {
    fn flush(&mut self, c: &Counters) {
        add(&c.packets_in, self.packets_in);
        add(&c.bytes_in, self.bytes_in);
        add(&c.packets_out, self.packets_out);
        add(&c.bytes_out, self.bytes_out);
        add(&c.keepalives_in, self.keepalives_in);
        add(&c.control_in, self.control_in);
        for (a, &n) in c.drops.iter().zip(&self.drops) {
            add(a, n);
        }
        *self = Tally::default();
    }
}

/// An endpoint packed in one word so both threads read and write it without a lock:
/// bit 48 = present, bits 16..48 = IPv4 address, bits 0..16 = port.
fn pack(ep: Option<SocketAddrV4>) -> u64 {
    match ep {
        None => 0,
        Some(a) => 1 << 48 | u64::from(u32::from(*a.ip())) << 16 | u64::from(a.port()),
    }
}

fn unpack(v: u64) -> Option<SocketAddrV4> {
    (v >> 48 & 1 == 1).then(|| SocketAddrV4::new(Ipv4Addr::from((v >> 16) as u32), v as u16))
}

struct Peer {
    inner: Inner,
    endpoint: AtomicU64,
    counters: Counters,
}

struct TxSlot {
    sa: TxSa,
    /// The exhaustion event is queued once per SA.
    reported: AtomicBool,
}

struct PeerEntry {
    peer: Arc<Peer>,
    tx: Option<Arc<TxSlot>>,
    /// Receive SPIs, oldest first (bookkeeping for the control plane; the SAs are in `rx`).
    rx_spis: VecDeque<u32>,
}

struct RxEntry {
    peer: Arc<Peer>,
    sa: RxSa,
}

struct Fds {
    tun: OwnedFd,
    udp: Arc<Udp>,
    /// Written once by `stop` to wake both threads out of poll.
    wake: OwnedFd,
    /// Readable while events are queued (the control plane's `fileno`).
    events: OwnedFd,
}

struct Shared {
    peers: Mutex<HashMap<Inner, PeerEntry>>,
    rx: Mutex<HashMap<u32, RxEntry>>,
    events: Mutex<EventQueue>,
    event_cap: usize,
    control_cap: usize,
    counters: Counters,
    running: AtomicBool,
    fds: RwLock<Option<Fds>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another thread must not wedge the control plane; the data is still coherent
    // (every update is a single insert/remove/store).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) with constant flags.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local u64. EAGAIN (counter saturated) is harmless: the fd
    // is readable anyway.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

fn eventfd_clear(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local u64; nonblocking, EAGAIN when already clear.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Events for the control plane and the payload bytes of the control messages among them.
#[derive(Default)]
struct EventQueue {
    queue: VecDeque<Event>,
    control_bytes: usize,
}

fn control_bytes(ev: &Event) -> usize {
    match ev {
        Event::Control { payload, .. } => payload.len(),
        _ => 0,
    }
}

impl Shared {
    /// Queues an event; a full queue (in events, or in control bytes for a control message)
    /// drops it and counts `control_overflow`.
    fn push_event(&self, ev: Event, event_fd: RawFd, peer: Option<&Peer>) -> bool {
        let mut q = lock(&self.events);
        let bytes = control_bytes(&ev);
        if q.queue.len() >= self.event_cap || q.control_bytes + bytes > self.control_cap {
            drop(q);
            self.counters.drop(DropReason::ControlOverflow);
            if let Some(p) = peer {
                p.counters.drop(DropReason::ControlOverflow);
            }
            return false;
        }
        q.control_bytes += bytes;
        q.queue.push_back(ev);
        // Signalled under the queue lock so `drain` never clears a signal for a queued event.
        eventfd_signal(event_fd);
        true
    }
}

pub struct PeerSnapshot {
    pub inner: Inner,
    pub endpoint: Option<SocketAddrV4>,
    pub tx_spi: Option<u32>,
    pub rx_spis: Vec<u32>,
    pub counters: CounterSnapshot,
}

pub struct Engine {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicBool,
    tun_name: String,
    local: SocketAddrV4,
    vnet: bool,
}

fn fmt_inner(inner: &Inner) -> String {
    std::net::Ipv6Addr::from(*inner).to_string()
}

impl Engine {
    pub fn new(cfg: Config) -> Result<Engine, EngineError> {
        if cfg.mtu < 1280 || esp::sealed_len(cfg.mtu as usize) > MAX_UDP_PAYLOAD {
            return Err(EngineError::Invalid(format!(
                "mtu {} out of range: IPv6 needs at least 1280, and a sealed packet must fit one \
                 UDP datagram (mtu at most 65470)",
                cfg.mtu
            )));
        }
        if cfg.event_queue == 0 {
            return Err(EngineError::Invalid(
                "event_queue must be at least 1".into(),
            ));
        }
        if cfg.control_queue_bytes < MAX_CONTROL_MESSAGE {
            return Err(EngineError::Invalid(format!(
                "control_queue_bytes {} must be at least {MAX_CONTROL_MESSAGE} (one control \
                 message)",
                cfg.control_queue_bytes
            )));
        }
        let tun = match (cfg.tun_fd, cfg.tun_name.as_deref()) {
            (Some(fd), _) => Tun::attach(fd)?,
            (None, Some(name)) => Tun::open(name, cfg.mtu)?,
            (None, None) => return Err(EngineError::Invalid("give a tun_name or a tun_fd".into())),
        };
        let udp = Udp::bind(cfg.listen).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EADDRINUSE) => Some(
                    "another process (another btmm?) uses this port; pick another or port 0".into(),
                ),
                Some(libc::EADDRNOTAVAIL) => {
                    Some("the listen address is not assigned to this host".into())
                }
                Some(libc::EACCES) => {
                    Some("ports below 1024 need root or CAP_NET_BIND_SERVICE".into())
                }
                _ => None,
            };
            EngineError::DataPlane {
                what: format!("cannot bind UDP {}: {e}", cfg.listen),
                hint,
            }
        })?;
        let local = udp
            .local_addr()
            .map_err(|e| EngineError::io("getsockname", &e))?;
        let wake = eventfd().map_err(|e| EngineError::io("eventfd", &e))?;
        let events = eventfd().map_err(|e| EngineError::io("eventfd", &e))?;
        let tun_name = tun.name().to_string();
        let vnet = tun.vnet();
        let shared = Arc::new(Shared {
            peers: Mutex::new(HashMap::new()),
            rx: Mutex::new(HashMap::new()),
            events: Mutex::new(EventQueue::default()),
            event_cap: cfg.event_queue,
            control_cap: cfg.control_queue_bytes,
            counters: Counters::default(),
            running: AtomicBool::new(false),
            fds: RwLock::new(Some(Fds {
                tun: tun.into_fd(),
                udp: Arc::new(udp),
                wake,
                events,
            })),
        });
        Ok(Engine {
            shared,
            threads: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
            tun_name,
            local,
            vnet,
        })
    }

    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    fn stopped() -> EngineError {
        EngineError::DataPlane {
            what: "the engine is stopped and its TUN device and socket are closed".into(),
            hint: Some("open a new engine".into()),
        }
    }

    /// Starts both threads. Idempotent; refused after `stop`.
    pub fn start(&self) -> Result<(), EngineError> {
        let mut threads = lock(&self.threads);
        if self.started.load(Ordering::SeqCst) {
            if self
                .shared
                .fds
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
            {
                return Err(Self::stopped());
            }
            return Ok(());
        }
        let raw = {
            let fds = self.shared.fds.read().unwrap_or_else(|e| e.into_inner());
            let f = fds.as_ref().ok_or_else(Self::stopped)?;
            (
                f.tun.as_raw_fd(),
                Arc::clone(&f.udp),
                f.wake.as_raw_fd(),
                f.events.as_raw_fd(),
            )
        };
        let udp_fd = raw.1.fd();
        let vnet = self.vnet;
        self.started.store(true, Ordering::SeqCst);
        self.shared.running.store(true, Ordering::SeqCst);
        let s = Arc::clone(&self.shared);
        let tx = std::thread::Builder::new()
            .name("btmm-tx".into())
            .spawn(move || tx_loop(&s, raw.0, vnet, raw.1, raw.2, raw.3))
            .map_err(|e| EngineError::io("cannot start the TX thread", &e))?;
        threads.push(tx);
        let s = Arc::clone(&self.shared);
        let rx = std::thread::Builder::new()
            .name("btmm-rx".into())
            .spawn(move || rx_loop(&s, raw.0, vnet, udp_fd, raw.2, raw.3))
            .map_err(|e| EngineError::io("cannot start the RX thread", &e))?;
        threads.push(rx);
        Ok(())
    }

    /// Stops and joins the threads, then closes the TUN device, the socket and the event
    /// descriptors. Idempotent.
    pub fn stop(&self) {
        let mut threads = lock(&self.threads);
        self.started.store(true, Ordering::SeqCst);
        self.shared.running.store(false, Ordering::SeqCst);
        if let Some(f) = self
            .shared
            .fds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            eventfd_signal(f.wake.as_raw_fd());
        }
        for t in threads.drain(..) {
            let _ = t.join();
        }
        // Threads are gone: nobody else uses the raw descriptors any more.
        self.shared
            .fds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub fn add_peer(
        &self,
        inner: Inner,
        endpoint: Option<SocketAddrV4>,
    ) -> Result<(), EngineError> {
        let mut peers = lock(&self.shared.peers);
        if peers.contains_key(&inner) {
            return Err(EngineError::data_plane(format!(
                "peer {} already exists; use update_peer to change its endpoint",
                fmt_inner(&inner)
            )));
        }
        let peer = Arc::new(Peer {
            inner,
            endpoint: AtomicU64::new(pack(endpoint)),
            counters: Counters::default(),
        });
        peers.insert(
            inner,
            PeerEntry {
                peer,
                tx: None,
                rx_spis: VecDeque::new(),
            },
        );
        Ok(())
    }

    fn unknown(inner: &Inner) -> EngineError {
        EngineError::UnknownPeer(format!("no peer with inner address {}", fmt_inner(inner)))
    }

    pub fn update_peer(
        &self,
        inner: Inner,
        endpoint: Option<SocketAddrV4>,
    ) -> Result<(), EngineError> {
        let peers = lock(&self.shared.peers);
        let e = peers.get(&inner).ok_or_else(|| Self::unknown(&inner))?;
        e.peer.endpoint.store(pack(endpoint), Ordering::Relaxed);
        Ok(())
    }

    pub fn remove_peer(&self, inner: Inner) -> Result<(), EngineError> {
        let mut peers = lock(&self.shared.peers);
        let e = peers.remove(&inner).ok_or_else(|| Self::unknown(&inner))?;
        let mut rx = lock(&self.shared.rx);
        for spi in e.rx_spis {
            rx.remove(&spi);
        }
        Ok(())
    }

    pub fn install_tx_sa(
        &self,
        inner: Inner,
        spi: u32,
        keymat: &[u8],
        next_seq: u128,
    ) -> Result<(), EngineError> {
        let sa = TxSa::new(spi, keymat, next_seq).map_err(|e| EngineError::Invalid(e.0))?;
        let mut peers = lock(&self.shared.peers);
        let e = peers.get_mut(&inner).ok_or_else(|| Self::unknown(&inner))?;
        e.tx = Some(Arc::new(TxSlot {
            sa,
            reported: AtomicBool::new(false),
        }));
        Ok(())
    }

    pub fn install_rx_sa(&self, inner: Inner, spi: u32, keymat: &[u8]) -> Result<(), EngineError> {
        let sa = RxSa::new(spi, keymat).map_err(|e| EngineError::Invalid(e.0))?;
        let mut peers = lock(&self.shared.peers);
        let e = peers.get_mut(&inner).ok_or_else(|| Self::unknown(&inner))?;
        let mut rx = lock(&self.shared.rx);
        if rx.contains_key(&spi) {
            return Err(EngineError::data_plane(format!(
                "receive SPI {spi:#010x} is already in use; choose a fresh random SPI"
            )));
        }
        while e.rx_spis.len() >= MAX_RX_SAS {
            if let Some(old) = e.rx_spis.pop_front() {
                rx.remove(&old);
            }
        }
        e.rx_spis.push_back(spi);
        rx.insert(
            spi,
            RxEntry {
                peer: Arc::clone(&e.peer),
                sa,
            },
        );
        Ok(())
    }

    pub fn retire_rx_sa(&self, inner: Inner, spi: u32) -> Result<(), EngineError> {
        let mut peers = lock(&self.shared.peers);
        let e = peers.get_mut(&inner).ok_or_else(|| Self::unknown(&inner))?;
        let pos = e.rx_spis.iter().position(|&s| s == spi).ok_or_else(|| {
            EngineError::data_plane(format!(
                "peer {} has no receive SA {spi:#010x}",
                fmt_inner(&inner)
            ))
        })?;
        e.rx_spis.remove(pos);
        lock(&self.shared.rx).remove(&spi);
        Ok(())
    }

    fn send_raw(&self, buf: &[u8], dst: SocketAddrV4) -> Result<(), EngineError> {
        let fds = self.shared.fds.read().unwrap_or_else(|e| e.into_inner());
        let f = fds.as_ref().ok_or_else(Self::stopped)?;
        f.udp
            .send_to(buf, dst, 1000)
            .map_err(|e| EngineError::io(&format!("cannot send to {dst}"), &e))
    }

    pub fn send_control(&self, dst: SocketAddrV4, message: &[u8]) -> Result<(), EngineError> {
        let mut buf = Vec::with_capacity(4 + message.len());
        buf.extend_from_slice(&[0, 0, 0, 0]);
        buf.extend_from_slice(message);
        self.send_raw(&buf, dst)
    }

    pub fn send_keepalive(&self, inner: Inner) -> Result<(), EngineError> {
        let ep = {
            let peers = lock(&self.shared.peers);
            let e = peers.get(&inner).ok_or_else(|| Self::unknown(&inner))?;
            unpack(e.peer.endpoint.load(Ordering::Relaxed))
        };
        let dst = ep.ok_or_else(|| {
            EngineError::data_plane(format!(
                "peer {} has no endpoint to send a keepalive to",
                fmt_inner(&inner)
            ))
        })?;
        self.send_raw(&[0xff], dst)
    }

    /// The event descriptor, or an error once stopped.
    pub fn event_fd(&self) -> Result<RawFd, EngineError> {
        let fds = self.shared.fds.read().unwrap_or_else(|e| e.into_inner());
        Ok(fds.as_ref().ok_or_else(Self::stopped)?.events.as_raw_fd())
    }

    pub fn drain(&self, limit: usize) -> Vec<Event> {
        let fds = self.shared.fds.read().unwrap_or_else(|e| e.into_inner());
        let mut q = lock(&self.shared.events);
        let n = limit.min(q.queue.len());
        let out: Vec<Event> = q.queue.drain(..n).collect();
        q.control_bytes -= out.iter().map(control_bytes).sum::<usize>();
        if q.queue.is_empty() {
            if let Some(f) = fds.as_ref() {
                eventfd_clear(f.events.as_raw_fd());
            }
        }
        out
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    pub fn peers(&self) -> Vec<PeerSnapshot> {
        let peers = lock(&self.shared.peers);
        let mut out: Vec<PeerSnapshot> = peers
            .values()
            .map(|e| PeerSnapshot {
                inner: e.peer.inner,
                endpoint: unpack(e.peer.endpoint.load(Ordering::Relaxed)),
                tx_spi: e.tx.as_ref().map(|t| t.sa.spi()),
                rx_spis: e.rx_spis.iter().copied().collect(),
                counters: e.peer.counters.snapshot(),
            })
            .collect();
        out.sort_by_key(|p| p.inner);
        out
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `fd` is readable or the wake descriptor fires. False when the engine stops.
fn wait_readable(shared: &Shared, fd: RawFd, wake: RawFd) -> bool {
    let mut p = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if !shared.running.load(Ordering::Relaxed) {
            return false;
        }
        // SAFETY: two pollfds, alive for the call. The timeout only bounds how long a missed
        // wake-up could delay stop.
        let r = unsafe { libc::poll(p.as_mut_ptr(), 2, 1000) };
        if r > 0 {
            if p[0].revents & libc::POLLIN == 0 && p[1].revents == 0 {
                // POLLERR/POLLHUP without data (for example the TUN device was deleted): back
                // off instead of spinning until stop.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            return shared.running.load(Ordering::Relaxed);
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

fn is_ipv6(p: &[u8]) -> bool {
    p.len() >= 40 && p[0] >> 4 == 6
}

fn inner_at(p: &[u8], at: usize) -> Inner {
    let mut a = [0u8; 16];
    a.copy_from_slice(&p[at..at + 16]);
    a
}

/// The TX thread's preallocated state for sealing and sending one batch.
struct TxBatch {
    out: Vec<Outgoing>,
    owners: Vec<Arc<Peer>>,
    inner_lens: Vec<usize>,
    sent: [bool; BATCH],
    sender: SendBatch,
    tally: Tally,
    /// Events of this batch, queued once its counters are published, so that the control
    /// plane never sees an event before the counts that go with it.
    events: Vec<(Event, Option<Arc<Peer>>)>,
}

impl TxBatch {
    /// Routes, seals and sends `slots[..lens.len()]` (inner packets at HEADER_LEN).
    fn flush(
        &mut self,
        shared: &Shared,
        udp: &Udp,
        event_fd: RawFd,
        slots: &mut [Vec<u8>],
        lens: &[usize],
    ) {
        self.out.clear();
        self.owners.clear();
        self.inner_lens.clear();
        {
            let peers = lock(&shared.peers);
            for (slot, &len) in slots.iter_mut().zip(lens) {
                let pkt = &slot[HEADER_LEN..HEADER_LEN + len];
                // Oversize: the sealed packet would not fit one UDP datagram (the TUN MTU
                // was raised behind the engine's back).
                if !is_ipv6(pkt) || esp::sealed_len(len) > MAX_UDP_PAYLOAD {
                    self.tally.drops[DropReason::Malformed as usize] += 1;
                    continue;
                }
                let Some(e) = peers.get(&inner_at(pkt, 24)) else {
                    self.tally.drops[DropReason::NoRoute as usize] += 1;
                    continue;
                };
                let ep = unpack(e.peer.endpoint.load(Ordering::Relaxed));
                let (Some(tx), Some(dst)) = (e.tx.as_ref(), ep) else {
                    self.tally.drops[DropReason::NoSa as usize] += 1;
                    e.peer.counters.drop(DropReason::NoSa);
                    continue;
                };
                match tx.sa.seal_in_place(slot, len) {
                    Ok(total) => {
                        self.out.push(Outgoing {
                            ptr: slot.as_ptr(),
                            len: total,
                            dst,
                        });
                        self.owners.push(Arc::clone(&e.peer));
                        self.inner_lens.push(len);
                    }
                    Err(esp::Exhausted) => {
                        self.tally.drops[DropReason::SaExhausted as usize] += 1;
                        e.peer.counters.drop(DropReason::SaExhausted);
                        if !tx.reported.swap(true, Ordering::Relaxed) {
                            let ev = Event::Exhausted {
                                inner: e.peer.inner,
                                spi: tx.sa.spi(),
                            };
                            self.events.push((ev, Some(Arc::clone(&e.peer))));
                        }
                    }
                }
            }
        }
        if !self.out.is_empty() {
            let n = self.out.len();
            self.sent[..n].iter_mut().for_each(|s| *s = false);
            self.sender.send(udp, &self.out, &mut self.sent[..n]);
            for ((peer, &len), &ok) in self.owners.iter().zip(&self.inner_lens).zip(&self.sent) {
                if ok {
                    self.tally.packets_out += 1;
                    self.tally.bytes_out += len as u64;
                    peer.counters.packets_out.fetch_add(1, Ordering::Relaxed);
                    peer.counters
                        .bytes_out
                        .fetch_add(len as u64, Ordering::Relaxed);
                }
            }
        }
        self.tally.flush(&shared.counters);
        for (ev, peer) in self.events.drain(..) {
            shared.push_event(ev, event_fd, peer.as_deref());
        }
    }
}

fn tx_loop(shared: &Shared, tun: RawFd, vnet: bool, udp: Arc<Udp>, wake: RawFd, event_fd: RawFd) {
    let mut slots: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; TX_SLOT]).collect();
    // A super packet is moved here (by swapping buffers) while its segments fill the slots.
    let mut spare = vec![0u8; TX_SLOT];
    let mut lens = [0usize; BATCH];
    let mut batch = TxBatch {
        out: Vec::with_capacity(BATCH),
        owners: Vec::with_capacity(BATCH),
        inner_lens: Vec::with_capacity(BATCH),
        sent: [false; BATCH],
        sender: SendBatch::new(BATCH),
        tally: Tally::default(),
        events: Vec::with_capacity(BATCH),
    };
    // The virtio header, when there is one, lands in the ESP header's headroom.
    let read_at = if vnet {
        HEADER_LEN - VNET_HDR_LEN
    } else {
        HEADER_LEN
    };
    let read_end = HEADER_LEN + MAX_READ;
    let mut n = 0;
    while wait_readable(shared, tun, wake) {
        loop {
            let mut drained = false;
            for _ in 0..BATCH {
                if n == BATCH {
                    batch.flush(shared, &udp, event_fd, &mut slots, &lens);
                    n = 0;
                }
                let slot = &mut slots[n][read_at..read_end];
                // SAFETY: reads at most `slot.len()` bytes into `slot`.
                let r = unsafe { libc::read(tun, slot.as_mut_ptr().cast(), slot.len()) };
                if r < 0 {
                    // EAGAIN: drained. Other errors (device gone) end this round; poll decides.
                    drained = true;
                    break;
                }
                let r = r as usize;
                if !vnet {
                    lens[n] = r;
                    n += 1;
                    continue;
                }
                if r < VNET_HDR_LEN {
                    batch.tally.drops[DropReason::Malformed as usize] += 1;
                    continue;
                }
                let hdr = VnetHdr::parse(&slots[n][read_at..HEADER_LEN]);
                let len = r - VNET_HDR_LEN;
                match hdr.gso_type & !GSO_ECN {
                    GSO_NONE => {
                        let pkt = &mut slots[n][HEADER_LEN..HEADER_LEN + len];
                        if hdr.flags & F_NEEDS_CSUM != 0
                            && offload::complete_csum(
                                pkt,
                                usize::from(hdr.csum_start),
                                usize::from(hdr.csum_offset),
                            )
                            .is_err()
                        {
                            batch.tally.drops[DropReason::Malformed as usize] += 1;
                            continue;
                        }
                        lens[n] = len;
                        n += 1;
                    }
                    GSO_TCPV6 => {
                        std::mem::swap(&mut slots[n], &mut spare);
                        let pkt = &spare[HEADER_LEN..HEADER_LEN + len];
                        let Ok(gso) = Tcp6Gso::layout(pkt, &hdr) else {
                            batch.tally.drops[DropReason::Malformed as usize] += 1;
                            continue;
                        };
                        for i in 0..gso.segments {
                            if n == BATCH {
                                batch.flush(shared, &udp, event_fd, &mut slots, &lens);
                                n = 0;
                            }
                            lens[n] = gso.write_segment(pkt, i, &mut slots[n][HEADER_LEN..]);
                            n += 1;
                        }
                    }
                    _ => batch.tally.drops[DropReason::Malformed as usize] += 1,
                }
            }
            if n > 0 {
                batch.flush(shared, &udp, event_fd, &mut slots, &lens[..n]);
                n = 0;
            }
            batch.tally.flush(&shared.counters);
            if drained || !shared.running.load(Ordering::Relaxed) {
                break;
            }
        }
    }
}

fn count_in(tally: &mut Tally, peer: &Peer, len: usize) {
    tally.packets_in += 1;
    tally.bytes_in += len as u64;
    peer.counters.packets_in.fetch_add(1, Ordering::Relaxed);
    peer.counters
        .bytes_in
        .fetch_add(len as u64, Ordering::Relaxed);
}

/// Writes the authenticated inner packets of a batch to a TUN device that takes virtio
/// headers, merging runs of consecutive segments of one TCP flow into one super packet
/// (see offload.rs). Counters still count the inner packets one by one.
fn write_coalesced(
    tun: RawFd,
    batch: &mut RecvBatch,
    deliver: &[(usize, std::ops::Range<usize>, Arc<Peer>)],
    iovs: &mut Vec<libc::iovec>,
    tally: &mut Tally,
) -> usize {
    let mut writes = 0;
    let mut k = 0;
    while k < deliver.len() {
        writes += 1;
        let (i0, ref r0, _) = deliver[k];
        let mut end = k + 1;
        let mut run: Option<(TcpSeg, usize, bool)> = None;
        {
            let first = &batch.payload(i0)[r0.clone()];
            if let Some(f) = TcpSeg::parse(first) {
                let (mut last, mut total) = (f, f.payload);
                while end < deliver.len() {
                    let (i, ref r, _) = deliver[end];
                    let next = &batch.payload(i)[r.clone()];
                    match TcpSeg::parse(next) {
                        Some(n) if offload::continues(first, &f, &last, total, next, &n) => {
                            total += n.payload;
                            last = n;
                            end += 1;
                        }
                        _ => break,
                    }
                }
                run = Some((f, total, last.psh));
            }
        }
        let header_at = r0.start - VNET_HDR_LEN;
        // The first segment's headers are rewritten for the super packet; keep the original
        // to fall back to single writes if the kernel refuses the merged one.
        let mut saved = [0u8; 40 + 60];
        let vh = match run {
            Some((f, total, psh)) if end - k > 1 => {
                let (payload, _, _) = batch.get_mut(i0);
                saved[..f.header].copy_from_slice(&payload[r0.start..r0.start + f.header]);
                offload::coalesced_header(&mut payload[r0.clone()], &f, total, psh)
            }
            _ => {
                end = k + 1;
                [0u8; VNET_HDR_LEN]
            }
        };
        let (payload, _, _) = batch.get_mut(i0);
        payload[header_at..r0.start].copy_from_slice(&vh);
        iovs.clear();
        let head = &batch.payload(i0)[header_at..r0.end];
        iovs.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        if let (Some((f, _, _)), true) = (run, end - k > 1) {
            for (i, r, _) in &deliver[k + 1..end] {
                let tail = &batch.payload(*i)[r.start + f.header..r.end];
                iovs.push(libc::iovec {
                    iov_base: tail.as_ptr() as *mut libc::c_void,
                    iov_len: tail.len(),
                });
            }
        }
        // SAFETY: every iovec points into `batch`'s receive buffers, which are not touched
        // until the call returns; the TUN descriptor stays open until this thread is joined.
        let w = unsafe { libc::writev(tun, iovs.as_ptr(), iovs.len() as libc::c_int) };
        if w >= 0 {
            for (_, r, p) in &deliver[k..end] {
                count_in(tally, p, r.len());
            }
        } else if let (Some((f, _, _)), true) = (run, end - k > 1) {
            let (payload, _, _) = batch.get_mut(i0);
            payload[r0.start..r0.start + f.header].copy_from_slice(&saved[..f.header]);
            for (i, r, p) in &deliver[k..end] {
                let (payload, _, _) = batch.get_mut(*i);
                payload[r.start - VNET_HDR_LEN..r.start].fill(0);
                let pkt = &payload[r.start - VNET_HDR_LEN..r.end];
                // SAFETY: writes `pkt.len()` bytes from `pkt` to the TUN descriptor, open until
                // this thread is joined.
                if unsafe { libc::write(tun, pkt.as_ptr().cast(), pkt.len()) } >= 0 {
                    count_in(tally, p, r.len());
                }
            }
        }
        k = end;
    }
    writes
}

fn rx_loop(shared: &Shared, tun: RawFd, vnet: bool, udp: RawFd, wake: RawFd, event_fd: RawFd) {
    let mut batch = RecvBatch::new(BATCH, RX_SLOT);
    let mut deliver: Vec<(usize, std::ops::Range<usize>, Arc<Peer>)> = Vec::with_capacity(BATCH);
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(BATCH + 1);
    // Queued after the batch's counters are published (see TxBatch::events).
    let mut events: Vec<(Event, Option<Arc<Peer>>)> = Vec::with_capacity(BATCH);
    let mut tally = Tally::default();
    while wait_readable(shared, udp, wake) {
        loop {
            // A socket error (an ICMP report) is consumed by the failing call; nothing to do.
            let n = batch.recv(udp).unwrap_or(0);
            if n == 0 {
                break;
            }
            deliver.clear();
            {
                let mut rx = lock(&shared.rx);
                for i in 0..n {
                    let (payload, src, trunc) = batch.get_mut(i);
                    if *payload == [0xff] {
                        tally.keepalives_in += 1;
                        continue;
                    }
                    if trunc {
                        tally.drops[DropReason::Malformed as usize] += 1;
                        continue;
                    }
                    if payload.len() >= 4 && payload[..4] == [0, 0, 0, 0] {
                        tally.control_in += 1;
                        if payload.len() - 4 > MAX_CONTROL_MESSAGE {
                            tally.drops[DropReason::ControlOversize as usize] += 1;
                            continue;
                        }
                        events.push((
                            Event::Control {
                                source: src,
                                payload: payload[4..].to_vec(),
                            },
                            None,
                        ));
                        continue;
                    }
                    if esp::check_length(payload.len()).is_err() {
                        tally.drops[DropReason::Malformed as usize] += 1;
                        continue;
                    }
                    let spi = esp::payload_spi(payload).unwrap_or(0);
                    let Some(entry) = rx.get_mut(&spi) else {
                        tally.drops[DropReason::UnknownSpi as usize] += 1;
                        continue;
                    };
                    let peer = &entry.peer;
                    let opened = match entry.sa.open_in_place(payload) {
                        Ok(o) => o,
                        Err(e) => {
                            tally.drops[e.reason as usize] += 1;
                            peer.counters.drop(e.reason);
                            continue;
                        }
                    };
                    let inner = &payload[opened.inner.clone()];
                    let reason = if !is_ipv6(inner) {
                        Some(DropReason::Malformed)
                    } else if inner[8..24] != peer.inner {
                        Some(DropReason::SourceMismatch)
                    } else {
                        None
                    };
                    if let Some(r) = reason {
                        tally.drops[r as usize] += 1;
                        peer.counters.drop(r);
                        continue;
                    }
                    if opened.advanced {
                        let new = pack(Some(src));
                        let old = peer.endpoint.load(Ordering::Relaxed);
                        if old != new {
                            peer.endpoint.store(new, Ordering::Relaxed);
                            let ev = Event::Roamed {
                                inner: peer.inner,
                                old: unpack(old),
                                new: src,
                            };
                            events.push((ev, Some(Arc::clone(peer))));
                        }
                    }
                    deliver.push((i, opened.inner, Arc::clone(peer)));
                }
            }
            if vnet {
                write_coalesced(tun, &mut batch, &deliver, &mut iovs, &mut tally);
                deliver.clear();
            }
            for (i, range, peer) in deliver.drain(..) {
                let (payload, _, _) = batch.get_mut(i);
                let pkt = &payload[range];
                // SAFETY: writes `pkt.len()` bytes from `pkt` to the TUN descriptor, which
                // stays open until this thread is joined.
                let r = unsafe { libc::write(tun, pkt.as_ptr().cast(), pkt.len()) };
                if r >= 0 {
                    count_in(&mut tally, &peer, pkt.len());
                }
            }
            tally.flush(&shared.counters);
            for (ev, peer) in events.drain(..) {
                shared.push_event(ev, event_fd, peer.as_deref());
            }
            if n < batch.capacity() || !shared.running.load(Ordering::Relaxed) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
    use std::process::Command;
    use std::time::{Duration, Instant};

    const K1: [u8; 36] = [0x11; 36];
    const K2: [u8; 36] = [0x22; 36];

    fn ip(args: &str) {
        let st = Command::new("ip")
            .args(args.split_whitespace())
            .status()
            .expect("run ip");
        assert!(st.success(), "ip {args}");
    }

    fn inner(a: &str) -> Inner {
        a.parse::<Ipv6Addr>().unwrap().octets()
    }

    /// An IPv6/UDP packet with a correct checksum (RFC 8200 §8.1).
    fn udp6(src: &str, dst: &str, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let (s, d) = (inner(src), inner(dst));
        let ulen = 8 + data.len();
        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&dport.to_be_bytes());
        udp.extend_from_slice(&(ulen as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(data);
        let mut sum: u32 = 0;
        let mut words = |b: &[u8]| {
            for c in b.chunks(2) {
                sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
        };
        words(&s);
        words(&d);
        words(&(ulen as u32).to_be_bytes());
        words(&[0, 0, 0, 17]);
        words(&udp);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let ck = !(sum as u16);
        udp[6..8].copy_from_slice(&(if ck == 0 { 0xffff } else { ck }).to_be_bytes());
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(ulen as u16).to_be_bytes());
        p.extend_from_slice(&[17, 64]);
        p.extend_from_slice(&s);
        p.extend_from_slice(&d);
        p.extend_from_slice(&udp);
        p
    }

    /// RFC 8200 §8.1 pseudo-header checksum over the upper-layer part, checked the slow way.
    fn upper_checksum_ok(p: &[u8], proto: u8) -> bool {
        let upper = &p[40..];
        let mut s: u64 = 0;
        let mut add = |b: &[u8]| {
            for c in b.chunks(2) {
                s += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
        };
        add(&p[8..40]);
        add(&(upper.len() as u32).to_be_bytes());
        add(&[0, 0, 0, proto]);
        add(upper);
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s == 0xffff
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn recv(sock: &UdpSocket) -> (Vec<u8>, std::net::SocketAddr) {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 70000];
        let (n, from) = sock.recv_from(&mut buf).expect("datagram within 5 s");
        buf.truncate(n);
        (buf, from)
    }

    fn event_fd_readable(e: &Engine) -> bool {
        let mut p = libc::pollfd {
            fd: e.event_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, alive for the call.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    fn in_private_netns(f: impl FnOnce() + Send + 'static) {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the engine tests need root (TUN devices); run cargo test as root"
        );
        std::thread::spawn(move || {
            // SAFETY: moves only this fresh thread (and what it spawns) into a new network
            // namespace, which the kernel deletes when its last user is gone.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            ip("link set lo up");
            f();
        })
        .join()
        .unwrap();
    }

    fn v4(s: &UdpSocket) -> SocketAddrV4 {
        match s.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn engine_end_to_end_in_a_namespace() {
        in_private_netns(|| {
            let cfg = Config {
                tun_name: Some("btmmt0".into()),
                tun_fd: None,
                listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                mtu: 1400,
                event_queue: 4,
                control_queue_bytes: DEFAULT_CONTROL_QUEUE_BYTES,
            };
            let e = Engine::new(cfg).expect("engine");
            assert_eq!(e.tun_name(), "btmmt0");
            ip("-6 addr add fd00::1/64 dev btmmt0 nodad");
            let me = e.local_addr();
            let remote = UdpSocket::bind("127.0.0.1:0").unwrap();
            let peer = inner("fd00::2");
            e.add_peer(peer, Some(v4(&remote))).unwrap();
            assert!(matches!(
                e.add_peer(peer, None),
                Err(EngineError::DataPlane { .. })
            ));
            e.install_rx_sa(peer, 0x200, &K2).unwrap();
            e.start().unwrap();
            e.start().unwrap();

            // Outbound without a transmit SA: NO_SA.
            let app = UdpSocket::bind("[fd00::1]:0").unwrap();
            app.send_to(b"early", "[fd00::2]:7777").unwrap();
            wait_for("no_sa drop", || {
                e.counters().drop_count(DropReason::NoSa) == 1
            });
            e.install_tx_sa(peer, 0x100, &K1, 1).unwrap();

            // Outbound: the remote end opens what the engine sealed.
            app.send_to(b"hello", "[fd00::2]:7777").unwrap();
            let (payload, from) = recv(&remote);
            assert_eq!(from, std::net::SocketAddr::V4(me));
            let mut rx = RxSa::new(0x100, &K1).unwrap();
            let pkt = rx.open(&payload).unwrap();
            assert_eq!(&pkt[8..24], &inner("fd00::1"));
            assert_eq!(&pkt[24..40], &peer);
            assert!(pkt.ends_with(b"hello"));
            // With TUN checksum offload the kernel leaves the UDP checksum to the engine.
            assert!(upper_checksum_ok(&pkt, 17), "outbound UDP checksum");
            wait_for("packets_out", || e.counters().packets_out == 1);
            assert_eq!(e.counters().bytes_out, pkt.len() as u64);

            // Inbound: the engine delivers an authenticated packet to the TUN.
            let listener = UdpSocket::bind("[fd00::1]:5555").unwrap();
            let tx = TxSa::new(0x200, &K2, 1).unwrap();
            let inner_pkt = udp6("fd00::2", "fd00::1", 1234, 5555, b"world");
            let sealed = tx.seal(&inner_pkt).unwrap();
            remote
                .send_to(&sealed, std::net::SocketAddr::V4(me))
                .unwrap();
            let (data, src) = recv(&listener);
            assert_eq!(data, b"world");
            assert_eq!(
                src,
                std::net::SocketAddr::V6(SocketAddrV6::new("fd00::2".parse().unwrap(), 1234, 0, 0))
            );
            // The socket can see the packet before the engine's write(2) returns and counts it.
            wait_for("packets_in", || e.counters().packets_in == 1);
            assert_eq!(e.counters().bytes_in, inner_pkt.len() as u64);

            // Replay, unknown SPI, source mismatch, bad ICV, too short, keepalive.
            remote
                .send_to(&sealed, std::net::SocketAddr::V4(me))
                .unwrap();
            let mut other = sealed.clone();
            other[..4].copy_from_slice(&0x999u32.to_be_bytes());
            remote
                .send_to(&other, std::net::SocketAddr::V4(me))
                .unwrap();
            let spoofed = tx.seal(&udp6("fd00::3", "fd00::1", 1, 5555, b"x")).unwrap();
            remote
                .send_to(&spoofed, std::net::SocketAddr::V4(me))
                .unwrap();
            let mut forged = tx.seal(&inner_pkt).unwrap();
            forged[30] ^= 1;
            remote
                .send_to(&forged, std::net::SocketAddr::V4(me))
                .unwrap();
            remote
                .send_to(&[1, 2, 3], std::net::SocketAddr::V4(me))
                .unwrap();
            remote
                .send_to(&[0xff], std::net::SocketAddr::V4(me))
                .unwrap();
            wait_for("drops", || {
                let c = e.counters();
                c.drop_count(DropReason::Replay) == 1
                    && c.drop_count(DropReason::UnknownSpi) == 1
                    && c.drop_count(DropReason::SourceMismatch) == 1
                    && c.drop_count(DropReason::Auth) == 1
                    && c.drop_count(DropReason::Malformed) == 1
                    && c.keepalives_in == 1
            });
            let ps = e.peers();
            assert_eq!(ps.len(), 1);
            assert_eq!(ps[0].tx_spi, Some(0x100));
            assert_eq!(ps[0].rx_spis, vec![0x200]);
            assert_eq!(ps[0].counters.drop_count(DropReason::Replay), 1);
            assert_eq!(ps[0].counters.drop_count(DropReason::UnknownSpi), 0);
            assert_eq!(e.counters().packets_in, 1);

            // Control packets become events; the event fd follows the queue.
            assert!(!event_fd_readable(&e));
            remote
                .send_to(b"\0\0\0\0hi", std::net::SocketAddr::V4(me))
                .unwrap();
            wait_for("control event", || event_fd_readable(&e));
            assert_eq!(
                e.drain(10),
                vec![Event::Control {
                    source: v4(&remote),
                    payload: b"hi".to_vec()
                }]
            );
            assert!(!event_fd_readable(&e));
            assert_eq!(e.counters().control_in, 1);

            // Roaming: the newest authenticated packet from a new address moves the endpoint.
            let roamed = UdpSocket::bind("127.0.0.1:0").unwrap();
            roamed
                .send_to(&tx.seal(&inner_pkt).unwrap(), std::net::SocketAddr::V4(me))
                .unwrap();
            recv(&listener);
            wait_for("roamed event", || event_fd_readable(&e));
            assert_eq!(
                e.drain(10),
                vec![Event::Roamed {
                    inner: peer,
                    old: Some(v4(&remote)),
                    new: v4(&roamed)
                }]
            );
            app.send_to(b"after roam", "[fd00::2]:7777").unwrap();
            let (payload, _) = recv(&roamed);
            assert!(rx.open(&payload).unwrap().ends_with(b"after roam"));
            // An older (but fresh) packet from the old address does not move it back.
            // Seq 3 was only seen forged (ICV failed), so it is still fresh.
            let old_seq = TxSa::new(0x200, &K2, 3).unwrap().seal(&inner_pkt).unwrap();
            remote
                .send_to(&old_seq, std::net::SocketAddr::V4(me))
                .unwrap();
            recv(&listener);
            assert_eq!(e.peers()[0].endpoint, Some(v4(&roamed)));
            assert!(e.drain(10).is_empty());

            // No route. The kernel's own router solicitations and MLD reports on the TUN also
            // have no route, so count from here on.
            let before = e.counters().drop_count(DropReason::NoRoute);
            app.send_to(b"nobody", "[fd00::9]:7777").unwrap();
            wait_for("no_route", || {
                e.counters().drop_count(DropReason::NoRoute) > before
            });
            assert_eq!(e.peers()[0].counters.drop_count(DropReason::NoRoute), 0);

            // Oversize: the TUN MTU raised behind the engine's back; the packet cannot be
            // sealed into one datagram and is dropped before it uses a sequence number.
            ip("link set btmmt0 mtu 65535");
            let malformed = e.counters().drop_count(DropReason::Malformed);
            let seq_before = e.peers()[0].counters.packets_out;
            app.send_to(&vec![7u8; 65480], "[fd00::2]:7777").unwrap();
            wait_for("oversize drop", || {
                e.counters().drop_count(DropReason::Malformed) == malformed + 1
            });
            assert_eq!(e.peers()[0].counters.packets_out, seq_before);
            ip("link set btmmt0 mtu 1400");

            // Exhaustion: the last sequence number goes out, then drops and one event.
            e.install_tx_sa(peer, 0x101, &K1, u128::from(u64::MAX))
                .unwrap();
            for _ in 0..3 {
                app.send_to(b"late", "[fd00::2]:7777").unwrap();
            }
            let (payload, _) = recv(&roamed);
            assert_eq!(&payload[..4], &0x101u32.to_be_bytes());
            assert_eq!(&payload[8..16], &u64::MAX.to_be_bytes());
            wait_for("sa_exhausted", || {
                e.counters().drop_count(DropReason::SaExhausted) == 2
            });
            assert_eq!(
                e.drain(10),
                vec![Event::Exhausted {
                    inner: peer,
                    spi: 0x101
                }]
            );

            // A full event queue drops control packets and counts them.
            for i in 0..6u8 {
                remote
                    .send_to(&[0, 0, 0, 0, i], std::net::SocketAddr::V4(me))
                    .unwrap();
            }
            wait_for("overflow", || e.counters().control_in == 7);
            assert_eq!(e.counters().drop_count(DropReason::ControlOverflow), 2);
            let evs = e.drain(2);
            assert_eq!(evs.len(), 2);
            assert!(event_fd_readable(&e), "events remain queued");
            assert_eq!(e.drain(100).len(), 2);
            assert!(!event_fd_readable(&e));

            // Send control and keepalive from the engine's socket.
            e.send_control(v4(&remote), b"ctl").unwrap();
            assert_eq!(recv(&remote).0, b"\0\0\0\0ctl");
            e.send_keepalive(peer).unwrap();
            assert_eq!(recv(&roamed).0, [0xff]);

            // Receive SAs: at most two; a third retires the oldest; SPIs are unique.
            e.install_rx_sa(peer, 0x201, &K2).unwrap();
            assert!(matches!(
                e.install_rx_sa(peer, 0x201, &K2),
                Err(EngineError::DataPlane { .. })
            ));
            e.install_rx_sa(peer, 0x202, &K2).unwrap();
            assert_eq!(e.peers()[0].rx_spis, vec![0x201, 0x202]);
            let unknown_before = e.counters().drop_count(DropReason::UnknownSpi);
            remote
                .send_to(&tx.seal(&inner_pkt).unwrap(), std::net::SocketAddr::V4(me))
                .unwrap();
            wait_for("retired SPI", || {
                e.counters().drop_count(DropReason::UnknownSpi) == unknown_before + 1
            });
            e.retire_rx_sa(peer, 0x201).unwrap();
            assert!(e.retire_rx_sa(peer, 0x201).is_err());
            assert!(matches!(
                e.install_tx_sa(peer, 1, &K1[..35], 1),
                Err(EngineError::Invalid(_))
            ));
            assert!(matches!(
                e.update_peer(inner("fd00::77"), None),
                Err(EngineError::UnknownPeer(_))
            ));

            e.remove_peer(peer).unwrap();
            assert!(matches!(
                e.remove_peer(peer),
                Err(EngineError::UnknownPeer(_))
            ));
            assert!(e.peers().is_empty());

            e.stop();
            e.stop();
            assert!(e.start().is_err());
            assert!(e.event_fd().is_err());
            assert!(e.send_control(v4(&remote), b"x").is_err());
        });
    }

    /// A TCP/IPv6 segment with a correct checksum.
    #[allow(clippy::too_many_arguments)]
    fn tcp6(
        src: &str,
        dst: &str,
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        data: &[u8],
    ) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[6, 64]);
        p.extend_from_slice(&inner(src));
        p.extend_from_slice(&inner(dst));
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ack.to_be_bytes());
        p.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(data);
        let mut s: u64 = 0;
        let mut add = |b: &[u8]| {
            for c in b.chunks(2) {
                s += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
        };
        add(&p[8..40]);
        add(&((20 + data.len()) as u32).to_be_bytes());
        add(&[0, 0, 0, 6]);
        add(&p[40..]);
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        let c = !(s as u16);
        p[56..58].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn tcp_segments_of_a_batch_reach_the_stack_as_one_write() {
        in_private_netns(|| {
            let tun = Tun::open("btmmg0", 1500).unwrap();
            assert!(
                tun.vnet(),
                "needs the TUN offloads (unset BTMM_TUN_OFFLOAD=0)"
            );
            ip("-6 addr add fd00::1/64 dev btmmg0 nodad");
            let listener = std::net::TcpListener::bind("[fd00::1]:6000").unwrap();
            let write_raw = |pkt: &[u8]| {
                let mut b = vec![0u8; VNET_HDR_LEN];
                b.extend_from_slice(pkt);
                // SAFETY: writes `b` to the TUN descriptor owned by `tun`.
                assert_eq!(
                    unsafe { libc::write(tun.fd(), b.as_ptr().cast(), b.len()) },
                    b.len() as isize
                );
            };
            // The SYN-ACK (skipping the kernel's own router solicitations and MLD reports). The
            // SYN is repeated: a device that has just come up may drop the first packets.
            let syn = tcp6("fd00::2", "fd00::1", 40000, 6000, 1000, 0, 0x02, &[]);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut next_syn = Instant::now();
            let server_isn = loop {
                assert!(Instant::now() < deadline, "no SYN-ACK");
                if Instant::now() >= next_syn {
                    write_raw(&syn);
                    next_syn = Instant::now() + Duration::from_millis(200);
                }
                let mut buf = vec![0u8; 70000];
                let mut p = libc::pollfd {
                    fd: tun.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd; then a read into `buf`, both alive for the calls.
                let n = unsafe {
                    libc::poll(&mut p, 1, 100);
                    libc::read(tun.fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n < (VNET_HDR_LEN + 60) as isize {
                    continue;
                }
                let pkt = &buf[VNET_HDR_LEN..n as usize];
                if pkt[6] == 6 && pkt[40 + 13] == 0x12 {
                    break u32::from_be_bytes([pkt[44], pkt[45], pkt[46], pkt[47]]);
                }
            };
            // The rest of the connection goes through write_coalesced, from one receive batch
            // (datagrams carry the inner packet behind 16 bytes, like an opened ESP payload).
            let data: Vec<u8> = (0..8000u32).map(|i| (i * 13 % 256) as u8).collect();
            let mut inners = vec![tcp6(
                "fd00::2",
                "fd00::1",
                40000,
                6000,
                1001,
                server_isn + 1,
                0x10,
                &[],
            )];
            for (k, chunk) in data.chunks(1000).enumerate() {
                let flags = if k == 7 { 0x18 } else { 0x10 };
                let seq = 1001 + (k * 1000) as u32;
                inners.push(tcp6(
                    "fd00::2",
                    "fd00::1",
                    40000,
                    6000,
                    seq,
                    server_isn + 1,
                    flags,
                    chunk,
                ));
            }
            let rx = Udp::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            for p in &inners {
                tx.send_to(
                    &[&[0u8; 16][..], p].concat(),
                    std::net::SocketAddr::V4(rx.local_addr().unwrap()),
                )
                .unwrap();
            }
            let mut batch = RecvBatch::new(BATCH, RX_SLOT);
            assert_eq!(
                batch.recv(rx.fd()).unwrap(),
                inners.len(),
                "loopback delivers synchronously"
            );
            let peer = Arc::new(Peer {
                inner: inner("fd00::2"),
                endpoint: AtomicU64::new(0),
                counters: Counters::default(),
            });
            let deliver: Vec<_> = (0..inners.len())
                .map(|i| (i, 16..batch.payload(i).len(), Arc::clone(&peer)))
                .collect();
            let mut iovs = Vec::new();
            let mut tally = Tally::default();
            let writes = write_coalesced(tun.fd(), &mut batch, &deliver, &mut iovs, &mut tally);
            // The pure ACK alone, then the eight data segments as one super packet.
            assert_eq!(writes, 2);
            assert_eq!(tally.packets_in, 9);
            assert_eq!(
                tally.bytes_in,
                inners.iter().map(|p| p.len() as u64).sum::<u64>()
            );
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = vec![0u8; data.len()];
            std::io::Read::read_exact(&mut conn, &mut got).unwrap();
            assert_eq!(got, data);
        });
    }

    #[test]
    fn bad_config_is_refused() {
        let base = || Config {
            tun_name: Some("btmmx0".into()),
            tun_fd: None,
            listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            mtu: 1400,
            event_queue: 8,
            control_queue_bytes: DEFAULT_CONTROL_QUEUE_BYTES,
        };
        assert!(matches!(
            Engine::new(Config {
                mtu: 1000,
                ..base()
            }),
            Err(EngineError::Invalid(_))
        ));
        assert!(matches!(
            Engine::new(Config {
                mtu: 65471,
                ..base()
            }),
            Err(EngineError::Invalid(_))
        ));
        assert!(matches!(
            Engine::new(Config {
                event_queue: 0,
                ..base()
            }),
            Err(EngineError::Invalid(_))
        ));
        assert!(matches!(
            Engine::new(Config {
                control_queue_bytes: MAX_CONTROL_MESSAGE - 1,
                ..base()
            }),
            Err(EngineError::Invalid(_))
        ));
        assert!(matches!(
            Engine::new(Config {
                tun_name: None,
                ..base()
            }),
            Err(EngineError::Invalid(_))
        ));
    }

    #[test]
    fn control_queue_is_bounded_in_bytes_and_oversize_messages_are_dropped() {
        in_private_netns(|| {
            let e = Engine::new(Config {
                tun_name: Some("btmmq0".into()),
                tun_fd: None,
                listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                mtu: 1400,
                event_queue: 4096,
                control_queue_bytes: 4 * MAX_CONTROL_MESSAGE,
            })
            .expect("engine");
            let me = std::net::SocketAddr::V4(e.local_addr());
            let remote = UdpSocket::bind("127.0.0.1:0").unwrap();
            e.start().unwrap();
            let msg = |fill: u8, len: usize| {
                let mut m = vec![0u8; 4 + len];
                m[4..].fill(fill);
                m
            };
            // One byte over the limit: counted and dropped, never queued.
            remote
                .send_to(&msg(9, MAX_CONTROL_MESSAGE + 1), me)
                .unwrap();
            // Five of the largest allowed into a budget of four: the fifth overflows although
            // the queue has room for 4096 events.
            for i in 0..5u8 {
                remote.send_to(&msg(i, MAX_CONTROL_MESSAGE), me).unwrap();
            }
            wait_for("control", || e.counters().control_in == 6);
            let c = e.counters();
            assert_eq!(c.drop_count(DropReason::ControlOversize), 1);
            assert_eq!(c.drop_count(DropReason::ControlOverflow), 1);
            let evs = e.drain(100);
            let fills: Vec<u8> = evs
                .iter()
                .map(|ev| match ev {
                    Event::Control { payload, .. } => {
                        assert_eq!(payload.len(), MAX_CONTROL_MESSAGE);
                        payload[0]
                    }
                    other => panic!("unexpected event {other:?}"),
                })
                .collect();
            assert_eq!(fills, vec![0, 1, 2, 3]);
            // Draining gave the bytes back: four more fit.
            for i in 0..4u8 {
                remote
                    .send_to(&msg(10 + i, MAX_CONTROL_MESSAGE), me)
                    .unwrap();
            }
            wait_for("refill", || e.counters().control_in == 10);
            assert_eq!(e.drain(100).len(), 4);
            assert_eq!(e.counters().drop_count(DropReason::ControlOverflow), 1);
            e.stop();
        });
    }

    #[test]
    fn endpoint_packing() {
        for ep in [
            None,
            Some(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            Some("203.0.113.7:4500".parse().unwrap()),
        ] {
            assert_eq!(unpack(pack(ep)), ep);
        }
    }
}

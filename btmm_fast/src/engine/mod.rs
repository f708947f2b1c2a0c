//! The engine: a TUN device and a UDP socket joined by two threads.
//!
//! TX thread (tx.rs): TUN -> (finish checksums, cut TCP super packets) -> route by inner
//! destination -> ESP seal (in place) -> sendmmsg, with UDP GSO for runs to one endpoint.
//! RX thread (rx.rs): recvmmsg -> the per-datagram decision (`rx::rx_classify`) -> ESP open (in
//! place) -> checks -> TUN, merging in-order TCP segments into one write when the TUN takes
//! virtio headers (offload.rs). This module holds the shared state and the control plane's
//! calls.
//!
//! Wire format and drop rules are those of btmm_core/dataplane/api.py (RFC 4303, 4106, 3948);
//! the offloads only change how packets cross the TUN, never what goes on the wire or what the
//! counters count (one inner packet at a time).
//!
//! Shared state is split so the two threads never wait for each other: the peer table (routes
//! and transmit SAs) is locked by the TX thread once per batch, the SPI table (receive SAs and
//! their replay windows) by the RX thread once per batch; the control plane takes both briefly.
//! Endpoints (a sequence lock over atomics, endpoint.rs) and counters are atomics, so roaming (RX) is seen by TX without a lock.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

use crate::endpoint::{AtomicEndpoint, Endpoint};
use crate::error::EngineError;
use crate::esp::{
    self, DropReason, RxSa, TxSa, CONTROL_MARKER, HEADER_LEN, KEEPALIVE, MAX_TRAILER,
};
use crate::stun;
use crate::tun::Tun;
use crate::udp::{Udp, MAX_UDP_PAYLOAD};

#[doc(hidden)]
pub mod fuzzing;
mod hold;
mod rx;
#[cfg(test)]
mod tests;
mod tx;

pub use hold::{icmp6_unreachable, HOLD_SLOTS};
use rx::rx_loop;
use tx::tx_loop;

/// Packets handled per batch by each thread.
pub const BATCH: usize = 64;
/// Largest IP packet a TUN read can return, and largest UDP datagram received.
const MAX_PACKET: usize = 65535;
/// Room for one TUN read: a 64 KiB packet (or TCP super packet) and its virtio header.
const MAX_READ: usize = MAX_PACKET + 1 + 256;
const TX_SLOT: usize = HEADER_LEN + MAX_READ + MAX_TRAILER + 3;
const RX_SLOT: usize = MAX_PACKET + 1;
/// Receive SAs per peer: the current one and the previous (make-before-break rekey).
pub const MAX_RX_SAS: usize = 2;
/// Largest control message (after the non-ESP marker), and largest STUN message, handed to or
/// sent by the control plane; a handshake message is under 200 bytes and a STUN Binding
/// exchange under 100, anything longer is dropped as `control_oversize` (refused when sent).
pub const MAX_CONTROL_MESSAGE: usize = 1024;
/// Default bound of the control messages queued for the control plane, in payload bytes.
pub const DEFAULT_CONTROL_QUEUE_BYTES: usize = 4 << 20;
/// Counter slots, indexed by `DropReason as usize` (slot 0 unused).
const DROP_SLOTS: usize = DropReason::ALL.len() + 1;

pub type Inner = [u8; 16];

pub struct Config {
    pub tun_name: Option<String>,
    pub tun_fd: Option<RawFd>,
    pub listen: Endpoint,
    pub mtu: u32,
    pub event_queue: usize,
    /// Bound of the queued control and STUN messages' payload bytes (they are
    /// unauthenticated).
    pub control_queue_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Control {
        source: Endpoint,
        payload: Vec<u8>,
    },
    /// A STUN message (RFC 8489), the whole datagram.
    Stun {
        source: Endpoint,
        payload: Vec<u8>,
    },
    Roamed {
        inner: Inner,
        old: Option<Endpoint>,
        new: Endpoint,
    },
    Exhausted {
        inner: Inner,
        spi: u32,
    },
    /// A packet was held for a peer without a transmit SA: open its tunnel (hold.rs).
    Wanted {
        inner: Inner,
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

struct Peer {
    inner: Inner,
    /// Read by TX for every packet, moved by RX (roaming) and the control plane.
    endpoint: AtomicEndpoint,
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
    /// Packets waiting for the transmit SA (hold.rs).
    hold: hold::HoldRing,
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
    /// The TUN MTU: the largest packet held for a peer (hold.rs).
    mtu: usize,
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

/// Events for the control plane and the payload bytes of the control and STUN messages among
/// them (both unauthenticated, so bounded together).
#[derive(Default)]
struct EventQueue {
    queue: VecDeque<Event>,
    control_bytes: usize,
}

fn control_bytes(ev: &Event) -> usize {
    match ev {
        Event::Control { payload, .. } | Event::Stun { payload, .. } => payload.len(),
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
    pub endpoint: Option<Endpoint>,
    pub tx_spi: Option<u32>,
    pub rx_spis: Vec<u32>,
    pub counters: CounterSnapshot,
    /// Packets held while the tunnel opens.
    pub held: usize,
}

pub struct Engine {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicBool,
    tun_name: String,
    local: Endpoint,
    vnet: bool,
}

fn fmt_inner(inner: &Inner) -> String {
    std::net::Ipv6Addr::from(*inner).to_string()
}

impl Engine {
    pub fn new(cfg: Config) -> Result<Engine, EngineError> {
        if cfg.mtu < 1280 || esp::sealed_len(cfg.mtu as usize) > MAX_UDP_PAYLOAD {
            return Err(EngineError::config(
                format!("mtu {} is out of range", cfg.mtu),
                "IPv6 needs at least 1280 and ESP in UDP allows at most 65470",
            ));
        }
        if cfg.event_queue == 0 {
            return Err(EngineError::config(
                "event_queue 0 must be at least 1",
                "the default (4096) suits every use",
            ));
        }
        if cfg.control_queue_bytes < MAX_CONTROL_MESSAGE {
            return Err(EngineError::config(
                format!(
                    "control_queue_bytes {} must be at least {MAX_CONTROL_MESSAGE} (one control \
                     message)",
                    cfg.control_queue_bytes
                ),
                format!("the default ({DEFAULT_CONTROL_QUEUE_BYTES}) suits every use"),
            ));
        }
        let tun = match (cfg.tun_fd, cfg.tun_name.as_deref()) {
            (Some(fd), _) => Tun::attach(fd)?,
            (None, Some(name)) => Tun::open(name, cfg.mtu)?,
            (None, None) => {
                return Err(EngineError::config(
                    "the engine needs a TUN device",
                    "set EngineConfig.tun_name or tun_fd",
                ))
            }
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
                what: format!(
                    "cannot bind UDP {}: {e}",
                    crate::endpoint::display(cfg.listen)
                ),
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
            mtu: cfg.mtu as usize,
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

    pub fn local_addr(&self) -> Endpoint {
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

    pub fn add_peer(&self, inner: Inner, endpoint: Option<Endpoint>) -> Result<(), EngineError> {
        let mut peers = lock(&self.shared.peers);
        if peers.contains_key(&inner) {
            return Err(EngineError::data_plane(format!(
                "peer {} already exists; use update_peer to change its endpoint",
                fmt_inner(&inner)
            )));
        }
        let peer = Arc::new(Peer {
            inner,
            endpoint: AtomicEndpoint::new(endpoint),
            counters: Counters::default(),
        });
        peers.insert(
            inner,
            PeerEntry {
                peer,
                tx: None,
                rx_spis: VecDeque::new(),
                hold: hold::HoldRing::default(),
            },
        );
        Ok(())
    }

    fn unknown(inner: &Inner) -> EngineError {
        EngineError::UnknownPeer(format!("no peer with inner address {}", fmt_inner(inner)))
    }

    pub fn update_peer(&self, inner: Inner, endpoint: Option<Endpoint>) -> Result<(), EngineError> {
        let peers = lock(&self.shared.peers);
        let e = peers.get(&inner).ok_or_else(|| Self::unknown(&inner))?;
        e.peer.endpoint.store(endpoint);
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
        self.send_held(e);
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

    fn send_raw(&self, buf: &[u8], dst: Endpoint) -> Result<(), EngineError> {
        let fds = self.shared.fds.read().unwrap_or_else(|e| e.into_inner());
        let f = fds.as_ref().ok_or_else(Self::stopped)?;
        f.udp.send_to(buf, dst, 1000).map_err(|e| {
            let to = crate::endpoint::display(dst);
            EngineError::io(&format!("cannot send to {to}"), &e)
        })
    }

    pub fn send_control(&self, dst: Endpoint, message: &[u8]) -> Result<(), EngineError> {
        let mut buf = Vec::with_capacity(CONTROL_MARKER.len() + message.len());
        buf.extend_from_slice(&CONTROL_MARKER);
        buf.extend_from_slice(message);
        self.send_raw(&buf, dst)
    }

    /// Sends one STUN message as it is (no marker), so that its answer tells this socket's
    /// reflexive address. Anything that does not have STUN's shape, or is longer than
    /// `MAX_CONTROL_MESSAGE`, is refused: the engine must not become a sender of arbitrary
    /// datagrams.
    pub fn send_stun(&self, dst: Endpoint, message: &[u8]) -> Result<(), EngineError> {
        if !stun::looks_like_stun(message) {
            return Err(EngineError::Invalid(format!(
                "send_stun refuses a {}-byte message that is not a STUN message (RFC 8489 \
                 header with the magic cookie and a length field matching its size)",
                message.len()
            )));
        }
        if message.len() > MAX_CONTROL_MESSAGE {
            return Err(EngineError::Invalid(format!(
                "send_stun refuses a {}-byte STUN message; at most {MAX_CONTROL_MESSAGE}",
                message.len()
            )));
        }
        self.send_raw(message, dst)
    }

    pub fn send_keepalive(&self, inner: Inner) -> Result<(), EngineError> {
        let ep = {
            let peers = lock(&self.shared.peers);
            let e = peers.get(&inner).ok_or_else(|| Self::unknown(&inner))?;
            e.peer.endpoint.load()
        };
        let dst = ep.ok_or_else(|| {
            EngineError::data_plane(format!(
                "peer {} has no endpoint to send a keepalive to",
                fmt_inner(&inner)
            ))
        })?;
        self.send_raw(&KEEPALIVE, dst)
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
                endpoint: e.peer.endpoint.load(),
                tx_spi: e.tx.as_ref().map(|t| t.sa.spi()),
                rx_spis: e.rx_spis.iter().copied().collect(),
                counters: e.peer.counters.snapshot(),
                held: e.hold.len(),
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

//! Engine tests against real TUN devices and sockets, each in a private network namespace
//! (they need root).

use super::rx::write_coalesced;
use super::*;
use crate::endpoint::AtomicEndpoint;
use crate::offload::VNET_HDR_LEN;
use crate::udp::RecvBatch;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6, UdpSocket};
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

/// A control message as it travels: the non-ESP marker, then the message.
fn control(message: &[u8]) -> Vec<u8> {
    [&CONTROL_MARKER[..], message].concat()
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

/// The engine's form of a std socket's address (IPv4 v4-mapped).
fn v4(s: &UdpSocket) -> Endpoint {
    let a = s.local_addr().unwrap();
    crate::endpoint::from_ip(a.ip(), a.port())
}

fn localhost(port: u16) -> Endpoint {
    crate::endpoint::from_ip(Ipv4Addr::LOCALHOST.into(), port)
}

#[test]
fn engine_end_to_end_in_a_namespace() {
    in_private_netns(|| {
        let cfg = Config {
            tun_name: Some("btmmt0".into()),
            tun_fd: None,
            listen: localhost(0),
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

        // Outbound without a transmit SA: held (hold.rs), and the control plane asked once.
        let app = UdpSocket::bind("[fd00::1]:0").unwrap();
        app.send_to(b"early", "[fd00::2]:7777").unwrap();
        wait_for("held packet", || e.held(peer).unwrap() == 1);
        assert_eq!(e.drain(16), vec![Event::Wanted { inner: peer }]);
        assert_eq!(e.counters().drop_count(DropReason::NoSa), 0);
        e.install_tx_sa(peer, 0x100, &K1, 1).unwrap();
        assert_eq!(e.held(peer).unwrap(), 0);
        // The held packet left as the SA went in, first.
        let mut rx = RxSa::new(0x100, &K1).unwrap();
        let (payload, _) = recv(&remote);
        assert!(rx.open(&payload).unwrap().ends_with(b"early"));

        // Outbound: the remote end opens what the engine sealed.
        app.send_to(b"hello", "[fd00::2]:7777").unwrap();
        let (payload, from) = recv(&remote);
        assert_eq!(from, crate::endpoint::display(me));
        let pkt = rx.open(&payload).unwrap();
        assert_eq!(&pkt[8..24], &inner("fd00::1"));
        assert_eq!(&pkt[24..40], &peer);
        assert!(pkt.ends_with(b"hello"));
        // With TUN checksum offload the kernel leaves the UDP checksum to the engine.
        assert!(upper_checksum_ok(&pkt, 17), "outbound UDP checksum");
        wait_for("packets_out", || e.counters().packets_out == 2);
        assert_eq!(e.counters().bytes_out, 2 * pkt.len() as u64);

        // Inbound: the engine delivers an authenticated packet to the TUN.
        let listener = UdpSocket::bind("[fd00::1]:5555").unwrap();
        let tx = TxSa::new(0x200, &K2, 1).unwrap();
        let inner_pkt = udp6("fd00::2", "fd00::1", 1234, 5555, b"world");
        let sealed = tx.seal(&inner_pkt).unwrap();
        remote
            .send_to(&sealed, crate::endpoint::display(me))
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
            .send_to(&sealed, crate::endpoint::display(me))
            .unwrap();
        let mut other = sealed.clone();
        other[..4].copy_from_slice(&0x999u32.to_be_bytes());
        remote
            .send_to(&other, crate::endpoint::display(me))
            .unwrap();
        let spoofed = tx.seal(&udp6("fd00::3", "fd00::1", 1, 5555, b"x")).unwrap();
        remote
            .send_to(&spoofed, crate::endpoint::display(me))
            .unwrap();
        let mut forged = tx.seal(&inner_pkt).unwrap();
        forged[30] ^= 1;
        remote
            .send_to(&forged, crate::endpoint::display(me))
            .unwrap();
        remote
            .send_to(&[1, 2, 3], crate::endpoint::display(me))
            .unwrap();
        remote
            .send_to(&KEEPALIVE, crate::endpoint::display(me))
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
            .send_to(&control(b"hi"), crate::endpoint::display(me))
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
            .send_to(&tx.seal(&inner_pkt).unwrap(), crate::endpoint::display(me))
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
            .send_to(&old_seq, crate::endpoint::display(me))
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
                .send_to(&control(&[i]), crate::endpoint::display(me))
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
        assert_eq!(recv(&remote).0, control(b"ctl"));
        e.send_keepalive(peer).unwrap();
        assert_eq!(recv(&roamed).0, KEEPALIVE);

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
            .send_to(&tx.seal(&inner_pkt).unwrap(), crate::endpoint::display(me))
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
        let rx = Udp::bind(localhost(0)).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for p in &inners {
            tx.send_to(
                &[&[0u8; 16][..], p].concat(),
                crate::endpoint::display(rx.local_addr().unwrap()),
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
            endpoint: AtomicEndpoint::new(None),
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
        listen: localhost(0),
        mtu: 1400,
        event_queue: 8,
        control_queue_bytes: DEFAULT_CONTROL_QUEUE_BYTES,
    };
    assert!(matches!(
        Engine::new(Config {
            mtu: 1000,
            ..base()
        }),
        Err(EngineError::Config { .. })
    ));
    assert!(matches!(
        Engine::new(Config {
            mtu: 65471,
            ..base()
        }),
        Err(EngineError::Config { .. })
    ));
    assert!(matches!(
        Engine::new(Config {
            event_queue: 0,
            ..base()
        }),
        Err(EngineError::Config { .. })
    ));
    assert!(matches!(
        Engine::new(Config {
            control_queue_bytes: MAX_CONTROL_MESSAGE - 1,
            ..base()
        }),
        Err(EngineError::Config { .. })
    ));
    assert!(matches!(
        Engine::new(Config {
            tun_name: None,
            ..base()
        }),
        Err(EngineError::Config { .. })
    ));
}

#[test]
fn control_queue_is_bounded_in_bytes_and_oversize_messages_are_dropped() {
    in_private_netns(|| {
        let e = Engine::new(Config {
            tun_name: Some("btmmq0".into()),
            tun_fd: None,
            listen: localhost(0),
            mtu: 1400,
            event_queue: 4096,
            control_queue_bytes: 4 * MAX_CONTROL_MESSAGE,
        })
        .expect("engine");
        let me = crate::endpoint::display(e.local_addr());
        let remote = UdpSocket::bind("127.0.0.1:0").unwrap();
        e.start().unwrap();
        let msg = |fill: u8, len: usize| control(&vec![fill; len]);
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

/// A STUN Binding message (RFC 8489 §5) of type `kind` with `attrs` bytes of attributes.
fn stun_message(kind: u16, attrs: usize) -> Vec<u8> {
    let mut m = kind.to_be_bytes().to_vec();
    m.extend_from_slice(&(attrs as u16).to_be_bytes());
    m.extend_from_slice(&crate::stun::MAGIC_COOKIE);
    m.extend_from_slice(&[0x3c; 12]);
    m.extend(std::iter::repeat_n(0x22u8, attrs));
    m
}

#[test]
fn stun_travels_raw_from_and_to_the_engine_socket() {
    in_private_netns(|| {
        let e = Engine::new(Config {
            tun_name: Some("btmms0".into()),
            tun_fd: None,
            listen: localhost(0),
            mtu: 1400,
            event_queue: 4096,
            control_queue_bytes: 2 * MAX_CONTROL_MESSAGE,
        })
        .expect("engine");
        let me = crate::endpoint::display(e.local_addr());
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        e.start().unwrap();

        // Out: the request leaves as it is, from the engine's port.
        let request = stun_message(0x0001, 8);
        e.send_stun(v4(&server), &request).unwrap();
        let (got, from) = recv(&server);
        assert_eq!((got, from), (request, me));
        // Anything else is refused, so the engine sends no arbitrary datagrams.
        for bad in [
            b"hello".to_vec(),
            control(b"x"),
            stun_message(0x0001, 8)[..27].to_vec(),
            stun_message(0x0101, MAX_CONTROL_MESSAGE - 16),
        ] {
            assert!(matches!(
                e.send_stun(v4(&server), &bad),
                Err(EngineError::Invalid(_))
            ));
        }

        // In: the answer comes out whole, with its source; STUN shares the control budget.
        let answer = stun_message(0x0101, 12);
        server.send_to(&answer, me).unwrap();
        server
            .send_to(&stun_message(0x0101, MAX_CONTROL_MESSAGE - 16), me)
            .unwrap();
        server
            .send_to(&control(&[1; MAX_CONTROL_MESSAGE]), me)
            .unwrap();
        server
            .send_to(&control(&[2; MAX_CONTROL_MESSAGE]), me)
            .unwrap();
        wait_for("stun and control", || e.counters().control_in == 4);
        let c = e.counters();
        assert_eq!(c.drop_count(DropReason::ControlOversize), 1);
        assert_eq!(c.drop_count(DropReason::ControlOverflow), 1);
        let evs = e.drain(10);
        assert_eq!(
            evs[0],
            Event::Stun {
                source: v4(&server),
                payload: answer
            }
        );
        assert!(matches!(&evs[1], Event::Control { payload, .. } if payload[0] == 1));
        assert_eq!(evs.len(), 2);
        e.stop();
        assert!(e.send_stun(v4(&server), &stun_message(1, 0)).is_err());
    });
}

#[test]
fn held_packets_overflow_are_rejected_with_icmp_and_reopen_after_clear() {
    in_private_netns(|| {
        let e = Engine::new(Config {
            tun_name: Some("btmmh0".into()),
            tun_fd: None,
            listen: localhost(0),
            mtu: 1400,
            event_queue: 4096,
            control_queue_bytes: DEFAULT_CONTROL_QUEUE_BYTES,
        })
        .expect("engine");
        ip("-6 addr add fd00::1/64 dev btmmh0 nodad");
        let remote = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = inner("fd00::2");
        e.add_peer(peer, Some(v4(&remote))).unwrap();
        e.start().unwrap();

        // 20 packets to a peer without an SA: 16 held, the 4 oldest pushed out, one event.
        let app = UdpSocket::bind("[fd00::1]:0").unwrap();
        app.connect("[fd00::2]:7777").unwrap();
        for i in 0..20u8 {
            app.send(&[i; 8]).unwrap();
        }
        wait_for("16 held, 4 pushed out", || {
            e.held(peer).unwrap() == HOLD_SLOTS
                && e.counters().drop_count(DropReason::HoldOverflow) == 4
        });
        assert_eq!(e.drain(64), vec![Event::Wanted { inner: peer }]);
        assert_eq!(
            e.peers()[0].counters.drop_count(DropReason::HoldOverflow),
            4
        );

        // The handshake failed: each held packet is answered with ICMPv6 address
        // unreachable, which the kernel hands a socket that asks for errors
        // (IPV6_RECVERR, as ping does) as EHOSTUNREACH.
        let on: libc::c_int = 1;
        // SAFETY: sets an int option on an open socket from a local int.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&app),
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVERR,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        assert_eq!(e.reject_held(peer).unwrap(), HOLD_SLOTS);
        assert_eq!(e.held(peer).unwrap(), 0);
        app.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let err = app.recv(&mut [0u8; 64]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "{err}");

        // The next packet asks again; the SA sends it; clear_tx_sa makes the peer idle.
        app.send(b"again").unwrap();
        wait_for("held again", || e.held(peer).unwrap() == 1);
        assert_eq!(e.drain(64), vec![Event::Wanted { inner: peer }]);
        e.install_tx_sa(peer, 0x300, &K1, 1).unwrap();
        let mut rx = RxSa::new(0x300, &K1).unwrap();
        let (payload, _) = recv(&remote);
        assert!(rx.open(&payload).unwrap().ends_with(b"again"));
        e.clear_tx_sa(peer).unwrap();
        assert_eq!(e.peers()[0].tx_spi, None);
        app.send(b"idle").unwrap();
        wait_for("held after clear", || e.held(peer).unwrap() == 1);
        assert_eq!(e.drain(64), vec![Event::Wanted { inner: peer }]);
        assert!(matches!(
            e.reject_held(inner("fd00::9")),
            Err(EngineError::UnknownPeer(_))
        ));
        e.stop();
    });
}

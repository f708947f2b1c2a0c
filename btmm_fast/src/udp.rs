//! The engine's UDP socket: one dual-stack IPv6 socket (IPV6_V6ONLY off, RFC 3493 §5.3) that
//! carries IPv4 peers as v4-mapped addresses (::ffff:a.b.c.d, RFC 4291 §2.5.5.2) and IPv6 peers
//! as themselves, so every address in the engine is one `SocketAddrV6`. Batched receive with recvmmsg(2), batched send with
//! sendmmsg(2), and UDP generic segmentation offload (the UDP_SEGMENT control message, Linux
//! 4.18+) for runs of equal-size datagrams to one destination, with a fallback to one datagram
//! per message when the kernel or the route refuses it.

use std::io;
use std::mem;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The kernel's limit on segments per GSO send (UDP_MAX_SEGMENTS in older kernels).
const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload of one datagram over IPv4 (65535 - 20 - 8), and so of one GSO send
/// (also kept for IPv6, whose limit is 20 bytes higher, so that both families batch alike).
pub const MAX_UDP_PAYLOAD: usize = 65507;
/// Socket buffers large enough to absorb a few batches at line rate.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

pub fn to_sockaddr(a: SocketAddrV6) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: a.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: a.ip().octets(),
        },
        sin6_scope_id: a.scope_id(),
    }
}

/// The source of a datagram. The socket is AF_INET6, so the kernel always fills a
/// sockaddr_in6 (IPv4 sources v4-mapped). The scope id is kept only for link-local sources.
pub fn from_sockaddr(s: &libc::sockaddr_in6) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::from(s.sin6_addr.s6_addr),
        u16::from_be(s.sin6_port),
        0,
        s.sin6_scope_id,
    )
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a c_int that lives for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub struct Udp {
    fd: OwnedFd,
    gso: AtomicBool,
}

impl Udp {
    /// Binds `addr`: `[::]` takes both families, a v4-mapped address only that IPv4 address,
    /// any other IPv6 address only itself.
    pub fn bind(addr: SocketAddrV6) -> io::Result<Udp> {
        // SAFETY: socket(2) with constant arguments.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET6,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        for (force, plain) in [
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        ] {
            // The FORCE variants ignore net.core.*mem_max but need CAP_NET_ADMIN; without it the
            // plain option still gets as much as the sysctl allows.
            if setsockopt_int(raw, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        // Dual stack whatever net.ipv6.bindv6only says: IPv4 peers arrive v4-mapped.
        setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
        let sa = to_sockaddr(addr);
        // SAFETY: `sa` is a valid sockaddr_in6 of the size passed.
        let r = unsafe {
            libc::bind(
                raw,
                (&sa as *const libc::sockaddr_in6).cast(),
                mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Udp {
            fd,
            gso: AtomicBool::new(true),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddrV6> {
        // SAFETY: zeroed sockaddr_in6 is a valid value; getsockname writes at most `len` bytes.
        let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: pointers to `sa` and `len`, both alive for the call.
        if unsafe {
            libc::getsockname(
                self.fd(),
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(from_sockaddr(&sa))
    }

    pub fn gso_enabled(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    pub fn disable_gso(&self) {
        self.gso.store(false, Ordering::Relaxed);
    }

    /// One datagram, waiting up to `timeout_ms` for buffer space (control-plane sends only).
    pub fn send_to(&self, buf: &[u8], dst: SocketAddrV6, timeout_ms: i32) -> io::Result<()> {
        let sa = to_sockaddr(dst);
        loop {
            // SAFETY: `buf` and `sa` are valid for the lengths passed.
            let r = unsafe {
                libc::sendto(
                    self.fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            };
            if r >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    if !wait_writable(self.fd(), timeout_ms) {
                        return Err(err);
                    }
                }
                _ => return Err(err),
            }
        }
    }
}

/// Polls for POLLOUT; false on timeout.
pub fn wait_writable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd, alive for the call.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

/// Preallocated state for receiving up to `n` datagrams per call.
pub struct RecvBatch {
    slot: usize,
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in6>,
    msgs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers inside point only into this struct's own heap buffers, which move
// with it; it is used by one thread at a time.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(n: usize, slot: usize) -> RecvBatch {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let zero_addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let zero_msg: libc::mmsghdr = unsafe { mem::zeroed() };
        let mut b = RecvBatch {
            slot,
            bufs: vec![0u8; n * slot],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                n
            ],
            addrs: vec![zero_addr; n],
            msgs: vec![zero_msg; n],
        };
        for i in 0..n {
            b.iovs[i] = libc::iovec {
                // SAFETY: i * slot is inside `bufs` (n * slot bytes).
                iov_base: unsafe { b.bufs.as_mut_ptr().add(i * slot) }.cast(),
                iov_len: slot,
            };
        }
        b
    }

    pub fn capacity(&self) -> usize {
        self.msgs.len()
    }

    /// Nonblocking recvmmsg; returns how many datagrams arrived (0 when none).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.msgs.len();
        for i in 0..n {
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.msgs[i].msg_len = 0;
        }
        loop {
            // SAFETY: `msgs` holds n headers whose name/iov pointers point into this struct's
            // buffers, sized as declared.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.msgs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(err),
            }
        }
    }

    /// Payload of datagram `i` of the last `recv`.
    pub fn payload(&self, i: usize) -> &[u8] {
        let len = (self.msgs[i].msg_len as usize).min(self.slot);
        &self.bufs[i * self.slot..i * self.slot + len]
    }

    /// Datagram `i` of the last `recv`: (payload, source, truncated).
    pub fn get_mut(&mut self, i: usize) -> (&mut [u8], SocketAddrV6, bool) {
        let len = (self.msgs[i].msg_len as usize).min(self.slot);
        let trunc = self.msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let src = from_sockaddr(&self.addrs[i]);
        let start = i * self.slot;
        (&mut self.bufs[start..start + len], src, trunc)
    }
}

/// One datagram queued for sending: a region of the caller's buffer and a destination.
#[derive(Clone, Copy)]
pub struct Outgoing {
    pub ptr: *const u8,
    pub len: usize,
    pub dst: SocketAddrV6,
}

/// Room for one UDP_SEGMENT control message (a u16), 8-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgSpace([u8; 32]);

/// Preallocated headers for sending up to `n` datagrams per call.
pub struct SendBatch {
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in6>,
    msgs: Vec<libc::mmsghdr>,
    cmsgs: Vec<CmsgSpace>,
    /// For message k: the range of datagrams [first, end) it carries.
    spans: Vec<(usize, usize)>,
}

// SAFETY: the raw pointers refer to this struct's own buffers or to the caller's buffers only
// during `send`; the struct is used by one thread at a time.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(n: usize) -> SendBatch {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let zero_addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let zero_msg: libc::mmsghdr = unsafe { mem::zeroed() };
        SendBatch {
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                n
            ],
            addrs: vec![zero_addr; n],
            msgs: vec![zero_msg; n],
            cmsgs: vec![CmsgSpace([0; 32]); n],
            spans: Vec::with_capacity(n),
        }
    }

    /// Groups `out[from..]` into messages (GSO runs when enabled). Returns the message count.
    fn build(&mut self, out: &[Outgoing], from: usize, gso: bool) -> usize {
        self.spans.clear();
        let mut i = from;
        let mut k = 0;
        while i < out.len() {
            let size = out[i].len;
            let mut j = i + 1;
            let mut total = size;
            if gso {
                // Every segment but the last must have exactly the segment size; the last may
                // be shorter.
                while j < out.len()
                    && j - i < GSO_MAX_SEGMENTS
                    && out[j].dst == out[i].dst
                    && out[j].len <= size
                    && out[j - 1].len == size
                    && total + out[j].len <= MAX_UDP_PAYLOAD
                {
                    total += out[j].len;
                    j += 1;
                }
            }
            for (m, o) in out[i..j].iter().enumerate() {
                self.iovs[i + m] = libc::iovec {
                    iov_base: o.ptr as *mut libc::c_void,
                    iov_len: o.len,
                };
            }
            self.addrs[k] = to_sockaddr(out[i].dst);
            let h = &mut self.msgs[k].msg_hdr;
            // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
            *h = unsafe { mem::zeroed() };
            h.msg_name = (&mut self.addrs[k] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = (j - i) as _;
            if j - i > 1 {
                let space = &mut self.cmsgs[k];
                h.msg_control = space.0.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as _;
                // SAFETY: msg_control points at 32 aligned bytes, more than CMSG_SPACE(2); the
                // header and data written stay inside them.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size as u16);
                }
            }
            self.spans.push((i, j));
            k += 1;
            i = j;
        }
        k
    }

    /// Sends every datagram in `out`, marking `sent[i]` for those the kernel took. Waits for
    /// socket buffer space (bounded), so a fast sender is paced by the socket rather than
    /// dropping. The pointers in `out` must stay valid for the call.
    pub fn send(&mut self, udp: &Udp, out: &[Outgoing], sent: &mut [bool]) {
        let fd = udp.fd();
        let mut from = 0;
        let mut stalls = 0;
        while from < out.len() {
            let gso = udp.gso_enabled();
            let nmsg = self.build(out, from, gso);
            // SAFETY: `msgs[..nmsg]` were just built; their pointers refer to `self` and to
            // the caller's packet buffers, alive for this call.
            let r = unsafe { libc::sendmmsg(fd, self.msgs.as_mut_ptr(), nmsg as libc::c_uint, 0) };
            if r > 0 {
                let done = r as usize;
                for &(a, b) in &self.spans[..done] {
                    sent[a..b].iter_mut().for_each(|s| *s = true);
                }
                from = self.spans[done - 1].1;
                stalls = 0;
                continue;
            }
            let err = io::Error::last_os_error();
            let (a, b) = self.spans[0];
            match err.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                    stalls += 1;
                    // Bounded: after ~1 s without progress the rest of the batch is dropped.
                    if stalls > 10 || !wait_writable(fd, 100) && stalls > 5 {
                        return;
                    }
                }
                Some(e) if b - a > 1 => {
                    // The kernel refused segmentation for this message. EIO/ENOPROTOOPT mean no
                    // GSO on this path or kernel at all; EMSGSIZE or EINVAL (a segment above the
                    // path MTU) only concerns this run. Send it again without GSO.
                    if matches!(e, libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP) {
                        udp.disable_gso();
                    }
                    self.send_singles(udp, &out[a..b], &mut sent[a..b]);
                    from = b;
                }
                _ => {
                    // Unreachable network, refused by a firewall, ...: this datagram is lost,
                    // the others may still go out.
                    from = b;
                }
            }
        }
    }

    fn send_singles(&mut self, udp: &Udp, out: &[Outgoing], sent: &mut [bool]) {
        for (o, s) in out.iter().zip(sent.iter_mut()) {
            // SAFETY: the caller guarantees `o.ptr` points at `o.len` readable bytes.
            let buf = unsafe { std::slice::from_raw_parts(o.ptr, o.len) };
            if udp.send_to(buf, o.dst, 100).is_ok() {
                *s = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn lo(port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port, 0, 0)
    }

    fn recv_all(rx: &Udp, batch: &mut RecvBatch, want: usize) -> Vec<(Vec<u8>, SocketAddrV6)> {
        let mut got = Vec::new();
        for _ in 0..200 {
            let mut p = libc::pollfd {
                fd: rx.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, alive for the call.
            unsafe { libc::poll(&mut p, 1, 20) };
            let n = batch.recv(rx.fd()).unwrap();
            for i in 0..n {
                let (b, src, trunc) = batch.get_mut(i);
                assert!(!trunc);
                got.push((b.to_vec(), src));
            }
            if got.len() >= want {
                break;
            }
        }
        got
    }

    fn lo6(port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0)
    }

    fn check_batch(gso: bool) {
        check_batch_at(gso, lo(0));
    }

    fn check_batch_at(gso: bool, at: SocketAddrV6) {
        let rx = Udp::bind(at).unwrap();
        let tx = Udp::bind(at).unwrap();
        if !gso {
            tx.disable_gso();
        }
        let dst = rx.local_addr().unwrap();
        // Runs of equal sizes, a shorter tail, a size change, an oversize-for-GSO run.
        let sizes: Vec<usize> = [
            vec![1200; 10],
            vec![700],
            vec![1200; 3],
            vec![100; 5],
            vec![1; 2],
        ]
        .concat();
        let datagrams: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| (0..s).map(|j| (i * 7 + j) as u8).collect())
            .collect();
        let out: Vec<Outgoing> = datagrams
            .iter()
            .map(|d| Outgoing {
                ptr: d.as_ptr(),
                len: d.len(),
                dst,
            })
            .collect();
        let mut sent = vec![false; out.len()];
        let mut sb = SendBatch::new(64);
        sb.send(&tx, &out, &mut sent);
        assert!(sent.iter().all(|&s| s));
        // Loopback takes UDP GSO on any kernel since 4.18: the fast path must have stayed on.
        assert_eq!(tx.gso_enabled(), gso);
        let mut batch = RecvBatch::new(64, 65536);
        let got = recv_all(&rx, &mut batch, datagrams.len());
        assert_eq!(got.len(), datagrams.len());
        for (g, d) in got.iter().zip(&datagrams) {
            assert_eq!(&g.0, d);
            assert_eq!(g.1, tx.local_addr().unwrap());
        }
    }

    #[test]
    fn batch_round_trip_with_gso() {
        check_batch(true);
    }

    #[test]
    fn batch_round_trip_without_gso() {
        check_batch(false);
    }

    #[test]
    fn batch_round_trip_over_ipv6_with_and_without_gso() {
        check_batch_at(true, lo6(0));
        check_batch_at(false, lo6(0));
    }

    #[test]
    fn one_dual_stack_socket_serves_both_families() {
        // Bound to [::]: an IPv4 sender is seen v4-mapped, an IPv6 one as itself, and the
        // socket answers both.
        let rx = Udp::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)).unwrap();
        let port = rx.local_addr().unwrap().port();
        let tx4 = Udp::bind(lo(0)).unwrap();
        let tx6 = Udp::bind(lo6(0)).unwrap();
        tx4.send_to(b"four", lo(port), 100).unwrap();
        tx6.send_to(b"six", lo6(port), 100).unwrap();
        let mut batch = RecvBatch::new(4, 2048);
        let got = recv_all(&rx, &mut batch, 2);
        assert_eq!(got.len(), 2);
        for (payload, src) in got {
            if payload == b"four" {
                assert_eq!(src, tx4.local_addr().unwrap());
                assert!(src.ip().to_ipv4_mapped().is_some());
            } else {
                assert_eq!(payload, b"six");
                assert_eq!(src, tx6.local_addr().unwrap());
            }
        }
        rx.send_to(b"back4", tx4.local_addr().unwrap(), 100)
            .unwrap();
        rx.send_to(b"back6", tx6.local_addr().unwrap(), 100)
            .unwrap();
        assert_eq!(recv_all(&tx4, &mut batch, 1)[0].0, b"back4");
        assert_eq!(recv_all(&tx6, &mut batch, 1)[0].0, b"back6");
    }

    #[test]
    fn gso_refused_by_the_route_falls_back_to_single_datagrams() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root (a private network namespace)"
        );
        std::thread::spawn(|| {
            // SAFETY: moves only this fresh thread into a new network namespace, which the
            // kernel deletes with it.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            for args in ["link set lo mtu 1400", "link set lo up"] {
                let args: Vec<&str> = args.split_whitespace().collect();
                assert!(std::process::Command::new("ip")
                    .args(&args)
                    .status()
                    .unwrap()
                    .success());
            }
            let rx = Udp::bind(lo(0)).unwrap();
            let tx = Udp::bind(lo(0)).unwrap();
            let dst = rx.local_addr().unwrap();
            // Segments larger than the path MTU: the kernel refuses the GSO send (EMSGSIZE),
            // while plain datagrams of that size are fragmented and still arrive.
            let datagrams: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8; 2000]).collect();
            let out: Vec<Outgoing> = datagrams
                .iter()
                .map(|d| Outgoing {
                    ptr: d.as_ptr(),
                    len: d.len(),
                    dst,
                })
                .collect();
            let mut sent = vec![false; out.len()];
            SendBatch::new(64).send(&tx, &out, &mut sent);
            assert!(sent.iter().all(|&s| s), "{sent:?}");
            // EMSGSIZE only concerns that run: GSO stays on for the next batches.
            assert!(tx.gso_enabled());
            let mut batch = RecvBatch::new(64, 65536);
            let got = recv_all(&rx, &mut batch, datagrams.len());
            assert_eq!(
                got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(),
                datagrams
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn local_port_is_assigned() {
        let u = Udp::bind(lo(0)).unwrap();
        assert_ne!(u.local_addr().unwrap().port(), 0);
    }

    #[test]
    fn truncation_is_reported() {
        let rx = Udp::bind(lo(0)).unwrap();
        let tx = Udp::bind(lo(0)).unwrap();
        tx.send_to(&[7u8; 300], rx.local_addr().unwrap(), 100)
            .unwrap();
        let mut batch = RecvBatch::new(4, 128);
        let mut p = libc::pollfd {
            fd: rx.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, alive for the call.
        unsafe { libc::poll(&mut p, 1, 1000) };
        assert_eq!(batch.recv(rx.fd()).unwrap(), 1);
        let (b, _, trunc) = batch.get_mut(0);
        assert!(trunc);
        assert_eq!(b.len(), 128);
    }
}

//! TUN devices (Linux `/dev/net/tun`, Documentation/networking/tuntap.rst): layer-3 packets
//! without the packet-information prefix (IFF_NO_PI), nonblocking. Where the kernel allows it,
//! with a virtio-net header (IFF_VNET_HDR) and checksum + TCP/IPv6 segmentation offload, so
//! that TCP hands the engine 64 KiB super packets (see offload.rs). Setting BTMM_TUN_OFFLOAD=0
//! in the environment turns the offloads off (for comparisons and debugging).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::EngineError;

/// `struct ifreq` restricted to the members used here (name + flags or MTU), padded to the
/// kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

pub struct Tun {
    fd: OwnedFd,
    name: String,
    /// Every read and write carries a 10-byte virtio-net header.
    vnet: bool,
}

fn tun_error(what: String, err: &io::Error) -> EngineError {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => EngineError::Permission {
            what: format!("{what}: {err}"),
            hint: Some(
                "creating a TUN device needs CAP_NET_ADMIN: run as root, or create a persistent \
                        device owned by this user (`ip tuntap add mode tun user $USER name btmm0`)"
                    .into(),
            ),
        },
        Some(libc::ENOENT) | Some(libc::ENODEV) => EngineError::Tun {
            what: format!("{what}: {err}"),
            hint: Some(
                "the kernel has no TUN support here: load it with `modprobe tun`, or in a \
                        container pass /dev/net/tun through"
                    .into(),
            ),
        },
        Some(libc::EBUSY) => EngineError::Tun {
            what: format!("{what}: {err}"),
            hint: Some(
                "another process holds this TUN device; pick another name or stop it".into(),
            ),
        },
        _ => EngineError::Tun {
            what: format!("{what}: {err}"),
            hint: None,
        },
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tun {
    /// Creates the device `name` (or attaches to an existing persistent one), sets its MTU and
    /// brings it up.
    pub fn open(name: &str, mtu: u32) -> Result<Tun, EngineError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(EngineError::Tun {
                what: format!("invalid TUN device name {name:?}"),
                hint: Some("use 1 to 15 bytes without '/', spaces or NUL".into()),
            });
        }
        // SAFETY: open(2) with a NUL-terminated literal path.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            return Err(tun_error(
                "cannot open /dev/net/tun".into(),
                &io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` was just returned by open(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let offload = std::env::var("BTMM_TUN_OFFLOAD")
            .map(|v| v != "0")
            .unwrap_or(true);
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if offload {
            flags |= libc::IFF_VNET_HDR;
        }
        let mut req = IfReq::new(name);
        req.set_short(flags as i16);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; IfReq has its size and layout.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) } < 0 {
            return Err(tun_error(
                format!("cannot create TUN device {name}"),
                &io::Error::last_os_error(),
            ));
        }
        let tun = Tun {
            fd,
            name: req.name(),
            vnet: offload,
        };
        if offload {
            tun.set_vnet_hdr_len()?;
            let features = libc::TUN_F_CSUM | libc::TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes the feature bits as the integer argument. A kernel
            // that refuses them still sends headers, just never partial or GSO packets.
            unsafe {
                libc::ioctl(
                    tun.fd(),
                    libc::TUNSETOFFLOAD as _,
                    features as libc::c_ulong,
                )
            };
        }
        tun.configure(mtu)?;
        Ok(tun)
    }

    /// Takes ownership of an already open TUN descriptor (for example one passed by a
    /// privileged helper). It must be a layer-3 device without packet information.
    pub fn attach(raw: RawFd) -> Result<Tun, EngineError> {
        if raw < 0 {
            return Err(EngineError::Tun {
                what: format!("tun_fd {raw} is not a file descriptor"),
                hint: Some("pass a descriptor returned by TUNSETIFF on /dev/net/tun".into()),
            });
        }
        let mut req = IfReq::new("");
        // SAFETY: TUNGETIFF fills a `struct ifreq`; on a non-TUN fd it fails with EBADFD/EINVAL.
        if unsafe { libc::ioctl(raw, libc::TUNGETIFF as _, &mut req) } < 0 {
            return Err(EngineError::Tun {
                what: format!(
                    "fd {raw} is not an attached TUN device: {}",
                    io::Error::last_os_error()
                ),
                hint: Some("pass a descriptor of /dev/net/tun after TUNSETIFF".into()),
            });
        }
        let flags = i32::from(req.short()) & 0xffff;
        if flags & libc::IFF_TUN == 0 || flags & libc::IFF_NO_PI == 0 {
            return Err(EngineError::Tun {
                what: format!(
                    "fd {raw} is a TAP device or carries packet information (flags {flags:#x})"
                ),
                hint: Some("open it with IFF_TUN | IFF_NO_PI".into()),
            });
        }
        // SAFETY: the caller hands the descriptor over; from here on we own and close it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_nonblocking(raw).map_err(|e| EngineError::Tun {
            what: format!("fd {raw}: {e}"),
            hint: None,
        })?;
        let tun = Tun {
            fd,
            name: req.name(),
            vnet: flags & libc::IFF_VNET_HDR != 0,
        };
        if tun.vnet {
            tun.set_vnet_hdr_len()?;
        }
        Ok(tun)
    }

    /// The engine parses the 10-byte `struct virtio_net_hdr`; make the device use that size.
    fn set_vnet_hdr_len(&self) -> Result<(), EngineError> {
        let len: libc::c_int = crate::offload::VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, alive for the call.
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETVNETHDRSZ as _, &len) } < 0 {
            return Err(tun_error(
                format!("cannot set the virtio header size on {}", self.name),
                &io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Whether reads and writes carry a virtio-net header.
    pub fn vnet(&self) -> bool {
        self.vnet
    }

    fn configure(&self, mtu: u32) -> Result<(), EngineError> {
        // SAFETY: a throwaway datagram socket, used only as a handle for interface ioctls.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(tun_error(
                "cannot open a socket to configure the TUN device".into(),
                &io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh descriptor that nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(&self.name);
        req.set_int(mtu as i32);
        // SAFETY: SIOCSIFMTU reads ifr_name and ifr_mtu from a `struct ifreq`.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU as _, &mut req) } < 0 {
            return Err(tun_error(
                format!("cannot set MTU {mtu} on {}", self.name),
                &io::Error::last_os_error(),
            ));
        }
        let mut req = IfReq::new(&self.name);
        // SAFETY: SIOCGIFFLAGS fills ifr_flags of a `struct ifreq`.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
            return Err(tun_error(
                format!("cannot read flags of {}", self.name),
                &io::Error::last_os_error(),
            ));
        }
        let flags = req.short() | libc::IFF_UP as i16;
        req.set_short(flags);
        // SAFETY: SIOCSIFFLAGS reads ifr_flags of a `struct ifreq`.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req) } < 0 {
            return Err(tun_error(
                format!("cannot bring {} up", self.name),
                &io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn rejects_bad_names() {
        assert!(matches!(Tun::open("", 1400), Err(EngineError::Tun { .. })));
        assert!(matches!(
            Tun::open("a-very-long-name-x", 1400),
            Err(EngineError::Tun { .. })
        ));
        assert!(matches!(
            Tun::open("a/b", 1400),
            Err(EngineError::Tun { .. })
        ));
    }

    #[test]
    fn attach_refuses_a_non_tun_fd() {
        // SAFETY: a fresh pipe; both ends are closed below.
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert!(matches!(Tun::attach(fds[0]), Err(EngineError::Tun { .. })));
        // SAFETY: the pipe's descriptors are still ours (attach refused them).
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    #[test]
    fn open_in_a_private_namespace() {
        // Needs root; creating the device inside a new network namespace keeps the host clean,
        // and the namespace disappears with the thread.
        assert!(
            is_root(),
            "the TUN tests need root (CAP_NET_ADMIN); run cargo test as root"
        );
        let handle = std::thread::spawn(|| {
            // SAFETY: unshare affects only this (fresh) thread's network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let tun = Tun::open("btmmtest0", 1300).expect("open TUN");
            assert_eq!(tun.name(), "btmmtest0");
            let mut req = IfReq::new("btmmtest0");
            // SAFETY: socket(2) with constant arguments; the socket lives in this thread's namespace.
            let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            assert!(sock >= 0);
            // SAFETY: SIOCGIFMTU fills ifr_mtu.
            assert_eq!(
                unsafe { libc::ioctl(sock, libc::SIOCGIFMTU as _, &mut req) },
                0
            );
            assert_eq!(i32::from_ne_bytes(req.data[..4].try_into().unwrap()), 1300);
            // SAFETY: closing the socket made above.
            unsafe { libc::close(sock) };
            // Attaching by descriptor reads back the same name.
            let fd = tun.into_fd();
            let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
            let again = Tun::attach(raw).expect("attach");
            assert_eq!(again.name(), "btmmtest0");
        });
        handle.join().unwrap();
    }
}

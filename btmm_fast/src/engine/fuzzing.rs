//! For the fuzz targets in `btmm_fast/fuzz/` only, not an API: the RX thread's per-datagram
//! decision (`rx::rx_classify`) over a table of receive SAs, without a socket, a TUN or a
//! thread, so that any datagram can be fed to exactly the code the engine runs. Nothing here
//! is used by the engine itself; it only builds the private types the decision takes.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use super::rx::{rx_classify, Roam, RxDecision};
use super::{Counters, Inner, Peer, RxEntry};
use crate::endpoint::{AtomicEndpoint, Endpoint};
use crate::esp::{DropReason, RxSa, SaError};

/// What `rx_classify` decided, with the peer named by its inner address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Keepalive,
    Control(Range<usize>),
    Stun,
    Drop {
        reason: DropReason,
        peer: Option<Inner>,
    },
    /// `roam`: (old, new) endpoint, already applied to the peer as the RX loop does.
    Deliver {
        inner: Range<usize>,
        peer: Inner,
        roam: Option<(Option<Endpoint>, Endpoint)>,
    },
}

/// The receive-SA table of the RX thread (SPI -> peer and SA with its replay window).
pub struct RxTable {
    sas: HashMap<u32, RxEntry>,
}

impl RxTable {
    /// One peer per entry: (SPI, the peer's inner address, 36 bytes of keying material).
    pub fn new(entries: &[(u32, Inner, &[u8])]) -> Result<RxTable, SaError> {
        let mut sas = HashMap::new();
        for &(spi, inner, keymat) in entries {
            let peer = Arc::new(Peer {
                inner,
                endpoint: AtomicEndpoint::new(None),
                counters: Counters::default(),
            });
            sas.insert(
                spi,
                RxEntry {
                    peer,
                    sa: RxSa::new(spi, keymat)?,
                },
            );
        }
        Ok(RxTable { sas })
    }

    /// The highest sequence number the SA `spi` accepted (None: no such SA).
    pub fn top(&self, spi: u32) -> Option<u64> {
        self.sas.get(&spi).map(|e| e.sa.top())
    }

    /// The outer endpoint of the peer of SA `spi`.
    pub fn endpoint(&self, spi: u32) -> Option<Endpoint> {
        self.sas.get(&spi).and_then(|e| e.peer.endpoint.load())
    }

    /// Classifies one datagram (opening ESP in place in `payload`) and, like the RX loop,
    /// moves the peer's endpoint when the decision says it roamed.
    pub fn classify(&mut self, payload: &mut [u8], src: Endpoint, truncated: bool) -> Decision {
        match rx_classify(payload, src, truncated, &mut self.sas) {
            RxDecision::Keepalive => Decision::Keepalive,
            RxDecision::Control(r) => Decision::Control(r),
            RxDecision::Stun => Decision::Stun,
            RxDecision::Drop { reason, peer } => Decision::Drop {
                reason,
                peer: peer.map(|p| p.inner),
            },
            RxDecision::Deliver { inner, peer, roam } => {
                if let Some(Roam { new, .. }) = roam {
                    peer.endpoint.store(Some(new));
                }
                Decision::Deliver {
                    inner,
                    peer: peer.inner,
                    roam: roam.map(|r| (r.old, r.new)),
                }
            }
        }
    }
}

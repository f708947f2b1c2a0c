//! The Python module `btmm_core._fast`: thin bindings over the plain-Rust core. Errors are
//! raised as the classes of `btmm_core.errors` (imported once, cached); the GIL is released in
//! every call that can block, and the engine's threads never touch Python.

use std::net::IpAddr;

use crate::endpoint::{self as ep, Endpoint};
use std::time::Instant;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple, PyType};

use crate::engine::{self, CounterSnapshot, Event, Inner};
use crate::error::EngineError;
use crate::esp::{self, DropReason};

static CONFIG_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static PACKET_DROPPED: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static SA_EXHAUSTED: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static DATA_PLANE_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static TUN_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static PERMISSION_NEEDED: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static UNKNOWN_PEER: GILOnceCell<Py<PyType>> = GILOnceCell::new();
static DROP_REASON: GILOnceCell<Py<PyType>> = GILOnceCell::new();

const ERRORS: &str = "btmm_core.errors";

fn error_class<'py>(
    py: Python<'py>,
    cell: &'static GILOnceCell<Py<PyType>>,
    name: &str,
) -> PyResult<&'py Bound<'py, PyType>> {
    cell.import(py, ERRORS, name)
}

fn btmm_error(
    py: Python<'_>,
    cell: &'static GILOnceCell<Py<PyType>>,
    name: &str,
    what: &str,
    hint: Option<&str>,
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = error_class(py, cell, name)?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("hint", hint)?;
        Ok(PyErr::from_value(cls.call((what,), Some(&kwargs))?))
    };
    build().unwrap_or_else(|e| e)
}

/// The one translation of the engine's errors into Python: each variant becomes the class the
/// Python engine raises for the same mistake (btmm_core.errors; ValueError for a malformed
/// argument, as the Python ESP codec raises), so callers catch the same class whichever
/// engine runs.
fn engine_err(py: Python<'_>, e: EngineError) -> PyErr {
    let (cell, name, what, hint) = match e {
        EngineError::Invalid(what) => return PyValueError::new_err(what),
        EngineError::UnknownPeer(what) => (&UNKNOWN_PEER, "UnknownPeer", what, None),
        EngineError::Config { what, hint } => (&CONFIG_ERROR, "ConfigError", what, hint),
        EngineError::Tun { what, hint } => (&TUN_ERROR, "TunError", what, hint),
        EngineError::Permission { what, hint } => {
            (&PERMISSION_NEEDED, "PermissionNeeded", what, hint)
        }
        EngineError::DataPlane { what, hint } => (&DATA_PLANE_ERROR, "DataPlaneError", what, hint),
    };
    btmm_error(py, cell, name, &what, hint.as_deref())
}

fn dropped(py: Python<'_>, reason: DropReason) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let enum_cls = DROP_REASON.import(py, "btmm_core.dataplane.api", "DropReason")?;
        let r = enum_cls.call1((reason as u8,))?;
        let cls = error_class(py, &PACKET_DROPPED, "PacketDropped")?;
        Ok(PyErr::from_value(cls.call1((
            r,
            format!("packet dropped: {}", reason.describe()),
        ))?))
    };
    build().unwrap_or_else(|e| e)
}

fn exhausted(py: Python<'_>, spi: u32) -> PyErr {
    btmm_error(
        py,
        &SA_EXHAUSTED,
        "SaExhausted",
        &format!("transmit SA {spi:#010x} sent sequence number 2**64-1 and cannot send more"),
        Some("install a new transmit SA (rekey)"),
    )
}

/// `v` as an integer in `lo..=hi`, or why not. Integers are taken as Python ints and
/// range-checked here so that a bad value gets the project's class (PyO3's own conversions
/// would raise OverflowError or TypeError).
fn int_range(v: &Bound<'_, PyAny>, what: &str, lo: i128, hi: i128) -> Result<i128, String> {
    let n: i128 = v
        .extract()
        .map_err(|_| format!("{what} must be an integer in {lo}..{hi}"))?;
    if n < lo || n > hi {
        return Err(format!("{what} must be in {lo}..{hi}, got {n}"));
    }
    Ok(n)
}

/// An argument of a call: out of range is a ValueError.
fn int_in(v: &Bound<'_, PyAny>, what: &str, lo: i128, hi: i128) -> PyResult<i128> {
    int_range(v, what, lo, hi).map_err(PyValueError::new_err)
}

/// A field of EngineConfig: out of range is a ConfigError, as in the Python engine.
fn setting(v: &Bound<'_, PyAny>, what: &str, lo: i128, hi: i128) -> Result<i128, EngineError> {
    int_range(v, what, lo, hi).map_err(|what| EngineError::Config {
        what,
        hint: Some("see EngineConfig for the meaning and defaults of each field".into()),
    })
}

fn spi_arg(v: &Bound<'_, PyAny>) -> PyResult<u32> {
    Ok(int_in(v, "spi", 1, i128::from(u32::MAX))? as u32)
}

fn bytes_arg(v: &Bound<'_, PyAny>, what: &str) -> PyResult<PyBackedBytes> {
    v.extract()
        .map_err(|_| PyValueError::new_err(format!("{what} must be bytes")))
}

fn inner_arg(v: &Bound<'_, PyAny>) -> PyResult<Inner> {
    let b = bytes_arg(v, "inner")?;
    <Inner>::try_from(&b[..]).map_err(|_| {
        PyValueError::new_err(format!(
            "inner must be a 16-byte IPv6 address, got {} bytes",
            b.len()
        ))
    })
}

/// A `(host, port)` tuple of either family (IPv4 becomes v4-mapped, endpoint.rs).
fn endpoint_arg(v: &Bound<'_, PyAny>) -> PyResult<Option<Endpoint>> {
    if v.is_none() {
        return Ok(None);
    }
    let (host, port): (String, Bound<'_, PyAny>) = v
        .extract()
        .map_err(|_| PyValueError::new_err("endpoint must be a (host, port) tuple or None"))?;
    let ip: IpAddr = host.parse().map_err(|_| {
        PyValueError::new_err(format!(
            "endpoint host {host:?} is not an IPv4 or IPv6 address"
        ))
    })?;
    let port = int_in(&port, "endpoint port", 0, 65535)? as u16;
    Ok(Some(ep::from_ip(ip, port)))
}

/// `(host, port)` with a v4-mapped address shown as plain IPv4.
fn endpoint_obj<'py>(py: Python<'py>, e: Option<Endpoint>) -> PyResult<Bound<'py, PyAny>> {
    match e.map(ep::display) {
        None => Ok(py.None().into_bound(py)),
        Some(a) => Ok((a.ip().to_string(), a.port()).into_pyobject(py)?.into_any()),
    }
}

fn counters_dict<'py>(py: Python<'py>, c: &CounterSnapshot) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("packets_in", c.packets_in)?;
    d.set_item("bytes_in", c.bytes_in)?;
    d.set_item("packets_out", c.packets_out)?;
    d.set_item("bytes_out", c.bytes_out)?;
    d.set_item("keepalives_in", c.keepalives_in)?;
    d.set_item("control_in", c.control_in)?;
    let drops = PyDict::new(py);
    for r in DropReason::ALL {
        drops.set_item(r.name(), c.drop_count(r))?;
    }
    d.set_item("drops", drops)?;
    Ok(d)
}

/// Outbound ESP codec of one SA.
#[pyclass(name = "TxSa", module = "btmm_core._fast", frozen)]
struct PyTxSa {
    sa: esp::TxSa,
}

#[pymethods]
impl PyTxSa {
    #[new]
    #[pyo3(signature = (spi, keymat, next_seq = None))]
    fn new(
        spi: &Bound<'_, PyAny>,
        keymat: &Bound<'_, PyAny>,
        next_seq: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let spi = spi_arg(spi)?;
        let keymat = bytes_arg(keymat, "keymat")?;
        let next = match next_seq {
            None => 1,
            Some(v) => int_in(v, "next_seq", 1, 1i128 << 64)? as u128,
        };
        let sa = esp::TxSa::new(spi, &keymat, next).map_err(|e| PyValueError::new_err(e.0))?;
        Ok(PyTxSa { sa })
    }

    #[getter]
    fn spi(&self) -> u32 {
        self.sa.spi()
    }

    #[getter]
    fn next_seq(&self) -> u128 {
        self.sa.next_seq()
    }

    /// Encrypt one inner packet into a UDP payload; raises SaExhausted after seq 2**64-1.
    fn seal<'py>(
        &self,
        py: Python<'py>,
        inner: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let inner = bytes_arg(inner, "inner")?;
        let n = inner.len();
        let mut result = Ok(0);
        let out = PyBytes::new_with(py, esp::sealed_len(n), |buf| {
            buf[esp::HEADER_LEN..esp::HEADER_LEN + n].copy_from_slice(&inner);
            result = self.sa.seal_in_place(buf, n);
            Ok(())
        })?;
        match result {
            Ok(_) => Ok(out),
            Err(esp::Exhausted) => Err(exhausted(py, self.sa.spi())),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "TxSa(spi={:#010x}, next_seq={})",
            self.sa.spi(),
            self.sa.next_seq()
        )
    }
}

/// Inbound ESP codec of one SA, with its replay window.
#[pyclass(name = "RxSa", module = "btmm_core._fast")]
struct PyRxSa {
    sa: esp::RxSa,
}

#[pymethods]
impl PyRxSa {
    #[new]
    fn new(spi: &Bound<'_, PyAny>, keymat: &Bound<'_, PyAny>) -> PyResult<Self> {
        let spi = spi_arg(spi)?;
        let keymat = bytes_arg(keymat, "keymat")?;
        let sa = esp::RxSa::new(spi, &keymat).map_err(|e| PyValueError::new_err(e.0))?;
        Ok(PyRxSa { sa })
    }

    #[getter]
    fn spi(&self) -> u32 {
        self.sa.spi()
    }

    /// Highest sequence number accepted so far (0 before the first packet).
    #[getter]
    fn top(&self) -> u64 {
        self.sa.top()
    }

    /// Decrypt one UDP payload into the inner packet; raises PacketDropped.
    fn open<'py>(
        &mut self,
        py: Python<'py>,
        payload: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let payload = bytes_arg(payload, "payload")?;
        let mut buf = payload.to_vec();
        match self.sa.open_in_place(&mut buf) {
            Ok(o) => Ok(PyBytes::new(py, &buf[o.inner])),
            Err(e) => Err(dropped(py, e.reason)),
        }
    }

    fn __repr__(&self) -> String {
        format!("RxSa(spi={:#010x}, top={})", self.sa.spi(), self.sa.top())
    }
}

/// The data plane engine: TUN <-> ESP <-> UDP, two native threads.
#[pyclass(name = "Engine", module = "btmm_core._fast", frozen)]
struct PyEngine {
    engine: engine::Engine,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (tun_name, tun_fd, listen_host, listen_port, mtu, event_queue, control_queue_bytes))]
    // One argument per field of the Python EngineConfig, checked here one by one.
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        tun_name: Option<String>,
        tun_fd: Option<&Bound<'_, PyAny>>,
        listen_host: String,
        listen_port: &Bound<'_, PyAny>,
        mtu: &Bound<'_, PyAny>,
        event_queue: &Bound<'_, PyAny>,
        control_queue_bytes: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let config = || -> Result<engine::Config, EngineError> {
            let tun_fd = match tun_fd {
                // A negative descriptor is refused by the TUN layer (TunError), as in Python.
                Some(v) if !v.is_none() => {
                    Some(setting(v, "tun_fd", i32::MIN.into(), i32::MAX.into())? as i32)
                }
                _ => None,
            };
            let ip: IpAddr = listen_host.parse().map_err(|_| {
                EngineError::config(
                    format!("listen host {listen_host:?} is not an IPv4 or IPv6 address"),
                    "use an address of this host, or :: (or 0.0.0.0) for every address of \
                     both families",
                )
            })?;
            let port = setting(listen_port, "listen_port", 0, 65535)? as u16;
            Ok(engine::Config {
                tun_name,
                tun_fd,
                listen: ep::from_ip(ip, port),
                mtu: setting(mtu, "mtu", 0, i128::from(u32::MAX))? as u32,
                event_queue: setting(event_queue, "event_queue", 1, 1 << 24)? as usize,
                control_queue_bytes: setting(
                    control_queue_bytes,
                    "control_queue_bytes",
                    0,
                    1 << 40,
                )? as usize,
            })
        };
        let engine = config()
            .and_then(|cfg| py.allow_threads(|| engine::Engine::new(cfg)))
            .map_err(|e| engine_err(py, e))?;
        Ok(PyEngine { engine })
    }

    #[getter]
    fn tun_name(&self) -> String {
        self.engine.tun_name().to_string()
    }

    #[getter]
    fn local_port(&self) -> u16 {
        self.engine.local_addr().port()
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.engine.start())
            .map_err(|e| engine_err(py, e))
    }

    fn stop(&self, py: Python<'_>) {
        py.allow_threads(|| self.engine.stop())
    }

    #[pyo3(signature = (inner, endpoint = None))]
    fn add_peer(
        &self,
        py: Python<'_>,
        inner: &Bound<'_, PyAny>,
        endpoint: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let inner = inner_arg(inner)?;
        let ep = match endpoint {
            Some(v) => endpoint_arg(v)?,
            None => None,
        };
        py.allow_threads(|| self.engine.add_peer(inner, ep))
            .map_err(|e| engine_err(py, e))
    }

    fn update_peer(
        &self,
        py: Python<'_>,
        inner: &Bound<'_, PyAny>,
        endpoint: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let inner = inner_arg(inner)?;
        let ep = endpoint_arg(endpoint)?;
        py.allow_threads(|| self.engine.update_peer(inner, ep))
            .map_err(|e| engine_err(py, e))
    }

    fn remove_peer(&self, py: Python<'_>, inner: &Bound<'_, PyAny>) -> PyResult<()> {
        let inner = inner_arg(inner)?;
        py.allow_threads(|| self.engine.remove_peer(inner))
            .map_err(|e| engine_err(py, e))
    }

    #[pyo3(signature = (inner, spi, keymat, next_seq = None))]
    fn install_tx_sa(
        &self,
        py: Python<'_>,
        inner: &Bound<'_, PyAny>,
        spi: &Bound<'_, PyAny>,
        keymat: &Bound<'_, PyAny>,
        next_seq: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let inner = inner_arg(inner)?;
        let spi = spi_arg(spi)?;
        let keymat = bytes_arg(keymat, "keymat")?;
        let next = match next_seq {
            None => 1,
            Some(v) => int_in(v, "next_seq", 1, 1i128 << 64)? as u128,
        };
        py.allow_threads(|| self.engine.install_tx_sa(inner, spi, &keymat, next))
            .map_err(|e| engine_err(py, e))
    }

    fn install_rx_sa(
        &self,
        py: Python<'_>,
        inner: &Bound<'_, PyAny>,
        spi: &Bound<'_, PyAny>,
        keymat: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let inner = inner_arg(inner)?;
        let spi = spi_arg(spi)?;
        let keymat = bytes_arg(keymat, "keymat")?;
        py.allow_threads(|| self.engine.install_rx_sa(inner, spi, &keymat))
            .map_err(|e| engine_err(py, e))
    }

    fn retire_rx_sa(
        &self,
        py: Python<'_>,
        inner: &Bound<'_, PyAny>,
        spi: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let inner = inner_arg(inner)?;
        let spi = spi_arg(spi)?;
        py.allow_threads(|| self.engine.retire_rx_sa(inner, spi))
            .map_err(|e| engine_err(py, e))
    }

    /// Answers the packets held for the peer with ICMPv6 address unreachable (on-demand).
    fn reject_held(&self, py: Python<'_>, inner: &Bound<'_, PyAny>) -> PyResult<usize> {
        let inner = inner_arg(inner)?;
        py.allow_threads(|| self.engine.reject_held(inner))
            .map_err(|e| engine_err(py, e))
    }

    /// Removes the peer's transmit SA: the tunnel is idle, its next packet is held.
    fn clear_tx_sa(&self, py: Python<'_>, inner: &Bound<'_, PyAny>) -> PyResult<()> {
        let inner = inner_arg(inner)?;
        py.allow_threads(|| self.engine.clear_tx_sa(inner))
            .map_err(|e| engine_err(py, e))
    }

    fn send_control(
        &self,
        py: Python<'_>,
        endpoint: &Bound<'_, PyAny>,
        message: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let dst = endpoint_arg(endpoint)?
            .ok_or_else(|| PyValueError::new_err("send_control needs an endpoint"))?;
        let message = bytes_arg(message, "message")?;
        py.allow_threads(|| self.engine.send_control(dst, &message))
            .map_err(|e| engine_err(py, e))
    }

    /// Sends one STUN message without the marker; ValueError for anything that is not STUN.
    fn send_stun(
        &self,
        py: Python<'_>,
        endpoint: &Bound<'_, PyAny>,
        message: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let dst = endpoint_arg(endpoint)?
            .ok_or_else(|| PyValueError::new_err("send_stun needs an endpoint"))?;
        let message = bytes_arg(message, "message")?;
        py.allow_threads(|| self.engine.send_stun(dst, &message))
            .map_err(|e| engine_err(py, e))
    }

    fn send_keepalive(&self, py: Python<'_>, inner: &Bound<'_, PyAny>) -> PyResult<()> {
        let inner = inner_arg(inner)?;
        py.allow_threads(|| self.engine.send_keepalive(inner))
            .map_err(|e| engine_err(py, e))
    }

    /// An eventfd that is readable while events are queued.
    fn fileno(&self, py: Python<'_>) -> PyResult<i32> {
        self.engine.event_fd().map_err(|e| engine_err(py, e))
    }

    #[pyo3(signature = (limit = None))]
    fn drain<'py>(
        &self,
        py: Python<'py>,
        limit: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let limit = match limit {
            Some(v) => int_in(v, "limit", 0, i128::from(u32::MAX))? as usize,
            None => 256,
        };
        let events = py.allow_threads(|| self.engine.drain(limit));
        let out = PyList::empty(py);
        for ev in events {
            let t: Bound<'py, PyTuple> = match ev {
                Event::Control { source, payload } => PyTuple::new(
                    py,
                    [
                        "control".into_pyobject(py)?.into_any(),
                        ep::display(source)
                            .ip()
                            .to_string()
                            .into_pyobject(py)?
                            .into_any(),
                        source.port().into_pyobject(py)?.into_any(),
                        PyBytes::new(py, &payload).into_any(),
                    ],
                )?,
                Event::Stun { source, payload } => PyTuple::new(
                    py,
                    [
                        "stun".into_pyobject(py)?.into_any(),
                        ep::display(source)
                            .ip()
                            .to_string()
                            .into_pyobject(py)?
                            .into_any(),
                        source.port().into_pyobject(py)?.into_any(),
                        PyBytes::new(py, &payload).into_any(),
                    ],
                )?,
                Event::Roamed { inner, old, new } => PyTuple::new(
                    py,
                    [
                        "roamed".into_pyobject(py)?.into_any(),
                        PyBytes::new(py, &inner).into_any(),
                        endpoint_obj(py, old)?,
                        endpoint_obj(py, Some(new))?,
                    ],
                )?,
                Event::Exhausted { inner, spi } => PyTuple::new(
                    py,
                    [
                        "exhausted".into_pyobject(py)?.into_any(),
                        PyBytes::new(py, &inner).into_any(),
                        spi.into_pyobject(py)?.into_any(),
                    ],
                )?,
                Event::Wanted { inner } => PyTuple::new(
                    py,
                    [
                        "wanted".into_pyobject(py)?.into_any(),
                        PyBytes::new(py, &inner).into_any(),
                    ],
                )?,
            };
            out.append(t)?;
        }
        Ok(out)
    }

    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        counters_dict(py, &self.engine.counters())
    }

    fn peers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let snapshot = py.allow_threads(|| self.engine.peers());
        let out = PyList::empty(py);
        for p in snapshot {
            let d = PyDict::new(py);
            d.set_item("inner", PyBytes::new(py, &p.inner))?;
            d.set_item("endpoint", endpoint_obj(py, p.endpoint)?)?;
            d.set_item("tx_spi", p.tx_spi)?;
            d.set_item("rx_spis", PyList::new(py, &p.rx_spis)?)?;
            d.set_item("counters", counters_dict(py, &p.counters)?)?;
            d.set_item("held", p.held)?;
            out.append(d)?;
        }
        Ok(out)
    }
}

fn bench_key(seed: u8) -> Vec<u8> {
    (0..esp::KEYMAT_LEN as u8)
        .map(|i| i.wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn size_count(size: &Bound<'_, PyAny>, count: &Bound<'_, PyAny>) -> PyResult<(usize, u64)> {
    Ok((
        int_in(size, "size", 0, 65000)? as usize,
        int_in(count, "count", 0, i128::from(u64::MAX))? as u64,
    ))
}

/// Seconds for `count` seal+open pairs of `size`-byte inner packets through the ESP codec
/// (in place, as the engine does it).
#[pyfunction]
fn bench_codec(py: Python<'_>, size: &Bound<'_, PyAny>, count: &Bound<'_, PyAny>) -> PyResult<f64> {
    let (size, count) = size_count(size, count)?;
    let km = bench_key(1);
    let tx = esp::TxSa::new(1, &km, 1).map_err(|e| PyValueError::new_err(e.0))?;
    let mut rx = esp::RxSa::new(1, &km).map_err(|e| PyValueError::new_err(e.0))?;
    let result = py.allow_threads(move || {
        let mut buf = vec![0u8; esp::sealed_len(size)];
        let pattern: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let start = Instant::now();
        for _ in 0..count {
            buf[esp::HEADER_LEN..esp::HEADER_LEN + size].copy_from_slice(&pattern);
            let n = tx
                .seal_in_place(&mut buf, size)
                .map_err(|_| "SA exhausted")?;
            let o = rx.open_in_place(&mut buf[..n]).map_err(|_| "open failed")?;
            if o.inner.len() != size {
                return Err("round trip changed the length");
            }
        }
        Ok(start.elapsed().as_secs_f64())
    });
    result.map_err(|e: &str| PyValueError::new_err(format!("bench_codec: {e}")))
}

/// Seconds for `count` bare AES-256-GCM seal+open of `size` bytes with ring: the ceiling the
/// codec can approach.
#[pyfunction]
fn bench_aead(py: Python<'_>, size: &Bound<'_, PyAny>, count: &Bound<'_, PyAny>) -> PyResult<f64> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let (size, count) = size_count(size, count)?;
    let km = bench_key(2);
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &km[..32]).map_err(|_| PyValueError::new_err("key"))?,
    );
    let result = py.allow_threads(move || {
        let mut buf = vec![0u8; size];
        let start = Instant::now();
        for i in 0..count {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&i.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(n),
                    Aad::from([0u8; 12]),
                    &mut buf,
                )
                .map_err(|_| "seal failed")?;
            key.open_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::from([0u8; 12]),
                tag,
                &mut buf,
                0..,
            )
            .map_err(|_| "open failed")?;
        }
        Ok(start.elapsed().as_secs_f64())
    });
    result.map_err(|e: &str| PyValueError::new_err(format!("bench_aead: {e}")))
}

#[pymodule]
fn _fast(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTxSa>()?;
    m.add_class::<PyRxSa>()?;
    m.add_class::<PyEngine>()?;
    m.add_function(wrap_pyfunction!(bench_codec, m)?)?;
    m.add_function(wrap_pyfunction!(bench_aead, m)?)?;
    m.add("BATCH", engine::BATCH)?;
    Ok(())
}

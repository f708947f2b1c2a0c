//! Errors of the engine, mapped one to one onto Python exceptions by `python.rs`
//! (`engine_err`): the class is the one the Python engine raises for the same mistake.

use std::fmt;
use std::io;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// A malformed argument of a call, such as keying material of the wrong length (Python:
    /// ValueError, as the Python ESP codec raises).
    Invalid(String),
    /// A bad engine setting: MTU, queue bounds, no TUN device named (Python: ConfigError).
    Config { what: String, hint: Option<String> },
    /// TUN device could not be opened or configured (Python: TunError).
    Tun { what: String, hint: Option<String> },
    /// Missing privileges (Python: PermissionNeeded).
    Permission { what: String, hint: Option<String> },
    /// No peer with this inner address (Python: UnknownPeer).
    UnknownPeer(String),
    /// Anything else the engine could not do (Python: DataPlaneError).
    DataPlane { what: String, hint: Option<String> },
}

impl EngineError {
    pub fn data_plane(what: impl Into<String>) -> Self {
        EngineError::DataPlane {
            what: what.into(),
            hint: None,
        }
    }

    pub fn config(what: impl Into<String>, hint: impl Into<String>) -> Self {
        EngineError::Config {
            what: what.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn io(context: &str, err: &io::Error) -> Self {
        EngineError::data_plane(format!("{context}: {err}"))
    }

    pub fn what(&self) -> &str {
        match self {
            EngineError::Invalid(w) | EngineError::UnknownPeer(w) => w,
            EngineError::Config { what, .. }
            | EngineError::Tun { what, .. }
            | EngineError::Permission { what, .. }
            | EngineError::DataPlane { what, .. } => what,
        }
    }

    pub fn hint(&self) -> Option<&str> {
        match self {
            EngineError::Config { hint, .. }
            | EngineError::Tun { hint, .. }
            | EngineError::Permission { hint, .. }
            | EngineError::DataPlane { hint, .. } => hint.as_deref(),
            _ => None,
        }
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.hint() {
            Some(h) => write!(f, "{} ({h})", self.what()),
            None => write!(f, "{}", self.what()),
        }
    }
}

impl std::error::Error for EngineError {}

//! Listening sockets for the agent's byte streams (log stream, stdio):
//! AF_VSOCK in the guest, unix sockets in host mode.
//!
//! The ttrpc server binds its own listener from the same address strings
//! (`unix:///path`, `vsock://<cid>:<port>` with cid `-1` for any).

use std::path::PathBuf;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

/// An address to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Vsock { cid: u32, port: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("listen address {0:?} is neither unix:///path nor vsock://<cid>:<port>")]
    BadAddress(String),
    #[error("Failed to bind {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to accept a connection on {addr}")]
    Accept {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl ListenAddr {
    /// A vsock address that accepts connections for any CID (the guest's).
    pub fn vsock_any(port: u32) -> Self {
        ListenAddr::Vsock {
            cid: VMADDR_CID_ANY,
            port,
        }
    }

    /// Parses `unix:///path` or `vsock://<cid>:<port>` (`-1` = any cid).
    pub fn parse(s: &str) -> Result<Self, ListenerError> {
        let bad = || ListenerError::BadAddress(s.to_string());
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            let cid = if cid.trim() == "-1" {
                VMADDR_CID_ANY
            } else {
                cid.parse().map_err(|_| bad())?
            };
            let port = port.parse().map_err(|_| bad())?;
            return Ok(ListenAddr::Vsock { cid, port });
        }
        Err(bad())
    }

    /// The address in the form ttrpc's `Server::bind` takes.
    pub fn to_ttrpc(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix://{}", p.display()),
            ListenAddr::Vsock { cid, port } if *cid == VMADDR_CID_ANY => {
                write!(f, "vsock://-1:{port}")
            }
            ListenAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
        }
    }
}

/// A connected byte stream, whatever the socket family.
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

pub type BoxConn = Pin<Box<dyn Conn>>;

/// A bound listener.
pub enum Listener {
    Unix(UnixListener, String),
    Vsock(VsockListener, String),
}

impl Listener {
    /// Binds `addr`. A stale unix socket file at the path is replaced.
    pub fn bind(addr: &ListenAddr) -> Result<Self, ListenerError> {
        let name = addr.to_string();
        let bind_err = |source| ListenerError::Bind {
            addr: name.clone(),
            source,
        };
        match addr {
            ListenAddr::Unix(path) => {
                remove_stale_socket(path);
                let l = UnixListener::bind(path).map_err(bind_err)?;
                Ok(Listener::Unix(l, name))
            }
            ListenAddr::Vsock { cid, port } => {
                let l = VsockListener::bind(VsockAddr::new(*cid, *port)).map_err(bind_err)?;
                Ok(Listener::Vsock(l, name))
            }
        }
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> Result<BoxConn, ListenerError> {
        let accept_err = |addr: &String, source| ListenerError::Accept {
            addr: addr.clone(),
            source,
        };
        match self {
            Listener::Unix(l, addr) => {
                let (s, _) = l.accept().await.map_err(|e| accept_err(addr, e))?;
                Ok(Box::pin(s))
            }
            Listener::Vsock(l, addr) => {
                let (s, _) = l.accept().await.map_err(|e| accept_err(addr, e))?;
                Ok(Box::pin(s))
            }
        }
    }

    pub fn addr(&self) -> &str {
        match self {
            Listener::Unix(_, a) | Listener::Vsock(_, a) => a,
        }
    }
}

/// Removes `path` if it is a socket left behind by an earlier run; anything
/// else is left alone so that bind reports it.
pub fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_addresses() {
        let u = ListenAddr::parse("unix:///tmp/a.sock").unwrap();
        assert_eq!(u, ListenAddr::Unix("/tmp/a.sock".into()));
        assert_eq!(u.to_string(), "unix:///tmp/a.sock");
        let v = ListenAddr::parse("vsock://-1:1024").unwrap();
        assert_eq!(v, ListenAddr::vsock_any(1024));
        assert_eq!(v.to_ttrpc(), "vsock://-1:1024");
        assert_eq!(
            ListenAddr::parse("vsock://3:1026").unwrap(),
            ListenAddr::Vsock { cid: 3, port: 1026 }
        );
        for bad in [
            "",
            "unix://",
            "tcp://x:1",
            "vsock://1024",
            "vsock://a:b",
            "/tmp/a",
        ] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad}");
        }
    }
}

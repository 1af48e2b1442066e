//! Listening sockets for the agent's byte streams (log stream, stdio):
//! AF_VSOCK in the guest, unix sockets in host mode.
//!
//! The ttrpc server binds its own listener from the same address strings
//! (`unix:///path`, `vsock://<cid>:<port>` with cid `-1` for any).

use std::path::PathBuf;
use std::pin::Pin;

use futures::stream::unfold;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};

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

    /// Waits for the next connection (on vsock, the next one from the host).
    pub async fn accept(&self) -> Result<BoxConn, ListenerError> {
        match self {
            Listener::Unix(l, addr) => {
                let (s, _) = l.accept().await.map_err(|e| accept_error(addr, e))?;
                Ok(Box::pin(s))
            }
            Listener::Vsock(l, addr) => Ok(Box::pin(accept_from_host(l, addr).await?)),
        }
    }

    /// The listener for the ttrpc server: the same accept as
    /// [`Listener::accept`], so the agent API also answers the host only.
    pub fn into_ttrpc(self) -> ttrpc::asynchronous::transport::Listener {
        use ttrpc::asynchronous::transport::Listener as TtrpcListener;
        let to_io = |e: ListenerError| std::io::Error::other(e.to_string());
        match self {
            Listener::Unix(l, addr) => TtrpcListener::new(unfold((l, addr), |(l, addr)| async {
                let next = l.accept().await.map(|(s, _)| s);
                Some((next, (l, addr)))
            })),
            Listener::Vsock(l, addr) => {
                TtrpcListener::new(unfold((l, addr), move |(l, addr)| async move {
                    let next = accept_from_host(&l, &addr).await.map_err(to_io);
                    Some((next, (l, addr)))
                }))
            }
        }
    }

    pub fn addr(&self) -> &str {
        match self {
            Listener::Unix(_, a) | Listener::Vsock(_, a) => a,
        }
    }
}

fn accept_error(addr: &str, source: std::io::Error) -> ListenerError {
    ListenerError::Accept {
        addr: addr.to_owned(),
        source,
    }
}

/// Whether a vsock peer may use the agent's ports: the host only. Inside
/// the guest, a container can open AF_VSOCK sockets too and reach the
/// agent through the loopback CID 1 or the guest's own CID; with the
/// agent API it could start a privileged container or read others' stdio.
pub fn vsock_peer_allowed(peer_cid: u32) -> bool {
    peer_cid == VMADDR_CID_HOST
}

/// Accepts connections on `l` until one comes from the host; any other
/// peer's is closed at once and logged.
async fn accept_from_host(l: &VsockListener, addr: &str) -> Result<VsockStream, ListenerError> {
    loop {
        let (stream, peer) = l.accept().await.map_err(|e| accept_error(addr, e))?;
        if vsock_peer_allowed(peer.cid()) {
            return Ok(stream);
        }
        tracing::warn!(
            addr,
            peer_cid = peer.cid(),
            peer_port = peer.port(),
            "refused a vsock connection: only the host (CID 2) may connect to the agent"
        );
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
    fn only_the_host_may_connect_over_vsock() {
        assert!(vsock_peer_allowed(2));
        // The loopback CID, the guest's own CID (3 under both backends),
        // "any" and the hypervisor's CID are all refused.
        for cid in [0, 1, 3, 4, VMADDR_CID_ANY] {
            assert!(!vsock_peer_allowed(cid), "CID {cid}");
        }
    }

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

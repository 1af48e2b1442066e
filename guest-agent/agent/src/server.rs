//! Wires the listeners to the agent and runs until the sandbox is
//! destroyed (or, in host mode, a signal arrives).

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use ttrpc::r#async::Server;

use crate::agent::{Agent, Shutdown};
use crate::config::Mode;
use crate::listener::{Listener, ListenerError};
use crate::logging::LogHub;
use crate::reaper::ReaperError;
use crate::rpc::AgentService;

/// Time between finishing DestroySandbox and rebooting/exiting, so the
/// reply can leave the agent and cross vsock first.
pub const REPLY_GRACE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("Failed to start the ttrpc server on {addr}")]
    Ttrpc {
        addr: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error(transparent)]
    Reaper(#[from] ReaperError),
    #[error("Failed to install the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// DestroySandbox: reboot (guest) or exit 0 (host).
    Destroyed,
    /// Host mode only: SIGTERM or SIGINT.
    Signalled,
}

/// Starts the reaper and every listener, then waits for the end.
pub async fn run(agent: Arc<Agent>, hub: Arc<LogHub>) -> Result<Ended, ServerError> {
    let config = &agent.config;
    let _reaper = agent.reaper.start()?;

    if let Some(addr) = &config.log_listen {
        match Listener::bind(addr) {
            Ok(l) => {
                tracing::info!(addr = l.addr(), "log stream listening");
                tokio::spawn(crate::logging::stream::serve(l, hub));
            }
            Err(e) if config.mode == Mode::Guest => {
                tracing::error!(error = %boxlite_protocol::error_chain::chain(&e), "no log stream")
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(addr) = &config.stdio_listen {
        match Listener::bind(addr) {
            Ok(l) => {
                tracing::info!(addr = l.addr(), "stdio streams listening");
                tokio::spawn(crate::stdio::serve(l, agent.clone()));
            }
            Err(e) if config.mode == Mode::Guest => {
                tracing::error!(error = %boxlite_protocol::error_chain::chain(&e), "no stdio streams")
            }
            Err(e) => return Err(e.into()),
        }
    }

    let addr = config.listen.to_ttrpc();
    let ttrpc_err = |source| ServerError::Ttrpc {
        addr: addr.clone(),
        source,
    };
    // Bound here rather than by ttrpc so that its accept is ours: on vsock
    // the agent API answers the host only (listener::vsock_peer_allowed).
    let listener = Listener::bind(&config.listen)?;
    let mut server = Server::new()
        .add_listener(listener.into_ttrpc())
        .register_service(AgentService::new(agent.clone()).services());
    server.start().await.map_err(ttrpc_err)?;
    tracing::info!(
        version = crate::AGENT_VERSION,
        protocol = boxlite_protocol::PROTOCOL_VERSION,
        mode = ?config.mode,
        %addr,
        "agent ready"
    );
    if let Some(addr) = config.announce.clone() {
        // Not awaited: serving does not depend on it. Without it the host
        // never connects, and says so naming the announce port.
        tokio::spawn(async move {
            if let Err(e) = crate::announce::announce(&addr).await {
                tracing::error!(error = %boxlite_protocol::error_chain::chain(&e), "the host will not connect");
            }
        });
    }

    let mut shutdown = agent.shutdown_requested();
    let destroyed = async move {
        // The sender lives in `agent`, which outlives this future.
        let _ = shutdown.wait_for(|s| *s == Shutdown::Destroyed).await;
    };
    let ended = match config.mode {
        Mode::Guest => {
            destroyed.await;
            Ended::Destroyed
        }
        Mode::Host => {
            let mut term =
                signal(SignalKind::terminate()).map_err(|e| ServerError::Signal("SIGTERM", e))?;
            let mut int =
                signal(SignalKind::interrupt()).map_err(|e| ServerError::Signal("SIGINT", e))?;
            tokio::select! {
                _ = destroyed => Ended::Destroyed,
                _ = term.recv() => Ended::Signalled,
                _ = int.recv() => Ended::Signalled,
            }
        }
    };
    if ended == Ended::Destroyed {
        tokio::time::sleep(REPLY_GRACE).await;
    }
    Ok(ended)
}

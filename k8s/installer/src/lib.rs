//! `boxlite-node-installer`: installs BoxLite on a Kubernetes node from a
//! privileged DaemonSet pod (docs/install-kubernetes.md, "Install with the
//! DaemonSet").

pub mod containerd_config;
pub mod fsutil;
pub mod host_ns;
pub mod install;
pub mod node_label;
pub mod payload;

/// One line per action, to stdout (the pod log), and kept for tests.
#[derive(Debug, Default)]
pub struct Log {
    pub lines: Vec<String>,
    /// Print each line as it is added.
    pub echo: bool,
}

impl Log {
    pub fn printing() -> Self {
        Self {
            lines: Vec::new(),
            echo: true,
        }
    }

    pub fn action(&mut self, line: impl Into<String>) {
        let line = line.into();
        if self.echo {
            println!("boxlite-node-installer: {line}");
        }
        self.lines.push(line);
    }
}

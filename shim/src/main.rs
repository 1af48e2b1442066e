//! `containerd-shim-boxlite-v2`: containerd starts it as
//! `containerd-shim-boxlite-v2 -namespace NS -address ADDR -id ID start`
//! (and `... delete`), and the daemon it spawns serves the task API.

use boxlite_shim::shim::{shim_config, BoxliteShim, RUNTIME_ID};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--version" || a == "-version" || a == "-v") {
        println!("{RUNTIME_ID} {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    containerd_shim::asynchronous::run::<BoxliteShim>(RUNTIME_ID, Some(shim_config())).await;
}

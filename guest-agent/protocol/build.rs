//! Generates the protobuf messages and async ttrpc stubs for the agent API
//! with ttrpc-codegen's pure-Rust parser (no system `protoc` needed).
//!
//! The generated files carry inner attributes (`#![allow(..)]`) and inner doc
//! comments, which `include!` cannot take, so they are rewritten after
//! generation; the including modules in `src/lib.rs` set the lints instead.

use std::fs;
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &["protos/health.proto", "protos/agent.proto"];

fn main() {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    Codegen::new()
        .out_dir(&out_dir)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc-codegen failed on protos/*.proto");

    for name in ["health", "health_ttrpc", "agent", "agent_ttrpc"] {
        strip_inner_attributes(&out_dir.join(format!("{name}.rs")));
    }
}

fn strip_inner_attributes(path: &Path) {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("generated file {} is missing: {e}", path.display()));
    let kept: Vec<String> = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("#!["))
        .map(|line| {
            // Inner doc comments are only legal at the top of a real module.
            line.strip_prefix("//!")
                .map_or(line.to_string(), |rest| format!("//{rest}"))
        })
        .collect();
    fs::write(path, kept.join("\n"))
        .unwrap_or_else(|e| panic!("cannot rewrite {}: {e}", path.display()));
}

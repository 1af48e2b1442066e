//! Entry points for fuzzing what the host parses from the guest (or from a
//! process the guest can compromise): one function per input kind, each
//! taking arbitrary bytes and required never to panic, hang or allocate
//! without bound. `shim/fuzz/` runs them under cargo-fuzz (nightly); the
//! test below runs them on pseudo-random and mutated valid inputs on every
//! `cargo test`. The VMM's own parsers (virtqueues, vsock packets) have
//! their targets in `runtime/vmm/fuzz/`.

use boxlite_protocol::agent::StatsContainerResponse;
use boxlite_protocol::ready::Announcement;
use boxlite_protocol::stdio::{read_ack, StreamHeader};
use protobuf::Message;

/// The readiness line the agent sends on vsock port 1027.
pub fn ready_announcement(data: &[u8]) {
    let _ = Announcement::parse(data);
}

/// A stdio stream's set-up: the ack the guest answers the shim's header
/// with (read by the shim), and the header itself (read by the agent).
pub fn stdio_stream(data: &[u8]) {
    let _ = read_ack(&mut &data[..]);
    let _ = StreamHeader::decode(data);
    let _ = StreamHeader::read_from(&mut &data[..]);
}

/// The hybrid vsock `OK <port>` reply line (from the VMM or vsock backend).
pub fn hybrid_vsock_reply(data: &[u8]) {
    let _ = boxlite_runtime::hybrid_vsock::parse_reply(data);
}

/// `/proc/self/mountinfo`, whose mount points under the share the guest
/// names: parsed as bytes, then filtered to a sandbox directory.
pub fn mountinfo(data: &[u8]) {
    let _ = boxlite_protocol::mountinfo::parse(data);
    let _ = boxlite_protocol::mountinfo::mount_points_under(
        data,
        std::path::Path::new("/run/boxlite/sb1"),
    );
}

/// An agent's StatsContainer reply, decoded and turned into containerd's
/// metrics (the figures are the guest's to choose).
pub fn agent_stats_reply(data: &[u8]) {
    if let Ok(stats) = StatsContainerResponse::parse_from_bytes(data) {
        let _ = crate::convert::stats_any(&stats);
    }
}

/// containerd's stdout/stderr URI (`file://`, `binary://…?k=v`, `fifo://`,
/// a path), percent-decoded byte-wise.
pub fn stdio_uri(data: &[u8]) {
    let _ = crate::stdio::OutputTarget::parse(&String::from_utf8_lossy(data));
}

/// The VMM control socket's two sides: the reply line the runtime reads
/// from `boxlite-vmm` (hostile once the VMM is compromised) and the request
/// line the VMM reads.
pub fn vmm_control(data: &[u8]) {
    let _ = boxlite_vmm_api::control::Reply::from_line(&String::from_utf8_lossy(data));
    let _ = boxlite_vmm_api::control::Request::from_line(data);
}

/// A fuzz entry point: its name (the cargo-fuzz target's) and function.
pub type EntryPoint = (&'static str, fn(&[u8]));

/// Every entry point (for this crate's test).
pub const ENTRY_POINTS: &[EntryPoint] = &[
    ("ready_announcement", ready_announcement),
    ("stdio_stream", stdio_stream),
    ("hybrid_vsock_reply", hybrid_vsock_reply),
    ("mountinfo", mountinfo),
    ("agent_stats_reply", agent_stats_reply),
    ("stdio_uri", stdio_uri),
    ("vmm_control", vmm_control),
];

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::agent::{CpuStats, MemoryStats};
    use boxlite_protocol::stdio::{encode_ack, StreamKind};

    /// Valid inputs of each kind, to mutate: random bytes alone rarely get
    /// past the first check.
    fn seeds() -> Vec<Vec<u8>> {
        let mut stats = StatsContainerResponse::new();
        stats.cpu = Some(CpuStats {
            usage_usec: u64::MAX,
            ..Default::default()
        })
        .into();
        let mut mem = MemoryStats::new();
        mem.stat.insert("anon".into(), u64::MAX);
        stats.memory = Some(mem).into();
        let header = StreamHeader {
            stream: StreamKind::Stdout,
            container_id: "c1".into(),
            exec_id: "e1".into(),
        };
        vec![
            b"BOXLITE-READY 1 0.1.0\n".to_vec(),
            encode_ack(Ok(())),
            encode_ack(Err("no such process")),
            header.encode().unwrap(),
            b"OK 1073741824\n".to_vec(),
            b"36 35 98:0 /mnt1 /run/boxlite/sb1/shared/c1/rootfs rw,noatime master:1 - ext3 /dev/root rw\n"
                .to_vec(),
            b"36 35 98:0 / /run/boxlite/sb1/a\\040b\\134\\777 rw - tmpfs x rw\n".to_vec(),
            stats.write_to_bytes().unwrap(),
            b"binary:///usr/bin/logger?id=%E2%82%AC&x=%zz%".to_vec(),
            b"{\"ok\":true,\"state\":\"running\",\"uptime_ms\":5,\"vcpus\":1}\n".to_vec(),
            b"{\"op\":\"status\"}\n".to_vec(),
        ]
    }

    #[test]
    fn fuzz_entry_points_survive_random_and_mutated_input() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = seeds();
        // The seeds are what they claim to be, so mutations start valid.
        assert!(Announcement::parse(&seeds[0]).is_ok());
        assert!(read_ack(&mut &seeds[1][..]).is_ok());
        assert!(StreamHeader::decode(&seeds[3]).is_ok());
        assert_eq!(
            boxlite_runtime::hybrid_vsock::parse_reply(&seeds[4]).unwrap(),
            Some(1 << 30)
        );
        assert_eq!(boxlite_protocol::mountinfo::parse(&seeds[5]).len(), 1);
        assert!(StatsContainerResponse::parse_from_bytes(&seeds[7]).is_ok());
        assert!(crate::stdio::OutputTarget::parse(std::str::from_utf8(&seeds[8]).unwrap()).is_ok());
        assert!(boxlite_vmm_api::control::Reply::from_line(
            std::str::from_utf8(&seeds[9]).unwrap()
        )
        .is_ok());
        assert!(boxlite_vmm_api::control::Request::from_line(&seeds[10]).is_ok());
        for round in 0..3000 {
            let input: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 512) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let mut s = seeds[(next() as usize) % seeds.len()].clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % (s.len() + 1);
                    match next() % 3 {
                        0 if at < s.len() => s[at] = next() as u8,
                        1 => s.insert(at, next() as u8),
                        _ => s.truncate(at),
                    }
                }
                s
            };
            for (_, entry) in ENTRY_POINTS {
                entry(&input);
            }
        }
    }
}

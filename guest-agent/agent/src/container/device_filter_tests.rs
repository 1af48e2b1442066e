//! The device program: its semantics on a small interpreter of the
//! instructions it uses (table-driven, no root), and the real kernel
//! loading and enforcing it on a cgroup v2 directory (root, ignored).

use super::*;

/// Runs `prog` on a device request the way the kernel's BPF interpreter
/// does for the instructions we emit; returns r0.
fn run(prog: &[u64], dev_type: u32, access: u32, major: u32, minor: u32) -> u64 {
    let ctx = [(access << 16) | dev_type, major, minor];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    for _ in 0..10_000 {
        let i = prog[pc];
        let code = (i & 0xff) as u8;
        let dst = ((i >> 8) & 0xf) as usize;
        let src = ((i >> 12) & 0xf) as usize;
        let off = (i >> 16) as u16 as i16;
        let imm = (i >> 32) as u32 as i32;
        pc += 1;
        let jump = |pc: usize| (pc as i64 + i64::from(off)) as usize;
        match code {
            insn::LDX_W => {
                assert_eq!(src, 1, "loads only from the context");
                r[dst] = u64::from(ctx[(off / 4) as usize]);
            }
            insn::MOV32_X => r[dst] = r[src] & 0xffff_ffff,
            insn::AND32_K => r[dst] = (r[dst] & 0xffff_ffff) & u64::from(imm as u32),
            insn::RSH32_K => r[dst] = (r[dst] & 0xffff_ffff) >> imm,
            insn::MOV64_K => r[dst] = imm as i64 as u64,
            insn::JEQ_K if r[dst] == imm as i64 as u64 => pc = jump(pc),
            insn::JNE_K if r[dst] != imm as i64 as u64 => pc = jump(pc),
            insn::JEQ_K | insn::JNE_K => {}
            insn::JA => pc = jump(pc),
            insn::EXIT => return r[0],
            other => panic!("unexpected opcode {other:#x}"),
        }
    }
    panic!("program did not end");
}

fn rule(allow: bool, t: Option<u32>, major: Option<u32>, minor: Option<u32>, acc: &str) -> Rule {
    Rule {
        allow,
        dev_type: t,
        major,
        minor,
        access: parse_access(Some(acc)).unwrap(),
    }
}

const C: u32 = DEV_CHAR;
const B: u32 = DEV_BLOCK;
const M: u32 = ACC_MKNOD;
const R: u32 = ACC_READ;
const W: u32 = ACC_WRITE;

#[test]
fn later_rules_override_earlier_ones_per_access_bit() {
    let rules = [
        rule(false, None, None, None, "rwm"),         // deny all
        rule(true, Some(C), Some(1), Some(3), "rwm"), // allow null
        rule(false, Some(C), Some(1), Some(3), "w"),  // but not writes
        rule(true, Some(C), Some(136), None, "rw"),   // ptys, any minor
        rule(true, Some(B), Some(8), Some(0), "r"),   // read sda
        rule(true, None, None, Some(7), "m"),         // mknod any x:7
    ];
    let prog = program(&rules).unwrap();
    let table = [
        (C, R, 1, 3, 1),
        (C, W, 1, 3, 0),
        (C, R | W, 1, 3, 0), // one denied bit denies the request
        (C, M, 1, 3, 1),
        (C, R, 1, 5, 0), // named by no allow rule
        (C, R | W, 136, 4, 1),
        (C, M, 136, 4, 0),
        (B, R, 136, 4, 0), // type matters
        (B, R, 8, 0, 1),
        (B, W, 8, 0, 0),
        (B, R, 8, 1, 0),
        (B, M, 9, 7, 1),
        (C, M, 200, 7, 1),
        (C, R, 200, 7, 0),
    ];
    for (t, acc, major, minor, want) in table {
        assert_eq!(
            run(&prog, t, acc, major, minor),
            want,
            "type {t} access {acc:#b} {major}:{minor}"
        );
    }
}

#[test]
fn allow_all_and_no_rules() {
    let prog = program(&[rule(true, None, None, None, "rwm")]).unwrap();
    assert_eq!(run(&prog, B, R | W | M, 8, 0), 1);
    let prog = program(&[]).unwrap();
    assert_eq!(run(&prog, C, R, 1, 3), 0, "no rule: denied");
}

#[test]
fn container_rules_follow_runc() {
    // containerd's default: deny all, then its allows; a device node the
    // spec lists but no rule allows stays closed, as under runc.
    let linux: Linux = serde_json::from_value(serde_json::json!({
        "resources": {"devices": [
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 1, "access": "r"},
            {"allow": false, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": true, "type": "p", "access": "rwm"}
        ]},
        "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
    }))
    .unwrap();
    let rules = container_rules(&linux).unwrap();
    let prog = program(&rules).unwrap();
    // The spec's allow and runc's list apply; runc's list comes after the
    // spec, so /dev/null stays usable.
    for (major, minor) in [(1, 1), (1, 3), (1, 5), (5, 2), (136, 0), (10, 200)] {
        assert_eq!(run(&prog, C, R, major, minor), 1, "{major}:{minor}");
    }
    assert_eq!(run(&prog, C, R, 10, 229), 0, "listed, not allowed");
    assert_eq!(run(&prog, C, W, 1, 1), 0, "only r was allowed for 1:1");
    assert_eq!(run(&prog, B, R, 8, 0), 0, "a disk");
    assert_eq!(run(&prog, B, M, 8, 0), 1, "mknod of anything, as runc");
}

#[test]
fn bad_rules_are_named() {
    let linux: Linux = serde_json::from_value(serde_json::json!({
        "resources": {"devices": [
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwx"}
        ]}
    }))
    .unwrap();
    let err = container_rules(&linux).unwrap_err();
    assert!(err.contains("linux.resources.devices[1]"), "{err}");
    assert!(err.contains("'x'"), "{err}");
}

/// The kernel accepts the program and enforces it: a child moved into a
/// fresh cgroup v2 directory with only /dev/null allowed can open
/// /dev/null and not /dev/zero.
#[test]
#[ignore = "needs root and a cgroup v2 hierarchy"]
fn kernel_enforces_the_program() {
    // The v2 hierarchy: /sys/fs/cgroup itself, or its `unified` part on a
    // hybrid host (both have cgroup.controllers only when they are v2).
    let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("cgroup.controllers").exists())
        .expect("a cgroup v2 mount");
    let dir = root.join(format!("boxlite-devfilter-{}", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    let rules = [
        rule(false, None, None, None, "rwm"),
        rule(true, Some(C), Some(1), Some(3), "rw"),
    ];
    attach(&dir, &rules).unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && head -c0 /dev/null && echo null-ok; \
             head -c1 /dev/zero >/dev/null 2>&1 && echo zero-ok || echo zero-denied",
            dir.display()
        ))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&dir);
    let out = String::from_utf8_lossy(&child.stdout);
    assert_eq!(
        out,
        "null-ok\nzero-denied\n",
        "stderr: {}",
        String::from_utf8_lossy(&child.stderr)
    );
}

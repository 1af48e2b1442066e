//! `linux.resources.devices` on cgroup v2: an eBPF program of type
//! `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the container's cgroup, which
//! the kernel asks on every mknod and open of a device node.
//!
//! cgroup v2 has no `devices.allow` file; runc and crun generate such a
//! program, and youki's `libcgroups` does too behind its `cgroupsv2_devices`
//! feature, which needs libbpf (the agent is a static binary without it).
//! The program is small enough to emit and load ourselves: a handful of
//! instruction kinds and two `bpf(2)` calls.
//!
//! Semantics are those of cgroup v1's device lists and runc: rules apply in
//! order and a later rule overrides an earlier one, per access bit (`m`,
//! `r`, `w`); a request is allowed only if each of its bits is; a device no
//! rule names is denied. Like runc, every container also gets the rules of
//! runc's allowed list (mknod of any node, the standard devices, ptys, tun)
//! after the spec's rules. A node in `linux.devices` is usable only if a
//! rule allows it, as under runc (containerd writes those rules).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{Linux, LinuxDeviceCgroup, LinuxDeviceType};

/// Access bits of `struct bpf_cgroup_dev_ctx.access_type >> 16`.
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
/// Device types of `access_type & 0xffff`.
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;

/// One rule as the program checks it (`None` = any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// `DEV_BLOCK` or `DEV_CHAR`; `None` for `a`.
    pub dev_type: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// `ACC_*` bits.
    pub access: u32,
}

impl Rule {
    fn char(major: u32, minor: Option<u32>, access: u32) -> Self {
        Rule {
            allow: true,
            dev_type: Some(DEV_CHAR),
            major: Some(major),
            minor,
            access,
        }
    }
}

/// Parses an OCI access string ("rwm", any subset; empty or absent = all).
fn parse_access(access: Option<&str>) -> Result<u32, String> {
    let s = access.unwrap_or("");
    if s.is_empty() {
        return Ok(ACC_MKNOD | ACC_READ | ACC_WRITE);
    }
    s.chars().try_fold(0, |acc, c| match c {
        'm' => Ok(acc | ACC_MKNOD),
        'r' => Ok(acc | ACC_READ),
        'w' => Ok(acc | ACC_WRITE),
        other => Err(format!("unknown access {other:?} (expected r, w, m)")),
    })
}

/// A major or minor number: -1 or absent is any.
fn parse_number(n: Option<i64>, what: &str) -> Result<Option<u32>, String> {
    match n {
        None | Some(-1) => Ok(None),
        Some(v) => u32::try_from(v)
            .map(Some)
            .map_err(|_| format!("{what} {v} is out of range")),
    }
}

/// One spec rule; `None` for rules the device controller does not govern
/// (type `p`, FIFOs).
fn convert(rule: &LinuxDeviceCgroup) -> Result<Option<Rule>, String> {
    let dev_type = match rule.typ() {
        None | Some(LinuxDeviceType::A) => None,
        Some(LinuxDeviceType::B) => Some(DEV_BLOCK),
        Some(LinuxDeviceType::C | LinuxDeviceType::U) => Some(DEV_CHAR),
        Some(LinuxDeviceType::P) => return Ok(None),
    };
    Ok(Some(Rule {
        allow: rule.allow(),
        dev_type,
        major: parse_number(rule.major(), "major")?,
        minor: parse_number(rule.minor(), "minor")?,
        access: parse_access(rule.access().as_deref())?,
    }))
}

/// runc's allowed list, applied after the spec's rules: mknod of any
/// character or block node, and full access to null, random, full, tty,
/// zero, urandom, console, the ptys, ptmx and tun.
fn runc_allowed() -> Vec<Rule> {
    let rwm = ACC_MKNOD | ACC_READ | ACC_WRITE;
    let mut rules = vec![
        Rule {
            allow: true,
            dev_type: Some(DEV_CHAR),
            major: None,
            minor: None,
            access: ACC_MKNOD,
        },
        Rule {
            allow: true,
            dev_type: Some(DEV_BLOCK),
            major: None,
            minor: None,
            access: ACC_MKNOD,
        },
    ];
    for (major, minor) in [
        (1, 3),
        (1, 8),
        (1, 7),
        (5, 0),
        (1, 5),
        (1, 9),
        (5, 1),
        (5, 2),
    ] {
        rules.push(Rule::char(major, Some(minor), rwm));
    }
    rules.push(Rule::char(136, None, rwm));
    rules.push(Rule::char(10, Some(200), rwm));
    rules
}

/// The rules a container's program enforces: the spec's
/// `linux.resources.devices` in order, then runc's allowed list. Errors
/// name the offending rule.
pub fn container_rules(linux: &Linux) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    let spec_rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_ref());
    for (i, rule) in spec_rules.into_iter().flatten().enumerate() {
        if let Some(r) = convert(rule).map_err(|e| format!("linux.resources.devices[{i}]: {e}"))? {
            rules.push(r);
        }
    }
    rules.extend(runc_allowed());
    Ok(rules)
}

/// eBPF instruction encoding (`struct bpf_insn`), only what the program uses.
mod insn {
    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    pub const R4: u8 = 4;
    pub const R5: u8 = 5;
    pub const R6: u8 = 6;

    /// `dst = *(u32 *)(src + off)`
    pub const LDX_W: u8 = 0x61;
    /// 32-bit `dst = src`, `dst &= imm`, `dst >>= imm`
    pub const MOV32_X: u8 = 0xbc;
    pub const AND32_K: u8 = 0x54;
    pub const RSH32_K: u8 = 0x74;
    /// 64-bit `dst = imm`
    pub const MOV64_K: u8 = 0xb7;
    /// `if dst == imm goto +off`, `if dst != imm goto +off`, `goto +off`
    pub const JEQ_K: u8 = 0x15;
    pub const JNE_K: u8 = 0x55;
    pub const JA: u8 = 0x05;
    pub const EXIT: u8 = 0x95;

    pub fn encode(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        u64::from(code)
            | (u64::from(dst & 0xf) << 8)
            | (u64::from(src & 0xf) << 12)
            | (u64::from(off as u16) << 16)
            | (u64::from(imm as u32) << 32)
    }
}

/// A program under construction: instructions plus jumps to labels that
/// are resolved once every label is placed.
#[derive(Default)]
struct Emitter {
    code: Vec<(u8, u8, u8, i16, i32)>,
    /// (instruction index, label)
    jumps: Vec<(usize, usize)>,
    labels: Vec<Option<usize>>,
}

impl Emitter {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.code.push((code, dst, src, off, imm));
    }

    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn place(&mut self, label: usize) {
        self.labels[label] = Some(self.code.len());
    }

    fn jump(&mut self, code: u8, dst: u8, imm: i32, label: usize) {
        self.jumps.push((self.code.len(), label));
        self.op(code, dst, 0, 0, imm);
    }

    fn ret(&mut self, value: i32) {
        self.op(insn::MOV64_K, insn::R0, 0, 0, value);
        self.op(insn::EXIT, 0, 0, 0, 0);
    }

    fn finish(mut self) -> Result<Vec<u64>, String> {
        for (at, label) in std::mem::take(&mut self.jumps) {
            let target = self.labels[label].ok_or("device filter: unplaced label")?;
            let off = i16::try_from(target as i64 - at as i64 - 1)
                .map_err(|_| "device filter: too many rules for one program".to_string())?;
            self.code[at].3 = off;
        }
        Ok(self
            .code
            .into_iter()
            .map(|(c, d, s, o, i)| insn::encode(c, d, s, o, i))
            .collect())
    }
}

/// Compiles `rules` into a cgroup device program: for each access bit the
/// request has, the last rule that names the device and that bit decides;
/// no such rule denies.
pub fn program(rules: &[Rule]) -> Result<Vec<u64>, String> {
    use insn::*;
    let mut e = Emitter::default();
    // r1 = struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }
    e.op(LDX_W, R2, R1, 0, 0);
    e.op(MOV32_X, R3, R2, 0, 0);
    e.op(RSH32_K, R3, 0, 0, 16); // r3 = access bits
    e.op(AND32_K, R2, 0, 0, 0xffff); // r2 = device type
    e.op(LDX_W, R4, R1, 4, 0); // r4 = major
    e.op(LDX_W, R5, R1, 8, 0); // r5 = minor
    for bit in [ACC_MKNOD, ACC_READ, ACC_WRITE] {
        let bit_allowed = e.label();
        e.op(MOV32_X, R6, R3, 0, 0);
        e.op(AND32_K, R6, 0, 0, bit as i32);
        e.jump(JEQ_K, R6, 0, bit_allowed); // bit not requested
                                           // The verifier refuses unreachable code: after a rule that matches
                                           // every device, nothing more is emitted for this bit.
        let mut decided = false;
        for rule in rules.iter().rev().filter(|r| r.access & bit != 0) {
            let next = e.label();
            let conditional =
                rule.dev_type.is_some() || rule.major.is_some() || rule.minor.is_some();
            if let Some(t) = rule.dev_type {
                e.jump(JNE_K, R2, t as i32, next);
            }
            if let Some(major) = rule.major {
                e.jump(JNE_K, R4, major as i32, next);
            }
            if let Some(minor) = rule.minor {
                e.jump(JNE_K, R5, minor as i32, next);
            }
            if rule.allow {
                e.jump(JA, 0, 0, bit_allowed);
            } else {
                e.ret(0);
            }
            e.place(next);
            if !conditional {
                decided = true;
                break;
            }
        }
        if !decided {
            e.ret(0); // no rule names this device for this bit
        }
        e.place(bit_allowed);
    }
    e.ret(1);
    e.finish()
}

/// `bpf(2)` commands, program and attach types, flags.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The leading fields of `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of union
    // bpf_attr and its exact size is passed; the kernel reads (and for some
    // commands writes) only within that size. Pointers inside it point to
    // buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads `prog`; on refusal, loads it again with the verifier log and
/// returns that in the error.
fn load(prog: &[u64]) -> Result<OwnedFd, String> {
    const LICENSE: &[u8] = b"Apache-2.0\0";
    let mut name = [0u8; 16];
    name[..14].copy_from_slice(b"boxlite_device");
    let attr = |log: &mut Vec<u8>| ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: u32::from(!log.is_empty()),
        log_size: log.len() as u32,
        // No log: the pointer must be null too, or the kernel says EINVAL.
        log_buf: if log.is_empty() {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    let mut no_log = Vec::new();
    match bpf(BPF_PROG_LOAD, &mut attr(&mut no_log)) {
        // SAFETY: BPF_PROG_LOAD returned a new fd that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(first) => {
            let mut log = vec![0u8; 64 * 1024];
            let _ = bpf(BPF_PROG_LOAD, &mut attr(&mut log));
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim();
            Err(format!(
                "the kernel refused the device program ({first}){}",
                if text.is_empty() {
                    String::new()
                } else {
                    format!("; verifier: {text}")
                }
            ))
        }
    }
}

/// Loads the program for `rules` and attaches it to the cgroup v2
/// directory `cgroup_dir`. Programs already there stay (ALLOW_MULTI): a
/// device must pass all of them.
pub fn attach(cgroup_dir: &Path, rules: &[Rule]) -> Result<(), String> {
    let prog = load(&program(rules)?)?;
    let dir = std::fs::File::open(cgroup_dir)
        .map_err(|e| format!("cannot open cgroup {}: {e}", cgroup_dir.display()))?;
    let mut attr = ProgAttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map_err(|e| {
        format!(
            "cannot attach the device program to cgroup {}: {e}",
            cgroup_dir.display()
        )
    })?;
    // The attachment holds the program; our fd may go.
    Ok(())
}

#[cfg(test)]
#[path = "device_filter_tests.rs"]
mod tests;

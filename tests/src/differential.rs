//! Differential testing against runc: run the same container (same image,
//! same ctr options, same command) under `io.containerd.runc.v2` and under
//! `io.containerd.boxlite.v2` in one private containerd, and compare what a
//! user sees — each step's stdout, stderr and exit code.
//!
//! A scenario is a closure over a [`Side`]; [`Report::case`] runs it once
//! per runtime (runc first, then BoxLite, one after the other with the
//! same container ids) and compares the two transcripts step by step,
//! after [`normalise`] has applied the [`EXPECTED_DIFFERENCES`] to both.
//! Every other difference is a failure, printed as a diff.
//!
//! The probes in the cases print `key=value` lines; an expected difference
//! names the keys whose values legitimately differ (the guest's kernel is
//! not the host's, the VM has its own CPUs and memory, …) and rewrites
//! those values the same way on both sides. docs/shim.md's section
//! "Differences from runc" lists the same names with the same reasons
//! (a unit test below keeps the two in step).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use boxlite_protocol::mountinfo;

use crate::containerd::{text, Containerd, RUNTIME};

/// containerd's runc shim: the reference.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Runc,
    Boxlite,
}

impl Runtime {
    /// The runtime type `ctr run --runtime` takes.
    pub fn runtime_type(self) -> &'static str {
        match self {
            Runtime::Runc => RUNC_RUNTIME,
            Runtime::Boxlite => RUNTIME,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Boxlite => "boxlite",
        }
    }
}

/// What a user sees of one command: exit code (None: killed by a signal,
/// for ctr itself), stdout, stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn of(out: &Output) -> Outcome {
        Outcome {
            code: out.status.code(),
            stdout: text(&out.stdout),
            stderr: text(&out.stderr),
        }
    }

    /// The outcome as the text the comparison diffs.
    fn render(&self) -> String {
        let code = match self.code {
            Some(c) => c.to_string(),
            None => "killed".to_owned(),
        };
        let mut s = format!("exit code: {code}\n--- stdout\n{}", self.stdout);
        if !self.stdout.is_empty() && !self.stdout.ends_with('\n') {
            s.push_str("\n(no newline at the end)\n");
        }
        s.push_str("--- stderr\n");
        s.push_str(&self.stderr);
        if !self.stderr.is_empty() && !self.stderr.ends_with('\n') {
            s.push_str("\n(no newline at the end)\n");
        }
        s
    }
}

/// One expected difference between runc and BoxLite: the probe keys whose
/// values it explains, and how both sides' values are rewritten so that
/// what remains must be equal.
pub struct ExpectedDifference {
    /// The name docs/shim.md lists it under.
    pub name: &'static str,
    /// Why the two runtimes differ here.
    pub why: &'static str,
    /// Keys (`key=value` lines) it applies to: exact, or a prefix ending
    /// in `*`.
    pub keys: &'static [&'static str],
    /// The line both sides get instead of `key=value`: the rewritten
    /// value, or None to drop the line.
    pub rewrite: fn(key: &str, value: &str) -> Option<String>,
}

fn masked(_: &str, _: &str) -> Option<String> {
    Some("<differs: see docs/shim.md>".to_owned())
}

/// Every difference between runc and BoxLite that the suite accepts. Keep
/// in step with docs/shim.md, "Differences from runc" (same names, same
/// reasons): `tests::list_matches_the_doc` checks.
pub const EXPECTED_DIFFERENCES: &[ExpectedDifference] = &[
    ExpectedDifference {
        name: "kernel",
        why: "the container runs on the guest's kernel (Debian's 6.1 built \
              with configs/guest-kernel.fragment), not the host's",
        keys: &["kernel.release", "kernel.version"],
        rewrite: masked,
    },
    ExpectedDifference {
        name: "boot id",
        why: "the VM booted on its own: /proc/sys/kernel/random/boot_id is the guest's",
        keys: &["kernel.boot_id"],
        rewrite: masked,
    },
    ExpectedDifference {
        name: "VM size",
        why: "the VM has its own CPUs and memory (guest.vcpus, guest.memory_mib), \
              not the host's; so have the limits the kernel sizes from memory at \
              boot (RLIMIT_NPROC and RLIMIT_SIGPENDING: max_threads / 2), which \
              the spec leaves unset and both runtimes inherit",
        keys: &[
            "vm.cpus",
            "vm.mem_total",
            "rlimit.nproc",
            "rlimit.sigpending",
        ],
        rewrite: masked,
    },
    ExpectedDifference {
        name: "cgroup hierarchy",
        why: "the guest mounts cgroup v2 only and the agent puts each container \
              in its own cgroup there; under runc the host's hierarchy shows \
              (here cgroup v1, with its controllers' lines)",
        keys: &["cgroup.self"],
        rewrite: masked,
    },
    ExpectedDifference {
        name: "default hostname",
        why: "a spec without a hostname (ctr run has no --hostname; CRI always \
              sets one) keeps the name of the machine the runtime runs on: the \
              host's under runc, the VM's (`boxlite`, or boxlite.hostname=) \
              under BoxLite",
        keys: &["hostname"],
        rewrite: runtime_host_name,
    },
    ExpectedDifference {
        name: "host files over virtio-fs",
        why: "the rootfs (containerd's snapshot, mounted on the host) and bind \
              volumes reach the guest through virtio-fs, so the container sees \
              `virtiofs` where runc shows `overlay` or the source's file system; \
              the mount flags (ro, nosuid, …) are compared",
        keys: &["mount.*"],
        rewrite: host_files,
    },
    ExpectedDifference {
        name: "masked paths the guest kernel lacks",
        why: "a masked path shows nothing either way: runc hides /proc/acpi and \
              /proc/keys, which the host kernel has, under an empty tmpfs or \
              /dev/null; the guest kernel has no ACPI (microvm) and no keyring \
              (CONFIG_KEYS off), so there is nothing to hide. A masked path \
              that shows content still differs; runc's mounts over the two \
              are left out of the mount lists",
        keys: &["masked.*", "mount./proc/acpi", "mount./proc/keys"],
        rewrite: nothing_visible,
    },
];

/// The host's hostname and the guest's default one (the agent's
/// `boxlite`) are the same thing seen from two runtimes; any other name
/// (the container id, the image's /etc/hostname) stays itself.
fn runtime_host_name(_: &str, value: &str) -> Option<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if value == host.trim() || value == "boxlite" {
        Some("<the runtime host's name>".to_owned())
    } else {
        Some(value.to_owned())
    }
}

/// A masked path that is absent, an empty directory or an empty file
/// shows nothing; anything else is left as it is, to differ. The mounts
/// runc puts over the two the guest lacks are dropped from mount lists.
fn nothing_visible(key: &str, value: &str) -> Option<String> {
    if key.starts_with("mount.") {
        return None;
    }
    match value {
        "ENOENT" | "dir entries 0" | "file bytes 0" => Some("<nothing visible>".to_owned()),
        other => Some(other.to_owned()),
    }
}

/// The file system type of the mount holding `path` on this host (from
/// /proc/self/mountinfo: the longest mount point that is a prefix).
fn host_fstype(path: &Path) -> String {
    let info = std::fs::read(mountinfo::MOUNTINFO).unwrap_or_default();
    mountinfo::parse(&info)
        .into_iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .map(|m| m.fstype)
        .unwrap_or_default()
}

/// A mount of host files: `virtiofs` in the guest; under runc `overlay`
/// (the rootfs, containerd's overlayfs snapshot) or the file system of
/// the volume's source (the harness keeps volumes under the temp dir).
/// Other mounts (tmpfs, proc, …) keep their type, to be compared — unless
/// the host's temp dir is itself on that type (a tmpfs /tmp), when those
/// read `<host files>` on both sides alike.
fn host_files(_: &str, value: &str) -> Option<String> {
    let (fstype, rest) = value.split_once(' ').unwrap_or((value, ""));
    let host = host_fstype(&std::env::temp_dir());
    if fstype == "virtiofs" || fstype == "overlay" || fstype == host {
        Some(format!("<host files> {rest}").trim_end().to_owned())
    } else {
        Some(value.to_owned())
    }
}

/// `key=value` lines whose key an expected difference names get its
/// rewritten value; every other line stays as it is.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, newline) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let rewritten = body.split_once('=').and_then(|(key, value)| {
            // An exact key wins over a prefix (`mount./proc/acpi` over `mount.*`).
            let exact = |d: &&ExpectedDifference| d.keys.contains(&key);
            let prefix = |d: &&ExpectedDifference| d.keys.iter().any(|k| key_matches(k, key));
            let list = EXPECTED_DIFFERENCES.iter();
            list.clone()
                .find(exact)
                .or_else(|| list.clone().find(prefix))
                .map(|d| (d.rewrite)(key, value).map(|v| format!("{key}={v}")))
        });
        match rewritten {
            Some(Some(line)) => out.push_str(&line),
            Some(None) => continue,
            None => out.push_str(body),
        }
        out.push_str(newline);
    }
    out
}

fn key_matches(pattern: &str, key: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => pattern == key,
    }
}

/// One runtime's run of a scenario: the containerd, the runtime, and the
/// steps recorded so far.
pub struct Side<'a> {
    pub c: &'a Containerd,
    pub runtime: Runtime,
    steps: Vec<(String, Outcome)>,
    execs: u32,
}

impl Side<'_> {
    /// Records a step the scenario observed itself (say, what the host
    /// sees in a volume afterwards).
    pub fn record(&mut self, label: &str, outcome: Outcome) {
        self.steps.push((label.to_owned(), outcome));
    }

    fn ctr_step(&mut self, label: &str, args: &[&str]) -> Outcome {
        let outcome = Outcome::of(&self.c.ctr(args));
        self.record(label, outcome.clone());
        outcome
    }

    fn run_args<'s>(
        &self,
        mode: &'s str,
        opts: &[&'s str],
        image: &'s str,
        id: &'s str,
    ) -> Vec<&'s str> {
        let mut a = vec!["run", mode, "--runtime", self.runtime.runtime_type()];
        a.extend_from_slice(opts);
        a.extend_from_slice(&[image, id]);
        a
    }

    /// `ctr run --rm [opts] image id args…` to completion: one step.
    pub fn run<'s>(
        &mut self,
        label: &str,
        opts: &[&'s str],
        image: &'s str,
        id: &'s str,
        args: &[&'s str],
    ) -> Outcome {
        let mut a = self.run_args("--rm", opts, image, id);
        a.extend_from_slice(args);
        self.ctr_step(label, &a)
    }

    /// `ctr run -d [opts] image id args…`: a container to exec into. Its
    /// start is a step (it must succeed, or fail, on both sides alike).
    pub fn start_detached<'s>(
        &mut self,
        opts: &[&'s str],
        image: &'s str,
        id: &'s str,
        args: &[&'s str],
    ) {
        let mut a = self.run_args("-d", opts, image, id);
        a.extend_from_slice(args);
        let label = format!("start {id}");
        self.ctr_step(&label, &a);
    }

    /// `ctr task exec --exec-id <n> [opts] id args…` to completion: one step.
    pub fn exec(&mut self, label: &str, id: &str, opts: &[&str], args: &[&str]) -> Outcome {
        let exec_id = self.next_exec_id();
        let mut a = vec!["task", "exec", "--exec-id", &exec_id];
        a.extend_from_slice(opts);
        a.push(id);
        a.extend_from_slice(args);
        self.ctr_step(label, &a)
    }

    fn next_exec_id(&mut self) -> String {
        self.execs += 1;
        format!("x{}", self.execs)
    }

    /// `ctr task kill -s signal [--exec-id e] id`: one step (ctr's own
    /// output and status).
    pub fn kill(&mut self, id: &str, exec_id: Option<&str>, signal: &str) {
        let mut a = vec!["task", "kill", "-s", signal];
        if let Some(e) = exec_id {
            a.extend_from_slice(&["--exec-id", e]);
        }
        a.push(id);
        let label = format!("kill -s {signal} {id} {}", exec_id.unwrap_or(""));
        self.ctr_step(&label, &a);
    }

    /// `ctr run --rm [opts] image id args…` left running, attached: its
    /// output is read as it comes ([`Attached::wait_for_line`]) and
    /// [`Attached::finish`] records it once it exits.
    pub fn spawn_run<'s>(
        &self,
        opts: &[&'s str],
        image: &'s str,
        id: &'s str,
        args: &[&'s str],
    ) -> Attached {
        let mut a = self.run_args("--rm", opts, image, id);
        a.extend_from_slice(args);
        Attached::spawn(self.c, &a)
    }

    /// `ctr task exec --exec-id <n> id args…` left running, attached; the
    /// exec id is returned with it (for `kill --exec-id`).
    pub fn spawn_exec(&mut self, id: &str, args: &[&str]) -> (String, Attached) {
        let exec_id = self.next_exec_id();
        let mut a = vec!["task", "exec", "--exec-id", &exec_id, id];
        a.extend_from_slice(args);
        let attached = Attached::spawn(self.c, &a);
        (exec_id, attached)
    }

    /// Waits for an attached command to exit (bounded) and records it.
    pub fn finish(&mut self, label: &str, attached: Attached) {
        let outcome = attached.finish(Duration::from_secs(180));
        self.record(label, outcome);
    }

    /// SIGKILLs a detached container and deletes it (clean-up, not a step).
    pub fn remove(&self, id: &str) {
        self.c.kill_and_delete(id);
    }
}

/// A ctr command running in the background with its output piped.
pub struct Attached {
    child: Child,
    lines: Receiver<String>,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Attached {
    fn spawn(c: &Containerd, args: &[&str]) -> Attached {
        let mut child = c
            .ctr_cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run ctr {args:?}: {e}"));
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            let mut reader = BufReader::new(out);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                all.push_str(&line);
                // The receiver may be gone (nobody waits for a line): fine.
                let _ = tx.send(line.trim_end_matches('\n').to_owned());
                line.clear();
            }
            all
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = err.read_to_end(&mut all);
            text(&all)
        });
        Attached {
            child,
            lines,
            stdout,
            stderr,
        }
    }

    /// Blocks until the command prints `want` as a whole line on stdout:
    /// the process inside has reached that point (say, installed its
    /// signal handler). Panics after `limit` or if the output ends first.
    pub fn wait_for_line(&self, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == want => return,
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => panic!("no line {want:?} within {limit:?}"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the output ended before the line {want:?}")
                }
            }
        }
    }

    /// Waits (at most `limit`, then kills) for the command to exit.
    pub fn finish(mut self, limit: Duration) -> Outcome {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Outcome {
            code: status.code(),
            stdout: self.stdout.join().unwrap(),
            stderr: self.stderr.join().unwrap(),
        }
    }
}

/// The differences found so far, over all cases of one test.
pub struct Report<'a> {
    c: &'a Containerd,
    failures: Vec<String>,
    cases: usize,
    started: Instant,
}

impl<'a> Report<'a> {
    pub fn new(c: &'a Containerd) -> Self {
        Report {
            c,
            failures: Vec::new(),
            cases: 0,
            started: Instant::now(),
        }
    }

    /// Runs `scenario` under runc, then under BoxLite, and compares the
    /// two transcripts step by step after normalisation.
    pub fn case(&mut self, name: &str, scenario: impl Fn(&mut Side)) {
        self.cases += 1;
        let mut transcripts = Vec::new();
        for runtime in [Runtime::Runc, Runtime::Boxlite] {
            let started = Instant::now();
            let mut side = Side {
                c: self.c,
                runtime,
                steps: Vec::new(),
                execs: 0,
            };
            scenario(&mut side);
            eprintln!(
                "case {name}: {} in {:?} ({} steps)",
                runtime.label(),
                started.elapsed(),
                side.steps.len()
            );
            transcripts.push(side.steps);
        }
        let boxlite = transcripts.pop().unwrap();
        let runc = transcripts.pop().unwrap();
        // For a look at everything compared (not just what differs):
        // each side's transcript, normalised, as <dir>/<case>.<runtime>.
        if let Some(dir) = std::env::var_os("BOXLITE_DIFFTEST_DUMP") {
            let dir = std::path::PathBuf::from(dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (runtime, steps) in [(Runtime::Runc, &runc), (Runtime::Boxlite, &boxlite)] {
                let text: String = steps
                    .iter()
                    .map(|(label, o)| format!("=== {label}\n{}", normalise(&o.render())))
                    .collect();
                let file = format!("{}.{}", name.replace([' ', '/'], "_"), runtime.label());
                std::fs::write(dir.join(file), text).unwrap();
            }
        }
        if let Err(diff) = compare(name, &runc, &boxlite) {
            self.failures.push(diff);
        }
    }

    /// Panics with every difference found, each as a diff.
    pub fn finish(self) {
        eprintln!(
            "{} cases in {:?}, {} with differences",
            self.cases,
            self.started.elapsed(),
            self.failures.len()
        );
        assert!(
            self.failures.is_empty(),
            "BoxLite differs from runc beyond the expected differences \
             (docs/shim.md, \"Differences from runc\"):\n\n{}",
            self.failures.join("\n")
        );
    }
}

/// Compares two transcripts after normalisation: Ok, or a report with a
/// unified diff (runc `-`, BoxLite `+`) of every step that differs.
pub fn compare(
    case: &str,
    runc: &[(String, Outcome)],
    boxlite: &[(String, Outcome)],
) -> Result<(), String> {
    let labels = |t: &[(String, Outcome)]| t.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>();
    if labels(runc) != labels(boxlite) {
        return Err(format!(
            "case {case}: the scenario took other steps:\nrunc:    {:?}\nboxlite: {:?}\n",
            labels(runc),
            labels(boxlite)
        ));
    }
    let mut report = String::new();
    for ((label, r), (_, b)) in runc.iter().zip(boxlite) {
        let (r, b) = (normalise(&r.render()), normalise(&b.render()));
        if r != b {
            report.push_str(&format!(
                "case {case}, step {label:?}: runc (-) and BoxLite (+) differ\n{}\n",
                unified_diff(&r, &b)
            ));
        }
    }
    if report.is_empty() {
        Ok(())
    } else {
        Err(report)
    }
}

/// `diff -u` of two texts (diffutils), without its file header.
fn unified_diff(a: &str, b: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("runc"), dir.path().join("boxlite"));
    std::fs::write(&pa, a).unwrap();
    std::fs::write(&pb, b).unwrap();
    let out = crate::oci_image::run(
        std::process::Command::new("diff")
            .args(["-u", "--label", "runc", "--label", "boxlite"])
            .arg(&pa)
            .arg(&pb),
    );
    text(&out.stdout)
}

/// The expected differences as docs/shim.md lists them: the bullets
/// `- **name**: why` of its section "Differences from runc".
pub fn documented_differences(doc: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(doc).unwrap();
    let section: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim() != "## Differences from runc")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect();
    section
        .iter()
        .filter_map(|l| l.strip_prefix("- **"))
        .filter_map(|l| l.split_once("**"))
        .map(|(name, _)| name.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(stdout: &str) -> Outcome {
        Outcome {
            code: Some(0),
            stdout: stdout.to_owned(),
            stderr: String::new(),
        }
    }

    #[test]
    fn list_matches_the_doc() {
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/shim.md");
        let documented = documented_differences(&doc);
        let listed: Vec<String> = EXPECTED_DIFFERENCES
            .iter()
            .map(|d| d.name.to_owned())
            .collect();
        assert_eq!(
            documented, listed,
            "docs/shim.md \"Differences from runc\" and EXPECTED_DIFFERENCES must list \
             the same names in the same order"
        );
        let mut names = listed.clone();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), listed.len(), "a name is listed twice");
    }

    #[test]
    fn normalise_rewrites_only_the_listed_keys() {
        let text = "kernel.release=6.1.0\nkernel.releasex=1\nplain line\nuid=0\nvm.cpus=2";
        assert_eq!(
            normalise(text),
            "kernel.release=<differs: see docs/shim.md>\nkernel.releasex=1\nplain line\nuid=0\n\
             vm.cpus=<differs: see docs/shim.md>"
        );
    }

    #[test]
    fn an_unlisted_difference_fails_with_a_diff() {
        let runc = vec![("probe".to_owned(), outcome("uid=0\nkernel.release=6.18\n"))];
        let same = vec![("probe".to_owned(), outcome("uid=0\nkernel.release=6.1\n"))];
        assert_eq!(compare("c", &runc, &same), Ok(()));
        let other = vec![("probe".to_owned(), outcome("uid=1\nkernel.release=6.1\n"))];
        let err = compare("c", &runc, &other).unwrap_err();
        assert!(err.contains("-uid=0\n+uid=1\n"), "{err}");
        let mut code = other.clone();
        code[0].1 = outcome("uid=0\nkernel.release=6.1\n");
        code[0].1.code = Some(1);
        let err = compare("c", &runc, &code).unwrap_err();
        assert!(err.contains("-exit code: 0\n+exit code: 1\n"), "{err}");
    }
}

//! QEMU's machine protocol (QMP) on one end of a socket pair the runtime
//! made before QEMU started (QEMU inherits the other: `-chardev
//! socket,fd=<n>` and `-mon mode=control`): how the runtime changes a
//! running QEMU, which it does only for the balloon's target.
//!
//! QEMU runs jailed and runs the guest's device emulation, so what it
//! sends is input like any other: every line is bounded, every read has a
//! deadline, and a reply must have the shape the command's is documented
//! to have. Asynchronous events (`{"event": …}`, e.g. `BALLOON_CHANGE`)
//! interleave with replies and are skipped.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest line read from QEMU: its greeting and our commands' replies
/// are a few hundred bytes.
const MAX_LINE: u64 = 64 * 1024;
/// How long one command (or the greeting) may take to be answered.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP: {0}")]
    Io(#[source] std::io::Error),
    #[error("QMP: QEMU closed the monitor")]
    Closed,
    #[error("QMP: no answer within {}s", QMP_TIMEOUT.as_secs())]
    Timeout,
    #[error("QMP: a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QMP: not a JSON object: {0}")]
    NotJson(String),
    #[error("QMP: the greeting has no \"QMP\" member: {0}")]
    NoGreeting(String),
    #[error("QMP: {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: {command} answered {got}, not {want}")]
    Shape {
        command: String,
        got: String,
        want: &'static str,
    },
}

/// A QMP session; negotiated (greeting read, `qmp_capabilities` sent) on
/// its first command.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    negotiated: bool,
}

impl Qmp {
    pub fn new(stream: UnixStream) -> Self {
        Qmp {
            reader: BufReader::new(stream),
            negotiated: false,
        }
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let deadline = Instant::now() + QMP_TIMEOUT;
        if !self.negotiated {
            let greeting = self.read_message(deadline)?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::NoGreeting(greeting.to_string()));
            }
            self.send(&json!({"execute": "qmp_capabilities"}))?;
            self.read_return("qmp_capabilities", deadline)?;
            self.negotiated = true;
        }
        let mut request = json!({ "execute": command });
        if let Some(a) = arguments {
            request["arguments"] = a;
        }
        self.send(&request)?;
        self.read_return(command, deadline)
    }

    fn send(&mut self, v: &Value) -> Result<(), QmpError> {
        let mut line = v.to_string();
        line.push('\n');
        let stream = self.reader.get_mut();
        stream
            .set_write_timeout(Some(QMP_TIMEOUT))
            .map_err(QmpError::Io)?;
        stream
            .write_all(line.as_bytes())
            .map_err(|e| match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => QmpError::Timeout,
                _ => QmpError::Io(e),
            })
    }

    /// The next reply, skipping events: its `return`, or its `error` as
    /// [`QmpError::Command`].
    fn read_return(&mut self, command: &str, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            let mut msg = self.read_message(deadline)?;
            if msg.get("event").is_some() {
                continue;
            }
            if let Some(r) = msg.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = msg.get("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Shape {
                command: command.to_owned(),
                got: msg.to_string(),
                want: "a \"return\" or \"error\" member",
            });
        }
    }

    /// One line, parsed as a JSON object, read by `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QmpError::Timeout);
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(QmpError::Io)?;
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => QmpError::Timeout,
                _ => QmpError::Io(e),
            })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(if n as u64 > MAX_LINE {
                QmpError::LineTooLong
            } else {
                QmpError::Closed
            });
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(QmpError::NotJson(
                String::from_utf8_lossy(&line[..line.len().min(200)])
                    .trim_end()
                    .to_owned(),
            )),
        }
    }
}

/// QEMU's balloon in a VM of `memory_mib`, with QMP's figures turned into
/// the balloon's: QMP's `balloon` takes, and `query-balloon` reports
/// (`actual`), the memory the guest is left with, in bytes.
pub struct QemuBalloon<'a> {
    pub qmp: &'a mut Qmp,
    pub memory_mib: u32,
}

impl QemuBalloon<'_> {
    /// Asks the guest to hold `target_mib` in its balloon.
    pub fn set_target(&mut self, target_mib: u32) -> Result<(), QmpError> {
        let guest_bytes = u64::from(self.memory_mib.saturating_sub(target_mib)) << 20;
        self.qmp
            .execute("balloon", Some(json!({ "value": guest_bytes })))?;
        Ok(())
    }

    /// What the guest holds in its balloon now, in MiB (rounded down; at
    /// most the VM's memory, whatever QEMU says).
    pub fn held_mib(&mut self) -> Result<u32, QmpError> {
        let r = self.qmp.execute("query-balloon", None)?;
        let actual = r
            .get("actual")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Shape {
                command: "query-balloon".into(),
                got: r.to_string(),
                want: "{\"actual\": <bytes>}",
            })?;
        let guest_mib = u32::try_from(actual >> 20).unwrap_or(u32::MAX);
        Ok(self.memory_mib.saturating_sub(guest_mib))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A QEMU stand-in: checks each line it is sent against `script`'s
    /// expected command and answers with its lines, in order.
    fn qemu(script: Vec<(Option<&'static str>, Vec<&'static str>)>) -> Qmp {
        let (ours, theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let mut out = theirs;
            for (expect, answers) in script {
                if let Some(want) = expect {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let got: Value = serde_json::from_str(&line).unwrap();
                    let want: Value = serde_json::from_str(want).unwrap();
                    assert_eq!(got, want);
                }
                for a in answers {
                    out.write_all(a.as_bytes()).unwrap();
                    out.write_all(b"\n").unwrap();
                }
            }
            // Hold the socket open until the client is done with it.
            let _ = reader.read_line(&mut String::new());
        });
        Qmp::new(ours)
    }

    const GREETING: &str = r#"{"QMP": {"version": {}, "capabilities": []}}"#;
    const CAPS: &str = r#"{"execute":"qmp_capabilities"}"#;

    #[test]
    fn the_balloon_is_set_and_read_through_qmp_events_skipped() {
        let mut qmp = qemu(vec![
            (None, vec![GREETING]),
            (Some(CAPS), vec![r#"{"return": {}}"#]),
            (
                Some(r#"{"execute":"balloon","arguments":{"value":402653184}}"#),
                vec![r#"{"return": {}}"#],
            ),
            (
                Some(r#"{"execute":"query-balloon"}"#),
                vec![
                    r#"{"event": "BALLOON_CHANGE", "data": {"actual": 500000000}}"#,
                    r#"{"return": {"actual": 402653184}}"#,
                ],
            ),
        ]);
        let mut b = QemuBalloon {
            qmp: &mut qmp,
            memory_mib: 896,
        };
        b.set_target(512).unwrap();
        assert_eq!(b.held_mib().unwrap(), 512);
    }

    #[test]
    fn qemus_errors_and_odd_answers_are_named() {
        let mut qmp = qemu(vec![
            (None, vec![GREETING]),
            (Some(CAPS), vec![r#"{"return": {}}"#]),
            (
                Some(r#"{"execute":"balloon","arguments":{"value":0}}"#),
                vec![
                    r#"{"error": {"class": "GenericError", "desc": "No balloon device has been activated"}}"#,
                ],
            ),
            (
                Some(r#"{"execute":"query-balloon"}"#),
                vec![r#"{"return": {"actual": "lots"}}"#],
            ),
            (Some(r#"{"execute":"query-balloon"}"#), vec!["[1,2]"]),
        ]);
        let mut b = QemuBalloon {
            qmp: &mut qmp,
            memory_mib: 256,
        };
        assert_eq!(
            b.set_target(300).unwrap_err().to_string(),
            "QMP: balloon failed: GenericError: No balloon device has been activated"
        );
        assert_eq!(
            b.held_mib().unwrap_err().to_string(),
            "QMP: query-balloon answered {\"actual\":\"lots\"}, not {\"actual\": <bytes>}"
        );
        assert_eq!(
            b.held_mib().unwrap_err().to_string(),
            "QMP: not a JSON object: [1,2]"
        );
    }

    #[test]
    fn a_silent_closed_or_flooding_qemu_is_an_error_not_a_hang() {
        let mut qmp = qemu(vec![(None, vec!["{\"greeting\": 1}"])]);
        assert_eq!(
            qmp.execute("query-balloon", None).unwrap_err().to_string(),
            "QMP: the greeting has no \"QMP\" member: {\"greeting\":1}"
        );

        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let mut qmp = Qmp::new(ours);
        assert!(matches!(
            qmp.execute("query-balloon", None),
            Err(QmpError::Closed)
        ));

        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let flood = std::thread::spawn(move || {
            let chunk = vec![b'x'; 8192];
            for _ in 0..(MAX_LINE / 8192 + 2) {
                if theirs.write_all(&chunk).is_err() {
                    break;
                }
            }
            theirs
        });
        let mut qmp = Qmp::new(ours);
        assert!(matches!(
            qmp.execute("query-balloon", None),
            Err(QmpError::LineTooLong)
        ));
        drop(qmp);
        drop(flood.join());

        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut qmp = Qmp::new(ours);
        let started = Instant::now();
        assert!(matches!(
            qmp.execute("query-balloon", None),
            Err(QmpError::Timeout)
        ));
        assert!(started.elapsed() < QMP_TIMEOUT + Duration::from_secs(2));
    }
}

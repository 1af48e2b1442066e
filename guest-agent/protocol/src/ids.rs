//! The one rule for container, exec and sandbox ids, on both sides of the
//! host–guest contract.
//!
//! It is containerd's own (`identifiers.Validate`): 1..=[`MAX_ID_LEN`]
//! bytes of `A-Z a-z 0-9 _ - .`, not starting with `.`. Every id the shim
//! hands on came through containerd, so nothing legitimate is refused;
//! and since ids become directory names, cgroup paths and stdio header
//! fields, anything looser is a path-traversal risk on whichever side
//! checks less.

/// Longest id (containerd's `identifiers.Validate` limit).
pub const MAX_ID_LEN: usize = 76;

/// Why an id was refused; the message names the kind of id and the id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} id {id:?} is invalid: {reason} (expected 1..={MAX_ID_LEN} characters of A-Z a-z 0-9 _ - . not starting with '.')")]
pub struct InvalidId {
    /// What the id names: "container", "exec", "sandbox", …
    pub kind: &'static str,
    /// The id, escaped for printing.
    pub id: String,
    pub reason: String,
}

/// Checks `id` against the rule above; `kind` goes into the error.
pub fn validate(kind: &'static str, id: &str) -> Result<(), InvalidId> {
    let invalid = |reason: String| InvalidId {
        kind,
        id: id.escape_debug().to_string(),
        reason,
    };
    if id.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(format!("it is {} bytes long", id.len())));
    }
    if id.starts_with('.') {
        return Err(invalid("it starts with '.'".into()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(invalid(format!("character {c:?} is not allowed")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_and_cri_ids_pass() {
        for id in [
            "a",
            "web-1",
            "my_ctr.v2",
            &"f".repeat(64), // a CRI sandbox id
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert_eq!(validate("container", id), Ok(()), "{id}");
        }
    }

    #[test]
    fn refusals_name_the_kind_the_id_and_the_reason() {
        let cases = [
            ("", "it is empty"),
            (".", "it starts with '.'"),
            ("..", "it starts with '.'"),
            (".hidden", "it starts with '.'"),
            ("a/b", "character '/' is not allowed"),
            ("a+b", "character '+' is not allowed"),
            ("a b", "character ' ' is not allowed"),
            ("é", "character 'é' is not allowed"),
        ];
        for (id, reason) in cases {
            let e = validate("exec", id).unwrap_err();
            assert_eq!(e.reason, reason, "{id:?}");
            assert!(e
                .to_string()
                .starts_with(&format!("exec id {id:?} is invalid: {reason}")));
        }
        let long = "y".repeat(MAX_ID_LEN + 1);
        let e = validate("sandbox", &long).unwrap_err();
        assert_eq!(e.reason, format!("it is {} bytes long", MAX_ID_LEN + 1));
    }
}

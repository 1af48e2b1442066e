//! One way to print an error with its causes, for the host and the guest.

/// `error: cause: cause's cause`. Every error type of the project keeps its
/// cause as `#[source]` and leaves it out of its own message, so joining
/// the chain prints each cause once.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start sandbox {id}")]
    struct Start {
        id: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn joins_every_cause_once() {
        let e = Start {
            id: "3f2a",
            source: std::io::Error::other("no such file"),
        };
        assert_eq!(chain(&e), "cannot start sandbox 3f2a: no such file");
        assert_eq!(chain(&std::io::Error::other("alone")), "alone");
    }
}

//! Per-pod overrides of `boxlite.toml` through `io.boxlite.*` annotations
//! on the container that boots the sandbox VM (the pod sandbox, or the
//! only container of a plain `ctr run`).
//!
//! The node's admin opts in per key with `runtime.allowed_annotations`; an
//! `io.boxlite.*` annotation that is not allowed, not known or not valid
//! fails the create with a message naming it, rather than being dropped:
//! the pod asked for something it would not get.

use std::collections::HashMap;

use crate::config::{Config, ConfigError};

/// Every annotation this runtime reads starts with this.
pub const PREFIX: &str = "io.boxlite.";

/// The settings a pod may override, as `(annotation, config key)`.
pub const OVERRIDABLE: [(&str, &str); 5] = [
    ("io.boxlite.guest.vcpus", "guest.vcpus"),
    ("io.boxlite.guest.memory_mib", "guest.memory_mib"),
    (
        "io.boxlite.guest.kernel_cmdline_extra",
        "guest.kernel_cmdline_extra",
    ),
    (
        "io.boxlite.timeouts.agent_ready_secs",
        "timeouts.agent_ready_secs",
    ),
    (
        "io.boxlite.timeouts.shutdown_secs",
        "timeouts.shutdown_secs",
    ),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("annotation {key} is not a BoxLite setting (known: {})", known_list())]
    Unknown { key: String },
    #[error(
        "annotation {key} is not allowed on this node: the admin can add it to \
         runtime.allowed_annotations in boxlite.toml"
    )]
    NotAllowed { key: String },
    #[error("annotation {key}={value:?}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
}

fn known_list() -> String {
    OVERRIDABLE
        .iter()
        .map(|(a, _)| *a)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `key` names an overridable setting (for validating
/// `runtime.allowed_annotations`).
pub fn is_known(key: &str) -> bool {
    OVERRIDABLE.iter().any(|(a, _)| *a == key)
}

impl Config {
    /// This config with the pod's allowed `io.boxlite.*` annotations
    /// applied and validated. Other annotations are not looked at.
    pub fn with_annotations(
        &self,
        annotations: &HashMap<String, String>,
    ) -> Result<Config, AnnotationError> {
        let mut effective = self.clone();
        // Sorted, so the first error reported does not depend on hashing.
        let mut ours: Vec<(&String, &String)> = annotations
            .iter()
            .filter(|(k, _)| k.starts_with(PREFIX))
            .collect();
        ours.sort();
        for (key, value) in ours {
            if !is_known(key) {
                return Err(AnnotationError::Unknown { key: key.clone() });
            }
            if !self.runtime.allowed_annotations.iter().any(|a| a == key) {
                return Err(AnnotationError::NotAllowed { key: key.clone() });
            }
            let bad = |reason: String| AnnotationError::BadValue {
                key: key.clone(),
                value: value.clone(),
                reason,
            };
            let number = || -> Result<u64, AnnotationError> {
                value
                    .trim()
                    .parse()
                    .map_err(|_| bad("not a whole number".into()))
            };
            let narrow = |n: u64| u32::try_from(n).map_err(|_| bad("too large".into()));
            match key.as_str() {
                "io.boxlite.guest.vcpus" => effective.guest.vcpus = narrow(number()?)?,
                "io.boxlite.guest.memory_mib" => effective.guest.memory_mib = narrow(number()?)?,
                "io.boxlite.guest.kernel_cmdline_extra" => {
                    effective.guest.kernel_cmdline_extra = value.clone()
                }
                "io.boxlite.timeouts.agent_ready_secs" => {
                    effective.timeouts.agent_ready_secs = number()?
                }
                "io.boxlite.timeouts.shutdown_secs" => effective.timeouts.shutdown_secs = number()?,
                _ => unreachable!("every known key is handled"),
            }
            // The config's own limits, named by the config key.
            effective
                .validate()
                .map_err(|e: ConfigError| bad(e.to_string()))?;
        }
        Ok(effective)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn allowing(keys: &[&str]) -> Config {
        let mut c = Config::default();
        c.runtime.allowed_annotations = keys.iter().map(|k| k.to_string()).collect();
        c
    }

    #[test]
    fn allowed_annotations_override_the_config() {
        let c = allowing(&[
            "io.boxlite.guest.vcpus",
            "io.boxlite.guest.memory_mib",
            "io.boxlite.timeouts.agent_ready_secs",
        ]);
        let e = c
            .with_annotations(&annotations(&[
                ("io.boxlite.guest.vcpus", "2"),
                ("io.boxlite.guest.memory_mib", " 300 "),
                ("io.boxlite.timeouts.agent_ready_secs", "90"),
                // Not ours: ignored.
                ("io.kubernetes.cri.sandbox-id", "abc"),
            ]))
            .unwrap();
        assert_eq!(e.guest.vcpus, 2);
        assert_eq!(e.guest.memory_mib, 300);
        assert_eq!(e.timeouts.agent_ready_secs, 90);
        assert_eq!(e.guest.kernel, c.guest.kernel);
        // No annotations: the config itself.
        assert_eq!(c.with_annotations(&HashMap::new()).unwrap(), c);
    }

    #[test]
    fn refusals_name_the_annotation_and_the_reason() {
        let c = allowing(&["io.boxlite.guest.vcpus"]);
        let err = |pairs: &[(&str, &str)]| {
            c.with_annotations(&annotations(pairs))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&[("io.boxlite.guest.memory_mib", "300")]),
            "annotation io.boxlite.guest.memory_mib is not allowed on this node: the admin \
             can add it to runtime.allowed_annotations in boxlite.toml"
        );
        assert!(err(&[("io.boxlite.jail", "off")]).starts_with(
            "annotation io.boxlite.jail is not a BoxLite setting (known: io.boxlite.guest.vcpus, "
        ));
        assert_eq!(
            err(&[("io.boxlite.guest.vcpus", "two")]),
            "annotation io.boxlite.guest.vcpus=\"two\": not a whole number"
        );
        assert_eq!(
            err(&[("io.boxlite.guest.vcpus", "99")]),
            "annotation io.boxlite.guest.vcpus=\"99\": guest.vcpus = 99 is out of range 1..=16"
        );
        assert_eq!(
            err(&[("io.boxlite.guest.vcpus", "99999999999")]),
            "annotation io.boxlite.guest.vcpus=\"99999999999\": too large"
        );
    }

    #[test]
    fn command_line_extra_is_checked_like_the_config_key() {
        let c = allowing(&["io.boxlite.guest.kernel_cmdline_extra"]);
        let ok = c
            .with_annotations(&annotations(&[(
                "io.boxlite.guest.kernel_cmdline_extra",
                "boxlite.log=debug",
            )]))
            .unwrap();
        assert_eq!(ok.guest.kernel_cmdline_extra, "boxlite.log=debug");
        let err = c
            .with_annotations(&annotations(&[(
                "io.boxlite.guest.kernel_cmdline_extra",
                "a\nb",
            )]))
            .unwrap_err();
        assert!(
            err.to_string().contains("contains a control character"),
            "{err}"
        );
    }
}

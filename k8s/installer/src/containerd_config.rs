//! Registering (and unregistering) the `boxlite` runtime in containerd's
//! `config.toml` with `toml_edit`, so the node's file keeps its comments,
//! key order and formatting: the only difference after an install is our
//! one table, and an uninstall removes exactly that table again.

use std::path::{Path, PathBuf};

use toml_edit::{Array, DocumentMut, Item, Table, Value};

use crate::fsutil;

/// The runtime type containerd maps to `containerd-shim-boxlite-v2`.
pub const RUNTIME_TYPE: &str = "io.containerd.boxlite.v2";
/// The runtime handler name (`RuntimeClass.handler`).
pub const HANDLER: &str = "boxlite";
/// Suffix of the one-time copy of the file as it was before our first edit.
pub const BACKUP_SUFFIX: &str = ".before-boxlite";

/// Annotation patterns the CRI plugin passes through to the shim.
const ANNOTATIONS: &str = "io.boxlite.*";

/// Where the CRI plugin's runtimes live, by config `version`.
fn runtimes_path(version: i64) -> Option<[&'static str; 4]> {
    match version {
        // containerd 1.x.
        2 => Some([
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ]),
        // containerd 2.x split the CRI plugin; runtimes belong to its runtime half.
        3 => Some([
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ]),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("containerd config {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("containerd config {path}: not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "containerd config {path}: no `version` key, which containerd reads as version 1; \
         version 1 is not supported (containerd 1.6+ writes version 2: `containerd config default`)"
    )]
    NoVersion { path: PathBuf },
    #[error(
        "containerd config {path}: version = {version} is not supported \
         (containerd 1.6+ writes version 2, containerd 2.x version 3)"
    )]
    UnsupportedVersion { path: PathBuf, version: String },
    #[error(
        "containerd config {path}: `{key}` is {found}, not a table; cannot add the boxlite runtime under it"
    )]
    NotATable {
        path: PathBuf,
        key: String,
        found: &'static str,
    },
    #[error("containerd config {path}: cannot write it: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("containerd config {path}: cannot keep a backup as {backup}: {source}")]
    Backup {
        path: PathBuf,
        backup: PathBuf,
        source: std::io::Error,
    },
}

/// Returns the config text with the boxlite runtime registered, or `None`
/// when it is registered already (nothing to write, nothing to restart).
/// `path` only names the file in errors.
pub fn register(text: &str, path: &Path) -> Result<Option<String>, ConfigError> {
    let mut doc = parse(text, path)?;
    let version = if doc.iter().next().is_none() {
        // An empty file (or only comments) is containerd's defaults: start a
        // version 2 file, which every containerd from 1.6 on reads.
        doc.insert("version", toml_edit::value(2));
        2
    } else {
        version(&doc, path)?
    };
    let keys = runtimes_path(version).expect("version() only returns supported versions");

    let mut table = doc.as_table_mut();
    for (depth, key) in keys.iter().enumerate() {
        let entry = table.entry(key).or_insert_with(|| {
            // Parents we create stay implicit: the file gets one header,
            // `[plugins."…".containerd.runtimes.boxlite]`, as in
            // configs/containerd-boxlite.toml.
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        let found = entry.type_name();
        table = entry.as_table_mut().ok_or_else(|| ConfigError::NotATable {
            path: path.to_owned(),
            key: dotted(&keys[..=depth]),
            found,
        })?;
    }
    let runtime = table.entry(HANDLER).or_insert_with(|| {
        let mut t = Table::new();
        // A blank line between the previous table and ours.
        t.decor_mut().set_prefix("\n");
        Item::Table(t)
    });
    let found = runtime.type_name();
    let runtime = runtime
        .as_table_mut()
        .ok_or_else(|| ConfigError::NotATable {
            path: path.to_owned(),
            key: format!("{}.{HANDLER}", dotted(&keys)),
            found,
        })?;

    let mut changed = set_if_different(runtime, "runtime_type", Value::from(RUNTIME_TYPE));
    for key in ["pod_annotations", "container_annotations"] {
        changed |= set_if_different(runtime, key, Value::Array(Array::from_iter([ANNOTATIONS])));
    }
    Ok(changed.then(|| doc.to_string()))
}

/// Returns the config text without the boxlite runtime, or `None` when it
/// is not registered. Parent tables left empty that were only implied (no
/// header of their own) go too, so an install + uninstall gives back the
/// original file.
pub fn unregister(text: &str, path: &Path) -> Result<Option<String>, ConfigError> {
    let mut doc = parse(text, path)?;
    if doc.iter().next().is_none() {
        return Ok(None);
    }
    let version = version(&doc, path)?;
    let keys = runtimes_path(version).expect("version() only returns supported versions");
    if !remove_under(doc.as_table_mut(), &keys) {
        return Ok(None);
    }
    Ok(Some(doc.to_string()))
}

/// Removes `HANDLER` from the table at `keys`; on the way back up removes
/// implicit tables it left empty. Returns whether anything was removed.
fn remove_under(table: &mut Table, keys: &[&str]) -> bool {
    let Some((first, rest)) = keys.split_first() else {
        return table.remove(HANDLER).is_some();
    };
    let Some(child) = table.get_mut(first).and_then(Item::as_table_mut) else {
        return false;
    };
    let removed = remove_under(child, rest);
    if removed && child.is_implicit() && child.is_empty() {
        table.remove(first);
    }
    removed
}

/// Registers the runtime in the file at `path` (created if missing). On the
/// first change the previous file is kept as `<path>.before-boxlite`.
/// Returns whether the file changed.
pub fn register_file(path: &Path) -> Result<bool, ConfigError> {
    edit_file(path, register)
}

/// Removes the runtime from the file at `path`; a missing file is left
/// missing. Returns whether the file changed.
pub fn unregister_file(path: &Path) -> Result<bool, ConfigError> {
    if !path.exists() {
        return Ok(false);
    }
    edit_file(path, unregister)
}

fn edit_file(
    path: &Path,
    edit: fn(&str, &Path) -> Result<Option<String>, ConfigError>,
) -> Result<bool, ConfigError> {
    let old = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let Some(new) = edit(old.as_deref().unwrap_or(""), path)? else {
        return Ok(false);
    };
    if let Some(old) = &old {
        // One-time: a later install must not overwrite the admin's original
        // with a file that already has our table.
        let backup = backup_path(path);
        if !backup.exists() {
            fsutil::write_atomic(&backup, old.as_bytes(), 0o600).map_err(|source| {
                ConfigError::Backup {
                    path: path.to_owned(),
                    backup: backup.clone(),
                    source,
                }
            })?;
        }
    }
    let mode = fsutil::mode_of(path).unwrap_or(0o644);
    fsutil::write_atomic(path, new.as_bytes(), mode).map_err(|source| ConfigError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(true)
}

/// `<path>.before-boxlite`
pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(BACKUP_SUFFIX);
    PathBuf::from(name)
}

fn parse(text: &str, path: &Path) -> Result<DocumentMut, ConfigError> {
    text.parse::<DocumentMut>().map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        // toml_edit's message spans lines (position, source line, caret);
        // one line reads better in a pod log.
        message: e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// The supported `version` of a non-empty config.
fn version(doc: &DocumentMut, path: &Path) -> Result<i64, ConfigError> {
    let Some(item) = doc.get("version") else {
        return Err(ConfigError::NoVersion {
            path: path.to_owned(),
        });
    };
    match item.as_integer() {
        Some(v) if runtimes_path(v).is_some() => Ok(v),
        _ => Err(ConfigError::UnsupportedVersion {
            path: path.to_owned(),
            version: item
                .as_value()
                .map(|v| v.to_string().trim().to_owned())
                .unwrap_or_else(|| item.type_name().to_owned()),
        }),
    }
}

/// Sets `key` unless it already has this value (compared without
/// formatting), so a registered file is left byte for byte as it is.
fn set_if_different(table: &mut Table, key: &str, value: Value) -> bool {
    let same = table
        .get(key)
        .and_then(Item::as_value)
        .is_some_and(|old| same_value(old, &value));
    if !same {
        table.insert(key, Item::Value(value));
    }
    !same
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.value() == b.value(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b.iter()).all(|(a, b)| same_value(a, b))
        }
        _ => false,
    }
}

fn dotted(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| {
            if k.contains('.') {
                format!("{k:?}")
            } else {
                (*k).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

//! containerd config patching, table-driven over the files a node can have.

use std::path::Path;

use boxlite_node_installer::containerd_config::{register, unregister};

const PATH: &str = "/host/etc/containerd/config.toml";

const V2_WITH_RUNC: &str = r#"# Managed by the node image; keep this comment.
version = 2
root = "/var/lib/containerd"   # trailing comment

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"

    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]

        # runc, the default
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"

          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
            SystemdCgroup = true

        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
          runtime_type = "io.containerd.kata.v2"

  [plugins."io.containerd.internal.v1.opt"]
    path = "/opt/containerd"
# end of file
"#;

const V3: &str = r#"version = 3

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"#;

const BLOCK_V2: &str = r#"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.boxlite]
runtime_type = "io.containerd.boxlite.v2"
pod_annotations = ["io.boxlite.*"]
container_annotations = ["io.boxlite.*"]
"#;

fn path() -> &'static Path {
    Path::new(PATH)
}

/// `new` with the first occurrence of `block` cut out.
fn without(new: &str, block: &str) -> String {
    let at = new
        .find(block)
        .unwrap_or_else(|| panic!("no block {block:?} in:\n{new}"));
    format!("{}{}", &new[..at], &new[at + block.len()..])
}

#[test]
fn missing_or_empty_file_becomes_a_fresh_version_2_file() {
    for original in ["", "\n", "   \n\n"] {
        let new = register(original, path()).unwrap().expect("changed");
        let doc: toml_edit::DocumentMut = new.parse().unwrap();
        assert_eq!(doc["version"].as_integer(), Some(2), "{new}");
        assert_eq!(
            doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["boxlite"]
                ["runtime_type"]
                .as_str(),
            Some("io.containerd.boxlite.v2"),
            "{new}"
        );
        assert!(new.contains(BLOCK_V2), "{new}");
        // Registering the result again changes nothing.
        assert_eq!(register(&new, path()).unwrap(), None, "{new}");
    }
}

#[test]
fn version_2_file_keeps_everything_outside_the_new_table_byte_for_byte() {
    let new = register(V2_WITH_RUNC, path()).unwrap().expect("changed");
    assert_eq!(without(&new, BLOCK_V2), V2_WITH_RUNC, "new file:\n{new}");
    let doc: toml_edit::DocumentMut = new.parse().unwrap();
    let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert_eq!(
        runtimes["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );
    assert_eq!(
        runtimes["kata"]["runtime_type"].as_str(),
        Some("io.containerd.kata.v2")
    );
    assert_eq!(
        runtimes["boxlite"]["pod_annotations"][0].as_str(),
        Some("io.boxlite.*")
    );
}

#[test]
fn already_registered_file_is_unchanged() {
    let registered = register(V2_WITH_RUNC, path()).unwrap().unwrap();
    assert_eq!(register(&registered, path()).unwrap(), None);

    // The same registration written by hand, differently formatted, also counts.
    let by_hand = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.boxlite]\n  \
                   runtime_type = 'io.containerd.boxlite.v2'\n  pod_annotations = [ \"io.boxlite.*\" ]\n  \
                   container_annotations = [\"io.boxlite.*\"]\n";
    assert_eq!(register(by_hand, path()).unwrap(), None);
}

#[test]
fn a_stale_registration_is_corrected_in_place() {
    let stale = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.boxlite]\n  \
                 runtime_type = \"io.containerd.boxlite.v1\"\n  pod_annotations = []\n  \
                 container_annotations = [\"io.boxlite.*\"]\n  privileged_without_host_devices = true\n";
    let new = register(stale, path()).unwrap().expect("changed");
    let doc: toml_edit::DocumentMut = new.parse().unwrap();
    let t = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["boxlite"];
    assert_eq!(t["runtime_type"].as_str(), Some("io.containerd.boxlite.v2"));
    assert_eq!(t["pod_annotations"][0].as_str(), Some("io.boxlite.*"));
    // Keys the admin added stay.
    assert_eq!(t["privileged_without_host_devices"].as_bool(), Some(true));
}

#[test]
fn version_3_file_registers_under_the_cri_runtime_plugin() {
    let new = register(V3, path()).unwrap().expect("changed");
    let block = BLOCK_V2.replace("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime");
    assert_eq!(without(&new, &block), V3, "new file:\n{new}");
    assert!(!new.contains("io.containerd.grpc.v1.cri"), "{new}");
    assert_eq!(register(&new, path()).unwrap(), None);
    assert_eq!(unregister(&new, path()).unwrap().as_deref(), Some(V3));
}

#[test]
fn unsupported_files_fail_with_the_path_and_the_cause() {
    let cases: &[(&str, &str)] = &[
        (
            "version = 1\n[plugins.cri]\n",
            "version = 1 is not supported (containerd 1.6+ writes version 2",
        ),
        ("version = 4\n", "version = 4 is not supported"),
        ("version = \"2\"\n", "version = \"2\" is not supported"),
        (
            "root = \"/var/lib/containerd\"\n",
            "no `version` key, which containerd reads as version 1",
        ),
        ("version = 2\n[plugins\n", "not valid TOML"),
        (
            "version = 2\nplugins = 3\n",
            "`plugins` is integer, not a table",
        ),
        (
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = { runc = {} }\n",
            "`plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes` is inline table, not a table",
        ),        (
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = \"x\"\n",
            "`plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes` is string, not a table",
        ),
    ];
    for (text, want) in cases {
        let err = register(text, path()).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("containerd config {PATH}: ")),
            "{text:?}: {err}"
        );
        assert!(err.contains(want), "{text:?}: {err}\n(wanted {want:?})");
    }
}

#[test]
fn runtimes_written_with_dotted_keys_get_a_sibling_table() {
    let original = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                    runtimes.runc.runtime_type = \"io.containerd.runc.v2\"\n[grpc]\naddress = \"x\"\n";
    let new = register(original, path()).unwrap().expect("changed");
    let doc: toml_edit::DocumentMut = new.parse().unwrap();
    let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert_eq!(
        runtimes["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2"),
        "{new}"
    );
    assert_eq!(
        runtimes["boxlite"]["runtime_type"].as_str(),
        Some("io.containerd.boxlite.v2"),
        "{new}"
    );
    assert_eq!(doc["grpc"]["address"].as_str(), Some("x"), "{new}");
    assert_eq!(unregister(&new, path()).unwrap().as_deref(), Some(original));
}

#[test]
fn uninstall_gives_back_the_original_file() {
    for original in [
        V2_WITH_RUNC,
        V3,
        "version = 2\n",
        "version = 2\n# only a comment\n",
    ] {
        let registered = register(original, path()).unwrap().expect("changed");
        let restored = unregister(&registered, path()).unwrap().expect("changed");
        assert_eq!(restored, original, "registered:\n{registered}");
        // Nothing left to remove.
        assert_eq!(unregister(&restored, path()).unwrap(), None);
    }
}

#[test]
fn uninstall_of_an_unregistered_or_empty_file_changes_nothing() {
    assert_eq!(unregister("", path()).unwrap(), None);
    assert_eq!(unregister(V2_WITH_RUNC, path()).unwrap(), None);
    assert!(unregister("version = 1\n", path())
        .unwrap_err()
        .to_string()
        .contains("version = 1 is not supported"));
}

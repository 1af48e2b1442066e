use super::*;

fn parse(text: &str) -> ConfigMap {
    parse_config(text, Path::new("test.fragment")).expect("parse")
}

#[test]
fn parses_values_not_set_and_comments() {
    let map = parse(
        "# a comment\n\nCONFIG_64BIT=y\nCONFIG_NR_CPUS=16\n# CONFIG_MODULES is not set\n\
         CONFIG_CMDLINE=\"a b\"\n# Automatically generated file; DO NOT EDIT.\nCONFIG_64BIT=n\n",
    );
    assert_eq!(map.len(), 4);
    // A later line wins.
    assert_eq!(map["CONFIG_64BIT"], ConfigValue::Set("n".into()));
    assert_eq!(map["CONFIG_NR_CPUS"], ConfigValue::Set("16".into()));
    assert_eq!(map["CONFIG_MODULES"], ConfigValue::NotSet);
    assert_eq!(map["CONFIG_CMDLINE"], ConfigValue::Set("\"a b\"".into()));
}

#[test]
fn rejects_garbage_with_file_and_line() {
    let err = parse_config("CONFIG_A=y\nCONFIG_B y\n", Path::new("frag")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "frag:2: not a Kconfig line (want `CONFIG_X=value` or `# CONFIG_X is not set`): \"CONFIG_B y\""
    );
    assert!(parse_config("config_a=y\n", Path::new("f")).is_err());
    assert!(parse_config("CONFIG_A=\n", Path::new("f")).is_err());
}

#[test]
fn verify_names_each_dropped_option() {
    let wanted = parse(
        "CONFIG_PVH=y\nCONFIG_GONE=y\nCONFIG_OFF=y\nCONFIG_NR_CPUS=16\n\
         # CONFIG_MODULES is not set\n# CONFIG_FORCED is not set\n# CONFIG_ABSENT is not set\n",
    );
    let actual = parse(
        "CONFIG_PVH=y\n# CONFIG_OFF is not set\nCONFIG_NR_CPUS=8\n\
         # CONFIG_MODULES is not set\nCONFIG_FORCED=y\n",
    );
    let dropped = verify_config(&wanted, &actual);
    let names: Vec<&str> = dropped.iter().map(|m| m.symbol.as_str()).collect();
    assert_eq!(
        names,
        [
            "CONFIG_FORCED",
            "CONFIG_GONE",
            "CONFIG_NR_CPUS",
            "CONFIG_OFF"
        ]
    );
    let err = KernelError::OptionsDropped {
        config: PathBuf::from("/w/.config"),
        dropped,
    };
    let msg = err.to_string();
    assert!(msg.starts_with("4 option(s)"), "{msg}");
    assert!(msg.contains("/w/.config"), "{msg}");
    assert!(
        msg.contains("CONFIG_GONE=y: absent from the final config"),
        "{msg}"
    );
    assert!(
        msg.contains("CONFIG_OFF=y: final config has CONFIG_OFF is not set"),
        "{msg}"
    );
    assert!(
        msg.contains("CONFIG_NR_CPUS=16: final config has CONFIG_NR_CPUS=8"),
        "{msg}"
    );
    assert!(
        msg.contains("CONFIG_FORCED is not set: final config has CONFIG_FORCED=y"),
        "{msg}"
    );
}

#[test]
fn key_depends_on_content_version_and_order() {
    let a = b"CONFIG_A=y\n".to_vec();
    let b = b"CONFIG_B=y\n".to_vec();
    let k = cache_key(std::slice::from_ref(&a), "linux-source-6.1", "6.1.1-1");
    assert_eq!(k.len(), 64);
    assert_eq!(
        k,
        cache_key(std::slice::from_ref(&a), "linux-source-6.1", "6.1.1-1")
    );
    assert_ne!(
        k,
        cache_key(std::slice::from_ref(&b), "linux-source-6.1", "6.1.1-1")
    );
    assert_ne!(
        k,
        cache_key(std::slice::from_ref(&a), "linux-source-6.1", "6.1.2-1")
    );
    assert_ne!(
        cache_key(&[a.clone(), b.clone()], "p", "v"),
        cache_key(&[b, a], "p", "v")
    );
}

#[test]
fn the_guest_fragment_parses_and_asks_for_the_essentials() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/guest-kernel.fragment");
    let text = fs::read_to_string(&path).expect("read guest fragment");
    let map = parse_config(&text, &path).expect("parse guest fragment");
    for sym in [
        "CONFIG_64BIT",
        "CONFIG_PVH",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_VIRTIO_FS",
        "CONFIG_HW_RANDOM_VIRTIO",
        "CONFIG_SECCOMP_FILTER",
        "CONFIG_MEMCG",
        // Memory goes back to the host: the balloon and free page reporting.
        "CONFIG_VIRTIO_BALLOON",
        "CONFIG_PAGE_REPORTING",
    ] {
        assert_eq!(map.get(sym), Some(&ConfigValue::Set("y".into())), "{sym}");
    }
    for sym in [
        "CONFIG_MODULES",
        "CONFIG_RANDOMIZE_BASE",
        "CONFIG_PAGE_TABLE_ISOLATION",
        // Either would make the balloon driver turn free page reporting off
        // (the VMMs offer no PAGE_POISON).
        "CONFIG_PAGE_POISONING",
        "CONFIG_INIT_ON_FREE_DEFAULT_ON",
    ] {
        assert_eq!(map.get(sym), Some(&ConfigValue::NotSet), "{sym}");
    }
}

#[test]
fn missing_source_is_named_with_its_package() {
    let dir = tempfile::tempdir().expect("tempdir");
    let frag = dir.path().join("f");
    fs::write(&frag, "CONFIG_A=y\n").expect("write");
    let mut build = KernelBuild::new(vec![frag]).cache_root(dir.path());
    build.source_tarball = dir.path().join("linux-source-6.1.tar.xz");
    let err = build.build().unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "linux source {} not found: install the linux-source-6.1 package",
            dir.path().join("linux-source-6.1.tar.xz").display()
        )
    );
}

#[test]
fn missing_fragment_is_named() {
    let err = KernelBuild::new(vec![PathBuf::from("/nonexistent/frag")])
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/frag"), "{err}");
}

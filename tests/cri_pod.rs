//! The CRI flow kubelet drives, against a private containerd 1.6 whose CRI
//! plugin has the runtime handler `boxlite` and CNI from Debian's
//! containernetworking-plugins (bridge + host-local + loopback):
//! RunPodSandbox → ImageStatus → CreateContainer → StartContainer →
//! ExecSync → ContainerStats → UpdateContainerResources → StopContainer → RemoveContainer →
//! StopPodSandbox → RemovePodSandbox, with the pod reachable over TCP from
//! the host, from a second BoxLite pod and from a runc pod.
//!
//! `#[ignore]`d: root, containerd, the CNI plugins, QEMU and the guest
//! assets. `cargo build -p containerd-shim-boxlite-v2`, then
//! `cargo test -p boxlite-tests --test cri_pod -- --ignored --test-threads=1`.

use std::time::{Duration, Instant};

use boxlite_tests::containerd::IMAGE;
use boxlite_tests::cri::{
    cri_netns, http_get, pod_config, Cri, DNS_SERVER, GREETING, HANDLER, PAUSE_IMAGE, SUBNET,
};
use boxlite_tests::{check_vm_cgroup, processes_mentioning, vm_memory_kib};
use k8s_cri::v1::{
    ContainerState, ContainerStatsRequest, ContainerStatusRequest, ImageSpec, ImageStatusRequest,
    LinuxContainerResources, NamespaceMode, PodSandboxStatsRequest,
    UpdateContainerResourcesRequest, VersionRequest,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, containernetworking-plugins, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
async fn pod_lifecycle_network_and_exec() {
    let netns_before = cri_netns();
    let mut cri = Cri::start("bridge").await;
    let logs = cri.c.dir.path().join("pod-logs");
    let version = cri
        .rt
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("CRI Version")
        .into_inner();
    assert_eq!(version.runtime_name, "containerd");
    for image in [IMAGE, PAUSE_IMAGE] {
        let status = cri
            .img
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .expect("ImageStatus")
            .into_inner();
        assert!(status.image.is_some(), "image {image} not known to CRI");
    }

    let web_pod = pod_config("bxweb", NamespaceMode::Pod, &[], &logs);
    let started = Instant::now();
    let pod = cri.run_pod(&web_pod, HANDLER).await.expect("RunPodSandbox");
    let serve = format!(
        "mkdir -p /www && echo {GREETING} > /www/index.html && exec httpd -f -p 8080 -h /www"
    );
    let web = cri
        .start_container(&pod, &web_pod, "web", &["sh", "-c", &serve])
        .await;
    eprintln!("RunPodSandbox → web started: {:?}", started.elapsed());
    let ip = cri.pod_ip(&pod).await;
    assert!(
        ip.starts_with("10.123.0."),
        "pod IP {ip:?} not from {SUBNET}"
    );

    // Inside: the names CRI wrote, the address CNI gave, ExecSync's streams
    // and exit code.
    let (code, resolv, _) = cri.exec(&web, &["cat", "/etc/resolv.conf"]).await;
    assert_eq!(code, 0);
    assert!(
        resolv.contains(&format!("nameserver {DNS_SERVER}"))
            && resolv.contains("search svc.boxlite.test"),
        "{resolv}"
    );
    let (code, hostname, _) = cri.exec(&web, &["cat", "/etc/hostname"]).await;
    assert_eq!((code, hostname.trim()), (0, "bxweb"));
    let (code, hosts, _) = cri.exec(&web, &["cat", "/etc/hosts"]).await;
    assert_eq!(code, 0);
    assert!(hosts.contains("localhost"), "{hosts}");
    let (code, addrs, _) = cri.exec(&web, &["ip", "-o", "addr", "show"]).await;
    assert_eq!(code, 0);
    assert!(addrs.contains(&format!("inet {ip}/24")), "{addrs}");
    // The container joined the pod's namespace, whose `lo` is up as under
    // runc: localhost reaches the pod's own server.
    assert!(addrs.contains("inet 127.0.0.1/8"), "{addrs}");
    assert!(addrs.contains("inet6 ::1/128"), "{addrs}");
    let (code, local, err) = cri
        .exec(
            &web,
            &[
                "sh",
                "-c",
                // The server may still be starting: up to 10 s.
                "for i in $(seq 50); do wget -q -O - http://127.0.0.1:8080/ && exit 0; \
                 sleep 0.2; done; exit 1",
            ],
        )
        .await;
    assert_eq!((code, local.trim()), (0, GREETING), "{err}");
    let (code, out, err) = cri
        .exec(
            &web,
            &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        )
        .await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (3, "to-stdout\n", "to-stderr\n")
    );

    // Outside: from the host, then from a second BoxLite pod (another VM)
    // on the same bridge.
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = http_get(&ip, 8080, deadline);
    assert!(answer.contains(GREETING), "{answer}");
    let client_pod_config = pod_config("bxclient", NamespaceMode::Pod, &[], &logs);
    let client_pod = cri
        .run_pod(&client_pod_config, HANDLER)
        .await
        .expect("RunPodSandbox (client)");
    let client = cri
        .start_container(&client_pod, &client_pod_config, "client", &["sleep", "600"])
        .await;
    // busybox nc, not wget: Debian's static busybox wget exited with
    // SIGSEGV (139) in the guest here; nc does the same job.
    let request = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {ip} 8080");
    let (code, body, err) = cri.exec(&client, &["sh", "-c", &request]).await;
    assert!(
        code == 0 && body.contains(GREETING),
        "HTTP from the client pod: exit {code}, {body:?}, {err:?}"
    );

    // And from a runc pod on the same bridge.
    let runc_pod_config = pod_config("bxrunc", NamespaceMode::Pod, &[], &logs);
    let runc_pod = cri
        .run_pod(&runc_pod_config, "")
        .await
        .expect("RunPodSandbox (runc)");
    let runc_client = cri
        .start_container(&runc_pod, &runc_pod_config, "client", &["sleep", "600"])
        .await;
    let (code, body, err) = cri.exec(&runc_client, &["sh", "-c", &request]).await;
    assert!(
        code == 0 && body.contains(GREETING),
        "HTTP from the runc pod: exit {code}, {body:?}, {err:?}"
    );

    let stats = cri
        .rt
        .container_stats(ContainerStatsRequest {
            container_id: web.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    assert!(
        stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map(|v| v.value)
            > Some(0),
        "memory working set missing"
    );
    assert!(stats.cpu.is_some(), "cpu stats missing");

    // UpdateContainerResources reaches the container's cgroup in the guest
    // (the kubelet's in-place resize): memory.max, read in the container's
    // cgroup namespace, where its own cgroup is the root of the view. Its
    // CPU quota of 2 CPUs grows the VM, which booted with 1 online: the
    // second vCPU comes online.
    let cpus_online = "grep -c ^processor /proc/cpuinfo";
    let (code, before, _) = cri.exec(&web, &["sh", "-c", cpus_online]).await;
    assert_eq!((code, before.trim()), (0, "1"));
    const NEW_LIMIT: i64 = 96 << 20;
    let update = |linux: LinuxContainerResources| UpdateContainerResourcesRequest {
        container_id: web.clone(),
        linux: Some(linux),
        ..Default::default()
    };
    cri.rt
        .update_container_resources(update(LinuxContainerResources {
            memory_limit_in_bytes: NEW_LIMIT,
            cpu_period: 100_000,
            cpu_quota: 200_000,
            ..Default::default()
        }))
        .await
        .expect("UpdateContainerResources");
    let (code, max, err) = cri
        .exec(
            &web,
            &[
                "sh",
                "-c",
                "p=$(cat /proc/self/cgroup); p=${p#0::}; f=/sys/fs/cgroup$p/memory.max; \
                           [ -e $f ] || f=/sys/fs/cgroup/memory.max; cat $f",
            ],
        )
        .await;
    assert_eq!(
        (code, max.trim()),
        (0, NEW_LIMIT.to_string().as_str()),
        "{err}"
    );
    let (code, after, _) = cri.exec(&web, &["sh", "-c", cpus_online]).await;
    assert_eq!((code, after.trim()), (0, "2"));
    // More CPUs than the VM was built with (the host's, at most 16), or
    // more memory than the whole VM: refused, saying why.
    let host_cpus = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    let err = cri
        .rt
        .update_container_resources(update(LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 100_000 * (host_cpus as i64 + 1),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(
        err.message().contains(&format!(
            "asks for {} CPUs, more than the {host_cpus} vCPUs",
            host_cpus + 1
        )),
        "{err}"
    );
    let err = cri
        .rt
        .update_container_resources(update(LinuxContainerResources {
            memory_limit_in_bytes: 64 << 30,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("a 65536 MiB memory limit")
            && err.message().contains("its sandbox VM was built with"),
        "{err}"
    );

    cri.remove_pod(&runc_pod, &[runc_client]).await;
    cri.remove_pod(&client_pod, &[client]).await;
    cri.remove_pod(&pod, &[web]).await;
    cri.c.assert_ran_on_the_test_backend();
    cri.c.assert_nothing_left();
    assert_eq!(cri_netns(), netns_before, "network namespaces left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, containernetworking-plugins, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
async fn bad_pods_are_clear_cri_errors() {
    let mut cri = Cri::start("bridge").await;
    let logs = cri.c.dir.path().join("pod-logs");

    let host_net = pod_config("bxhostnet", NamespaceMode::Node, &[], &logs);
    let err = cri.run_pod(&host_net, HANDLER).await.unwrap_err();
    assert!(
        err.message().contains("cannot share the host's network"),
        "host network: {err}"
    );

    let bogus = pod_config(
        "bxbogus",
        NamespaceMode::Pod,
        &[("io.boxlite.bogus", "1")],
        &logs,
    );
    let err = cri.run_pod(&bogus, HANDLER).await.unwrap_err();
    assert!(
        err.message()
            .contains("annotation io.boxlite.bogus is not a BoxLite setting"),
        "unknown annotation: {err}"
    );
    // A RuntimeClass handler the node does not have.
    let unknown = pod_config("bxnohandler", NamespaceMode::Pod, &[], &logs);
    let err = cri.run_pod(&unknown, "boxlite-nope").await.unwrap_err();
    assert!(
        err.message().contains("boxlite-nope"),
        "unknown handler: {err}"
    );
    cri.c.assert_nothing_left();
    drop(cri);

    // CNI itself failing: a network list naming a plugin that does not exist.
    let mut cri = Cri::start("boxlite-no-such-plugin").await;
    let pod = pod_config("bxnocni", NamespaceMode::Pod, &[], &logs);
    let err = cri.run_pod(&pod, HANDLER).await.unwrap_err();
    assert!(
        err.message().contains("boxlite-no-such-plugin"),
        "CNI failure: {err}"
    );
    cri.c.assert_nothing_left();
}

/// A pod with limits (2 CPUs, 1 GiB) under a pod cgroup the kubelet made:
/// its VM has 2 online CPUs and 1 GiB beyond what its kernel keeps;
/// every host process of the VM is in the sandbox's cgroup below the pod's;
/// after RemovePodSandbox the sandbox's cgroup is gone and the kubelet's
/// pod cgroup is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, containernetworking-plugins, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
async fn a_pod_is_sized_from_its_limits_and_lives_in_its_cgroup() {
    let mut cri = Cri::start("bridge").await;
    let logs = cri.c.dir.path().join("pod-logs");
    let hierarchies = boxlite_runtime::cgroup::host_hierarchies().unwrap();
    // What the kubelet makes before RunPodSandbox (cgroupfs driver).
    let pod_cgroup = format!("kubepods/burstable/pod-bx-{}", std::process::id());
    for h in &hierarchies {
        std::fs::create_dir_all(h.mount.join(&pod_cgroup)).unwrap();
        if h.v2 {
            // On v2 the kubelet enables the controllers it limits and
            // measures down to the pod cgroup (from the root; memory here), or the pod
            // has no memory figures at all (a fresh node may have none on).
            let mut dir = h.mount.clone();
            for part in pod_cgroup.split('/') {
                let available =
                    std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                let enable: Vec<String> = ["memory"]
                    .iter()
                    .filter(|c| available.split_whitespace().any(|a| a == **c))
                    .map(|c| format!("+{c}"))
                    .collect();
                if !enable.is_empty() {
                    std::fs::write(dir.join("cgroup.subtree_control"), enable.join(" "))
                        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
                }
                dir.push(part);
            }
        }
        if !h.v2 && h.v1_cpuset {
            // cgroup v1 cpuset children start empty, as the kubelet knows.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let mut dir = h.mount.clone();
                for part in pod_cgroup.split('/') {
                    let value = std::fs::read_to_string(dir.join(file)).unwrap();
                    dir.push(part);
                    std::fs::write(dir.join(file), value.trim()).unwrap();
                }
            }
        }
    }
    let mut config = pod_config("bxsized", NamespaceMode::Pod, &[], &logs);
    let linux = config.linux.as_mut().unwrap();
    linux.cgroup_parent = format!("/{pod_cgroup}");
    linux.resources = Some(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 200_000,
        memory_limit_in_bytes: 1 << 30,
        ..Default::default()
    });
    let pod = cri.run_pod(&config, HANDLER).await.expect("RunPodSandbox");
    let ctr = cri
        .start_container(&pod, &config, "sized", &["sleep", "600"])
        .await;
    // 2 CPUs online, and the guest has the pod's 1 GiB beyond what its
    // kernel keeps (the reserve is on top). Filling it is the ctr test's
    // job (the_vm_is_sized_from_the_containers_limits): through ExecSync's
    // one-minute bound it is too slow in the nested node.
    let (code, out, err) = cri
        .exec(&ctr, &["sh", "-c", boxlite_tests::CPUS_AND_MEMTOTAL])
        .await;
    assert_eq!(code, 0, "{err}");
    boxlite_tests::assert_cpus_and_memory(&out, 2, 1 << 20);

    let sandbox_cgroup = format!("{pod_cgroup}/{pod}");
    let procs = processes_mentioning(&cri.c.state_dir().join(&pod));
    assert!(procs.len() >= 2, "VM processes: {procs:?}");
    let pids: Vec<u32> = procs.iter().map(|(pid, _)| *pid).collect();
    for h in &hierarchies {
        if let Err(e) = check_vm_cgroup(&h.mount.join(&sandbox_cgroup), &pids) {
            panic!("{e}; the VM's processes: {procs:?}");
        }
    }

    // What the kubelet reads for the pod (containerd reads the pod cgroup)
    // counts the VM: at least the guest RAM its VMM holds (the largest of
    // the VM's processes; virtiofsd maps the same pages, so a sum would
    // count them twice).
    let anon_kib = procs
        .iter()
        .map(|(pid, _)| vm_memory_kib([*pid]))
        .max()
        .unwrap_or(0);
    let stats = cri
        .rt
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .expect("pod stats");
    let working_set = stats
        .linux
        .and_then(|l| l.memory)
        .and_then(|m| m.working_set_bytes)
        .map_or(0, |v| v.value);
    eprintln!("pod working set {working_set} B; VMM's anonymous and shared memory {anon_kib} KiB");
    assert!(
        anon_kib > 0 && working_set >= anon_kib * 1024,
        "pod working set {working_set} B < the VMM's anonymous and shared memory {anon_kib} KiB"
    );

    cri.remove_pod(&pod, &[ctr]).await;
    cri.c.assert_nothing_left();
    for h in &hierarchies {
        let leaf = h.mount.join(&sandbox_cgroup);
        assert!(!leaf.exists(), "{} left behind", leaf.display());
        let kubelets = h.mount.join(&pod_cgroup);
        assert!(kubelets.is_dir(), "{} was removed", kubelets.display());
        std::fs::remove_dir(&kubelets).unwrap();
        // kubepods/burstable and kubepods, where this test made them (no
        // kubelet here); a node's own stay, as they are not empty.
        let _ = std::fs::remove_dir(h.mount.join("kubepods/burstable"));
        let _ = std::fs::remove_dir(h.mount.join("kubepods"));
    }
}

/// A pod that goes over its pod-level memory limit (256 MiB, no limit of
/// the container's own) is OOM-killed inside its VM, sized from that
/// limit, as runc's would be in its pod cgroup: the container ends with 137, the CRI reports OOMKilled
/// (the TaskOOM event reached containerd), and the VM — its other
/// container — lives on; the host's OOM killer has nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, containernetworking-plugins, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
async fn a_pod_over_its_memory_limit_is_oom_killed_in_its_vm() {
    let mut cri = Cri::start("bridge").await;
    let logs = cri.c.dir.path().join("pod-logs");
    let mut config = pod_config("bxoom", NamespaceMode::Pod, &[], &logs);
    config.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        memory_limit_in_bytes: 256 << 20,
        ..Default::default()
    });
    let pod = cri.run_pod(&config, HANDLER).await.expect("RunPodSandbox");
    let sleeper = cri
        .start_container(&pod, &config, "sleeper", &["sleep", "600"])
        .await;
    // dd fills a 360 MiB buffer: over the pod's 256 MiB, and more than its
    // VM (256 MiB plus the reserve, less what the guest itself uses) can
    // give. (In a VM of the default 512 MiB, blind to the pod's limit, it
    // was not OOM-killed: it ended with exit code 1.)
    let hog = cri
        .start_container(
            &pod,
            &config,
            "hog",
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=360M", "count=1"],
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = cri
            .rt
            .container_status(ContainerStatusRequest {
                container_id: hog.clone(),
                verbose: false,
            })
            .await
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a status");
        if status.state == ContainerState::ContainerExited as i32 {
            break status;
        }
        assert!(Instant::now() < deadline, "hog still {:?}", status.state);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (137, "OOMKilled"),
        "{status:?}"
    );
    let (code, out, err) = cri.exec(&sleeper, &["echo", "alive"]).await;
    assert_eq!((code, out.as_str()), (0, "alive\n"), "{err}");
    cri.remove_pod(&pod, &[hog, sleeper]).await;
    cri.c.assert_nothing_left();
}

/// The guest's MemTotal in kB.
async fn guest_memtotal_kib(cri: &mut Cri, ctr: &str) -> u64 {
    let (code, out, err) = cri
        .exec(ctr, &["sh", "-c", "grep ^MemTotal: /proc/meminfo"])
        .await;
    assert_eq!(code, 0, "{err}");
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out:?}"))
}

/// With guest.memory_headroom_mib a pod's VM is built bigger than the pod,
/// and the balloon holds the rest from boot: the guest has the pod's
/// 64 MiB plus the reserve. UpdateContainerResources to a higher memory
/// limit (the kubelet's in-place resize) gives the guest what that limit
/// needs, and the container can use it; a limit beyond what the VM was
/// built with is refused with the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd with CRI, CNI plugins, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
async fn a_pods_memory_grows_into_its_headroom_on_update() {
    let mut cri = Cri::start("bridge").await;
    cri.c.set_config("memory_headroom_mib", "512");
    let logs = cri.c.dir.path().join("pod-logs");
    let mut config = pod_config("bxgrow", NamespaceMode::Pod, &[], &logs);
    config.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        memory_limit_in_bytes: 64 << 20,
        ..Default::default()
    });
    let pod = cri.run_pod(&config, HANDLER).await.expect("RunPodSandbox");
    let ctr = cri
        .start_container(&pod, &config, "grower", &["sleep", "600"])
        .await;
    // A VM of 704 MiB whose balloon holds 504 from boot: the guest fills it
    // as its driver comes up, so wait until its total shows it (the
    // inflation is asynchronous; nothing is retried).
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let kib = guest_memtotal_kib(&mut cri, &ctr).await;
        if kib <= 200 * 1024 {
            break kib;
        }
        assert!(
            Instant::now() < deadline,
            "the guest still has {kib} kB after 60 s; the balloon should hold 504 of 704 MiB"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(before > 64 * 1024, "guest MemTotal {before} kB");

    let update = |mib: i64| UpdateContainerResourcesRequest {
        container_id: ctr.clone(),
        linux: Some(LinuxContainerResources {
            memory_limit_in_bytes: mib << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    // A 320 MiB limit needs 456 MiB of guest memory (with the 128 of the
    // reserve and 8 for the guest's page records of the headroom): 256 more
    // than the 200 it booted with.
    cri.rt
        .update_container_resources(update(320))
        .await
        .expect("an update within the headroom");
    let after = guest_memtotal_kib(&mut cri, &ctr).await;
    assert!(
        after >= before + 252 * 1024,
        "guest MemTotal {before} kB before, {after} kB after growing by 256 MiB"
    );
    // More than the whole guest had before the update.
    let (code, out, err) = cri
        .exec(
            &ctr,
            &[
                "sh",
                "-c",
                "dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null && echo filled",
            ],
        )
        .await;
    assert_eq!((code, out.as_str()), (0, "filled\n"), "{err}");

    // 1 GiB needs 1160 MiB, more than the VM's 704.
    let err = cri
        .rt
        .update_container_resources(update(1024))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("which needs 1160 MiB of guest memory")
            && err
                .message()
                .contains("more than the 704 MiB its sandbox VM was built with"),
        "{err}"
    );
    cri.remove_pod(&pod, &[ctr]).await;
    cri.c.assert_nothing_left();
}

# What a process sees of its container, as `key=value` lines, for the
# runc differential suite (tests/runc_differential.rs runs it with
# `python3 -c` under runc and under BoxLite and diffs the output).
# Arguments name the sections to print; every value is deterministic for
# a given runtime set-up (no pids of other processes, no timestamps).
import errno
import os
import pwd
import grp
import resource
import socket
import stat
import sys


def out(key, value):
    print(f"{key}={value}")


def err_name(e):
    return errno.errorcode.get(e.errno, str(e.errno))


def identity():
    out("uid", f"{os.getuid()} euid {os.geteuid()}")
    out("gid", f"{os.getgid()} egid {os.getegid()}")
    out("groups", " ".join(str(g) for g in os.getgroups()))
    try:
        pw = pwd.getpwuid(os.getuid())
        out("passwd", f"{pw.pw_name} home {pw.pw_dir} shell {pw.pw_shell}")
    except KeyError:
        out("passwd", "none")
    names = []
    for g in os.getgroups():
        try:
            names.append(grp.getgrgid(g).gr_name)
        except KeyError:
            names.append(f"#{g}")
    out("group.names", " ".join(names))
    mask = os.umask(0)
    os.umask(mask)
    out("umask", f"{mask:04o}")
    out("cwd", os.getcwd())
    for key in sorted(os.environ):
        out(f"env.{key}", os.environ[key])
    out("hostname", socket.gethostname())
    out("pid1", os.getpid() == 1)
    # An exec's parent is outside its pid namespace (0); the init's too.
    out("ppid", os.getppid())


def status():
    wanted = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
              "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters")
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out(f"status.{key}", " ".join(value.split()))


def limits():
    for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_")):
        soft, hard = resource.getrlimit(getattr(resource, name))
        show = lambda v: "unlimited" if v == resource.RLIM_INFINITY else str(v)
        out(f"rlimit.{name[7:].lower()}", f"{show(soft)} {show(hard)}")


def files():
    for path in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):
        try:
            with open(path) as f:
                for i, line in enumerate(f.read().splitlines()):
                    out(f"file.{path}.{i}", line)
        except OSError as e:
            out(f"file.{path}", err_name(e))


def describe(path):
    st = os.lstat(path)
    mode = st.st_mode
    kind = {stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFDIR: "d",
            stat.S_IFLNK: "l", stat.S_IFREG: "-", stat.S_IFIFO: "p",
            stat.S_IFSOCK: "s"}[stat.S_IFMT(mode)]
    text = f"{kind}{stat.S_IMODE(mode):04o} {st.st_uid}:{st.st_gid}"
    if kind in "cb":
        text += f" {os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
    if kind == "l":
        text += " -> " + os.readlink(path)
    return text


def dev():
    for root, dirs, names in os.walk("/dev"):
        dirs.sort()
        for name in sorted(dirs + names):
            path = os.path.join(root, name)
            out(f"dev.{path}", describe(path))


MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
          "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
          "/proc/sched_debug", "/sys/firmware", "/proc/scsi"]
READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
             "/proc/sysrq-trigger"]


def proc():
    # A masked path that exists is /dev/null (a file) or an empty
    # read-only tmpfs (a directory); one the kernel lacks stays absent.
    for path in MASKED:
        try:
            st = os.stat(path)
        except OSError as e:
            out(f"masked.{path}", err_name(e))
            continue
        if stat.S_ISDIR(st.st_mode):
            out(f"masked.{path}", f"dir entries {len(os.listdir(path))}")
        else:
            with open(path, "rb") as f:
                out(f"masked.{path}", f"file bytes {len(f.read(4096))}")
    # Opening for writing is refused on a read-only mount; nothing is
    # written (the files are harmless to open, not to write).
    for path in READ_ONLY:
        target = path if not os.path.isdir(path) else {
            "/proc/sys": "/proc/sys/kernel/domainname",
        }.get(path)
        try:
            flags = os.statvfs(path).f_flag
        except OSError as e:
            out(f"readonly.{path}", err_name(e))
            continue
        ro = "ro" if flags & os.ST_RDONLY else "rw"
        if target is None:
            out(f"readonly.{path}", ro)
            continue
        try:
            os.close(os.open(target, os.O_WRONLY))
            result = "opened"
        except OSError as e:
            result = err_name(e)
        out(f"readonly.{path}", f"{ro} open-for-write {target}: {result}")


SUPER_KEYS = ("size", "mode", "uid", "gid", "ptmxmode", "nr_inodes")


def mounts():
    # Each mount point once (the last mount on it is what shows), with
    # its type, per-mount flags and the super options a user chooses.
    seen = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].replace("\\040", " ")
            flags = fields[5]
            fstype = fields[sep + 1]
            supers = [o for o in fields[sep + 3].split(",")
                      if o.split("=")[0] in SUPER_KEYS]
            seen[point] = f"{fstype} {flags} {','.join(supers)}".rstrip()
    for point in sorted(seen):
        if point == "/":
            out("mount./.fstype", seen[point].split()[0])
            out("mount./", " ".join(seen[point].split()[1:]))
        else:
            out(f"mount.{point}", seen[point])


def kernel():
    u = os.uname()
    out("kernel.release", u.release)
    out("kernel.version", u.version)
    with open("/proc/sys/kernel/random/boot_id") as f:
        out("kernel.boot_id", f.read().strip())
    out("vm.cpus", len(os.sched_getaffinity(0)))
    with open("/proc/meminfo") as f:
        out("vm.mem_total", f.readline().split()[1])
    with open("/proc/self/cgroup") as f:
        out("cgroup.self", " ".join(f.read().split()))


def seccomp():
    # clone3 with a null argument: EINVAL from the kernel, but ENOSYS under
    # containerd's default seccomp profile (which answers clone3 so, for
    # glibc to fall back to clone) - which one shows says if the filter is on.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(435, None, 0)
    out("seccomp.clone3", "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()])


SECTIONS = {"seccomp": seccomp, "identity": identity, "status": status, "limits": limits,
            "files": files, "dev": dev, "proc": proc, "mounts": mounts,
            "kernel": kernel}

for section in sys.argv[1:]:
    SECTIONS[section]()

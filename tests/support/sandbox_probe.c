/*
 * sandbox_probe: a tiny static helper for the agent's
 * tests/containers_sandboxing.rs and the e2e tests/guest_containers.rs
 * (built by boxlite_test_support::sandbox_probe).
 * It runs inside a container (built with `gcc -static` by the test and
 * copied into the busybox rootfs) and tries one nested-sandboxing step,
 * printing one line with the outcome and the errno *name*, so that the
 * output is the same whichever runtime started the container.
 *
 *   sandbox_probe seccomp [nnp]   install a filter that makes getpid(2)
 *                                 fail with EPERM (after PR_SET_NO_NEW_PRIVS
 *                                 with "nnp"), then call getpid
 *   sandbox_probe setresuid UID   setresuid(UID, UID, UID), print the ids
 *   sandbox_probe unshare-net     unshare(CLONE_NEWNET)
 *
 * Exit status: 0 when the step worked, 1 when it failed, 2 on bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *errname(int e)
{
	switch (e) {
	case EPERM: return "EPERM";
	case EACCES: return "EACCES";
	case EINVAL: return "EINVAL";
	case ENOSYS: return "ENOSYS";
	case EFAULT: return "EFAULT";
	case ENOMEM: return "ENOMEM";
	case EAGAIN: return "EAGAIN";
	case EUSERS: return "EUSERS";
	case ENOSPC: return "ENOSPC";
	default: return "E?";
	}
}

static int fail(const char *what, int e)
{
	printf("%s: error %s (%s)\n", what, errname(e), strerror(e));
	return 1;
}

static int probe_seccomp(int nnp)
{
	struct sock_filter filter[] = {
		/* Another architecture: allow (the test only runs x86-64). */
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getpid, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {
		.len = sizeof(filter) / sizeof(filter[0]),
		.filter = filter,
	};
	long pid;

	if (nnp && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		return fail("prctl(PR_SET_NO_NEW_PRIVS)", errno);
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0)
		return fail(nnp ? "seccomp(nnp)" : "seccomp", errno);
	/* The raw syscall: libc must not answer from a cache. */
	errno = 0;
	pid = syscall(SYS_getpid);
	if (pid == -1)
		printf("%s: filter installed, getpid -> -1 %s\n", nnp ? "seccomp(nnp)" : "seccomp",
		       errname(errno));
	else
		printf("%s: filter installed, but getpid returned a pid\n",
		       nnp ? "seccomp(nnp)" : "seccomp");
	return pid == -1 && errno == EPERM ? 0 : 1;
}

static int probe_setresuid(const char *arg)
{
	uid_t want = (uid_t)strtoul(arg, NULL, 10), r, e, s;

	if (setresuid(want, want, want) != 0)
		return fail("setresuid", errno);
	if (getresuid(&r, &e, &s) != 0)
		return fail("getresuid", errno);
	printf("setresuid: ok, uid=%u euid=%u suid=%u\n", r, e, s);
	return r == want && e == want && s == want ? 0 : 1;
}

static int probe_unshare_net(void)
{
	if (unshare(CLONE_NEWNET) != 0)
		return fail("unshare(CLONE_NEWNET)", errno);
	printf("unshare(CLONE_NEWNET): ok\n");
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 2 && strcmp(argv[1], "seccomp") == 0)
		return probe_seccomp(argc >= 3 && strcmp(argv[2], "nnp") == 0);
	if (argc == 3 && strcmp(argv[1], "setresuid") == 0)
		return probe_setresuid(argv[2]);
	if (argc == 2 && strcmp(argv[1], "unshare-net") == 0)
		return probe_unshare_net();
	fprintf(stderr, "usage: %s seccomp [nnp] | setresuid UID | unshare-net\n", argv[0]);
	return 2;
}

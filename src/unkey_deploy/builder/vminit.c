/*
 * vminit: the static init the builder injects at /.vminit/init of every rootfs.
 *
 * CONTRACT (builder <-> metald <-> this program)
 *
 *   Files, all written by the builder from the image config (app.yaml overrides applied):
 *     /.vminit/argv  NUL-separated argv (Entrypoint + Cmd). argv[0] without '/' is searched in
 *                    the PATH of the final environment. Required.
 *     /.vminit/env   NUL-separated KEY=VALUE entries (image Env, then app.yaml env). metald may
 *                    APPEND entries (request env); a later entry for the same KEY wins. The
 *                    process's own environment (kernel command line, bwrap --setenv) comes first,
 *                    so the file overrides it. PATH defaults to the usual Docker PATH when unset.
 *     /.vminit/cwd   working directory (default "/").
 *     /.vminit/user  "uid:gid" or "uid:gid:g1,g2,..." (numeric, resolved by the builder from
 *                    the image's /etc/passwd and /etc/group). Default "0:0".
 *
 *   Started as:
 *     - a VM: the initramfs does `switch_root /newroot /.vminit/init` (we are PID 1 of the
 *       initial PID namespace);
 *     - a sandbox: `bwrap --as-pid-1 ... /.vminit/init` (PID 1 of a PID namespace; /proc, /dev
 *       and /tmp usually already mounted; setuid to an id unmapped in bwrap's user namespace
 *       fails with EINVAL and is tolerated, because the sandbox already runs unprivileged);
 *     - anything else (tests, debugging in a chroot): not PID 1, nothing is mounted.
 *
 *   When PID 1: mount proc (/proc), sysfs (/sys), devtmpfs (/dev, tmpfs as a fallback), tmpfs
 *   (/tmp, mode 1777), every failure tolerated (already mounted / not permitted); sethostname to
 *   $HOSTNAME when set.
 *   Always: fork; the child does setgroups/setgid/setuid, chdir(cwd), execve(argv, env); the
 *   parent forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 to the child, and reaps
 *   every zombie (it is the subreaper when not PID 1).
 *   When the app exits: prints "vminit: app exited with status N" to stderr; as PID 1 of a VM it
 *   sends SIGTERM then SIGKILL to the remaining processes, sync()s and reboot(RB_POWER_OFF)s;
 *   otherwise it exits with the app's status (128+signal when the app was killed by a signal).
 *   Exit status 127: argv missing/unreadable or execve failed; 126: identity change failed.
 *
 *   No shell is used anywhere: images whose shells the builder removed still start.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static void say(const char *fmt, const char *a, long n) {
    dprintf(2, "vminit: ");
    dprintf(2, fmt, a, n);
    dprintf(2, "\n");
}

/* Whole file into a NUL-terminated buffer; NULL if missing. */
static char *slurp(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = 0;
    *len = n;
    return buf;
}

/* Split a NUL-separated buffer into a NULL-terminated array (empty trailing entry dropped). */
static char **split(char *buf, size_t len, size_t extra, size_t *count) {
    size_t n = 0;
    for (size_t i = 0; i < len; i++)
        if (buf[i] == 0) n++;
    char **out = calloc(n + 2 + extra, sizeof(char *));
    size_t k = 0, start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || buf[i] == 0) {
            if (i > start) out[k++] = buf + start;
            start = i + 1;
        }
    }
    out[k] = NULL;
    *count = k;
    return out;
}

/* Environment: inherited, then /.vminit/env; later KEY wins; PATH defaulted. */
static char **build_env(void) {
    size_t inherited = 0, flen = 0, fcount = 0;
    while (environ && environ[inherited]) inherited++;
    char *fbuf = slurp("/.vminit/env", &flen);
    char **fenv = fbuf ? split(fbuf, flen, 0, &fcount) : calloc(1, sizeof(char *));
    char **all = calloc(inherited + fcount + 2, sizeof(char *));
    size_t n = 0;
    char **srcs[2] = {environ, fenv};
    size_t lens[2] = {inherited, fcount};
    for (int s = 0; s < 2; s++) {
        for (size_t i = 0; i < lens[s]; i++) {
            char *e = srcs[s][i];
            char *eq = strchr(e, '=');
            if (!eq || eq == e) continue;
            size_t klen = (size_t)(eq - e) + 1;
            size_t j;
            for (j = 0; j < n; j++)
                if (strncmp(all[j], e, klen) == 0) break;
            all[j] = e;
            if (j == n) n++;
        }
    }
    int has_path = 0;
    for (size_t j = 0; j < n; j++)
        if (strncmp(all[j], "PATH=", 5) == 0) has_path = 1;
    if (!has_path) all[n++] = DEFAULT_PATH;
    all[n] = NULL;
    return all;
}

static const char *env_get(char **env, const char *key) {
    size_t klen = strlen(key);
    for (; *env; env++)
        if (strncmp(*env, key, klen) == 0 && (*env)[klen] == '=') return *env + klen + 1;
    return NULL;
}

static void mount_quiet(const char *src, const char *dst, const char *type, unsigned long fl,
                        const char *data) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, fl, data) != 0 && errno != EBUSY)
        say("note: mount %s: errno %ld (tolerated)", dst, errno);
}

/* Running as PID 1 of the initial PID namespace (a VM) rather than of a container's. */
static int in_vm(void) {
    size_t len = 0;
    char *comm = slurp("/proc/2/comm", &len);
    int vm = comm && strncmp(comm, "kthreadd", 8) == 0;
    free(comm);
    return vm;
}

static int set_identity(void) {
    size_t len = 0;
    char *u = slurp("/.vminit/user", &len);
    if (!u) return 0;
    char *end;
    errno = 0;
    unsigned long uid = strtoul(u, &end, 10);
    if (*end != ':') goto bad;
    unsigned long gid = strtoul(end + 1, &end, 10);
    gid_t groups[64];
    size_t ng = 0;
    groups[ng++] = (gid_t)gid;
    if (*end == ':') {
        char *p = end + 1;
        while (*p && *p != '\n' && ng < 64) {
            groups[ng++] = (gid_t)strtoul(p, &end, 10);
            if (end == p) goto bad;
            p = (*end == ',') ? end + 1 : end;
        }
    } else if (*end && *end != '\n') {
        goto bad;
    }
    if (getuid() == uid && getgid() == gid) return 0;
    if (setgroups(ng, groups) != 0 && errno != EPERM && errno != EINVAL) {
        say("setgroups %s: errno %ld", u, errno);
        return -1;
    }
    if (setgid((gid_t)gid) != 0 || setuid((uid_t)uid) != 0) {
        if (errno == EINVAL) { /* unmapped in this user namespace (sandbox) */
            say("note: user %s not mapped here, keeping the sandbox identity (errno %ld)", u, errno);
            return 0;
        }
        say("cannot switch to user %s: errno %ld", u, errno);
        return -1;
    }
    return 0;
bad:
    say("malformed /.vminit/user %s", u, 0);
    return -1;
}

int main(void) {
    int pid1 = getpid() == 1;
    size_t alen = 0, acount = 0, clen = 0;
    char *abuf = slurp("/.vminit/argv", &alen);
    char **argv = abuf ? split(abuf, alen, 0, &acount) : NULL;
    if (!argv || acount == 0) {
        say("no command: /.vminit/argv is missing or empty%s", "", 0);
        return 127;
    }
    char **env = build_env();
    char *cwd = slurp("/.vminit/cwd", &clen);
    if (!cwd || !*cwd) cwd = "/";

    if (pid1) {
        mount_quiet("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
        mount_quiet("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
        mkdir("/dev", 0755);
        if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL) != 0 && errno != EBUSY)
            mount_quiet("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=0755");
        mount_quiet("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
        const char *host = env_get(env, "HOSTNAME");
        if (host && *host) sethostname(host, strlen(host));
    } else {
        prctl(PR_SET_CHILD_SUBREAPER, 1);
    }

    sigset_t all, fwd;
    sigemptyset(&fwd);
    int fwd_sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof fwd_sigs / sizeof *fwd_sigs; i++) sigaddset(&fwd, fwd_sigs[i]);
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);

    pid_t child = fork();
    if (child < 0) {
        say("fork: errno %s%ld", "", errno);
        return 127;
    }
    if (child == 0) {
        sigprocmask(SIG_UNBLOCK, &all, NULL);
        setsid();
        if (set_identity() != 0) _exit(126);
        if (chdir(cwd) != 0) {
            say("chdir %s: errno %ld", cwd, errno);
            _exit(126);
        }
        environ = env;
        execvp(argv[0], argv);
        say("execve %s: errno %ld", argv[0], errno);
        _exit(127);
    }

    int status = 0, done = 0;
    while (!done) {
        int sig = 0;
        if (sigwait(&all, &sig) != 0) continue;
        if (sig == SIGCHLD) {
            for (;;) {
                int st;
                pid_t p = waitpid(-1, &st, WNOHANG);
                if (p <= 0) break;
                if (p == child) {
                    status = st;
                    done = 1;
                }
            }
        } else if (sigismember(&fwd, sig)) {
            kill(child, sig);
        }
    }
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    say("app exited with status %s%ld", "", code);

    if (pid1 && in_vm()) {
        kill(-1, SIGTERM);
        sleep(1);
        kill(-1, SIGKILL);
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
        sync();
        reboot(RB_POWER_OFF);
        for (;;) pause(); /* reboot failed: PID 1 must not exit (kernel panic) */
    }
    return code;
}

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkp-hook: the qemu hook of nkp (installed as
 * SYSCONFDIR/libvirt/hooks/qemu.d/50-nkp).
 *
 *   50-nkp DOMAIN OP SUBOP EXTRA      (the full domain XML on stdin)
 *
 * What it does, per libvirt step:
 *
 *   prepare begin, restore begin   unwrap the VM's DEKs (KDK from the key
 *                                  cache, unsealed from the store on a miss)
 *                                  and define them as ephemeral private
 *                                  libvirt secrets (the UUIDs the keysafe
 *                                  names).  Provider not here: exit 1 with
 *                                  one line naming the VM, the provider and
 *                                  the fix; record a vm-locked alarm; touch
 *                                  nothing else.
 *   migrate begin (destination)    before any state arrives, so a refusal
 *                                  leaves the source running and nothing is
 *                                  lost (see "The migrate step" below); then
 *                                  the same as prepare.  stdout stays empty
 *                                  (it would replace the incoming XML).
 *   reconnect begin                (libvirtd restarted; ephemeral secrets
 *                                  are gone) define them again, best effort:
 *                                  ALWAYS exit 0, because a failing reconnect
 *                                  hook makes libvirt kill the running VM.
 *   release end                    undefine the VM's secrets (errors ignored,
 *                                  as libvirt ignores them).
 *   anything else                  exit 0 at once.
 *
 * Before a start (prepare/restore begin), for every domain, nkp or not:
 * an `nkpctl vm encrypt/decrypt/rekey --deep` on it that is running makes
 * the start fail with one line; one that was killed is finished or rolled
 * back first, to match the definition being started (finish_interrupted,
 * docs/crash-safety.md).
 *
 * A domain without an nkp keysafe or a plain vTPM is not nkp's business:
 * exit 0, no output.  Input nkp cannot read as a domain (malformed,
 * truncated, empty, too large, a DOCTYPE) fails closed at the steps that can
 * fail (prepare, restore, migrate): exit 1 with one line, because nkp cannot
 * tell whether it starts a plain vTPM; only under [vtpm] policy=off does
 * such input go on (exit 0), and never when it mentions nkp's namespace.
 * reconnect and release always exit 0 on it (hook.c says why).
 *
 * Output: nothing on stdout, ever (stdout is /dev/null from the first
 * instruction).  On failure exactly one line on stderr, which libvirt puts
 * into its error ("Hook script execution failed: … <the line>").
 *
 * Bounded time: alarm(2) arms a deadline for the whole process (default
 * 20 s, 10 s for reconnect; NKP_HOOK_TIMEOUT seconds overrides).  When it
 * fires the hook writes one line and exits (status 1, or 0 where failing
 * would hurt: reconnect, release).  Nothing it does can hang libvirt for
 * longer than that.
 *
 * Why calling libvirt's secret API from the hook is safe
 * -------------------------------------------------------
 * libvirt runs the hook from the thread that performs the domain operation,
 * holding that domain's object lock and job.  Calling back into libvirt
 * about the same domain would wait for that lock: a deadlock.  The hook
 * never touches a domain.  It opens "secret:///system" (only the secret
 * driver; with the monolithic libvirtd the remote driver routes it to
 * libvirtd's socket, with modular daemons to virtsecretd) and calls
 * virSecretLookupByUUIDString / virSecretDefineXML / virSecretSetValue /
 * virSecretUndefine.  The secret driver has its own lock (the secret object
 * list), never a domain lock, and the qemu driver only reads secrets after
 * the prepare hook has returned, so there is no lock cycle.
 *
 * The remaining shared resource is libvirtd's pool of RPC worker threads.
 * An API-initiated start holds one worker for the whole start, hook
 * included, so with max_workers (default 20) simultaneous starts every
 * ordinary worker would be waiting on a hook.  The hook still gets served:
 * every call it makes (CONNECT_OPEN/CLOSE, AUTH_LIST, SECRET_LOOKUP_BY_UUID,
 * SECRET_DEFINE_XML, SECRET_SET_VALUE, SECRET_UNDEFINE) is marked
 * "@priority: high" in libvirt's remote_protocol.x, so the daemon may run it
 * on its separate priority workers (prio_workers, default 5), which never
 * take domain jobs and never wait on a hook.  So there is no cycle: a hook
 * waits at most for other short, non-blocking high-priority calls.  With
 * the modular daemons the calls go to virtsecretd, another process.  The
 * deadline above bounds whatever is left (a wedged daemon).
 *
 * Cost (bench/bench-hook.sh, README "Benchmarks"): a step with nothing to
 * do (a domain that is not nkp's, an ignored step) ~4 ms, since libnkp
 * loads libvirt and tpm2-tss only when it needs them; an nkp VM's prepare
 * ~19 ms, most of it loading libvirt.  Measured in the lab
 * (integration/t-nkp-lifecycle.sh, TCG, 2 vCPUs, a loaded machine): 8 simultaneous `virsh start` of
 * encrypted VMs all succeed in ~5 s; 24 simultaneous (more than
 * max_workers = 20) all succeed too: 17.9 s for all 24 first starts
 * (swtpm_setup included), 12.2 s for the next 24 (`virsh start --paused`).
 *
 * Key hygiene: the DEKs live only in nkp_secret buffers (locked, wiped) and
 * in the secret API call; the process is made non-dumpable and core files
 * are disabled before any key is touched.
 *
 * The steps themselves are libnkp's (nkp_hook_run, plugin/lib/hook.c,
 * which also documents the migrate step's checks); this program keeps
 * argv, stdin, the deadline, the process hygiene and the one line.
 *
 * Environment (tests only): NKP_ROOT relocates nkp's files (default "/"),
 * NKP_LIBVIRT_URI overrides the connection URI, NKP_HOOK_TIMEOUT the
 * deadline in seconds. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <glib.h>

#include "nkp/nkp.h"

static volatile sig_atomic_t exit_on_timeout = 1;

static void on_alarm(int sig)
{
        (void) sig;
        static const char msg[] = "nkp: the hook ran out of time (libvirt or the key store did "
                                  "not answer); see the libvirtd log.\n";
        ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void) w;
        _exit(exit_on_timeout);
}

/* Reads stdin up to the cap; *ret_len = NKP_DOMAIN_XML_MAX + 1 means "too large" (the
 * rest is drained so libvirt never sees EPIPE). */
static char *read_stdin(size_t *ret_len)
{
        size_t cap = NKP_DOMAIN_XML_MAX + 1, len = 0;
        size_t alloc = 64 * 1024;
        char *buf = g_malloc(alloc);
        for (;;) {
                if (len == alloc && alloc < cap) {
                        alloc = MIN(alloc * 2, cap);
                        buf = g_realloc(buf, alloc);
                }
                if (len == alloc) {
                        char sink[4096];
                        ssize_t n = read(STDIN_FILENO, sink, sizeof sink);
                        if (n > 0 || (n < 0 && errno == EINTR))
                                continue;
                        break;
                }
                ssize_t n = read(STDIN_FILENO, buf + len, alloc - len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                len += (size_t) n;
        }
        *ret_len = len;
        return buf;
}

static void one_line(const char *msg)
{
        /* Exactly one line: fold any newline the message might hold. */
        g_autofree char *m = g_strdup(msg && msg[0] ? msg : "failed (no detail)");
        for (char *p = m; *p; p++)
                if (*p == '\n' || *p == '\r')
                        *p = ' ';
        fprintf(stderr, "nkp: %s\n", m);
        fflush(stderr);
}

static unsigned timeout_seconds(enum nkp_hook_step step)
{
        const char *t = g_getenv("NKP_HOOK_TIMEOUT");
        if (t && t[0]) {
                unsigned long v = strtoul(t, NULL, 10);
                if (v > 0 && v < 3600)
                        return (unsigned) v;
        }
        return step == NKP_HOOK_RECONNECT ? 10 : 20;
}

static const char *env_or_null(const char *name)
{
        const char *v = g_getenv(name);
        return v && v[0] ? v : NULL;
}

static double ms_since(gint64 t0)
{
        return (double) (g_get_monotonic_time() - t0) / 1000.0;
}

int main(int argc, char **argv)
{
        /* No stdout, ever: for migrate it would replace the incoming XML. */
        int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (devnull >= 0) {
                dup2(devnull, STDOUT_FILENO);
                if (devnull != STDOUT_FILENO)
                        close(devnull);
        }
        if (argc < 4)
                return 0;
        const char *domain = argv[1];
        enum nkp_hook_step step = nkp_hook_step_of(argv[2], argv[3]);
        const bool may_fail = nkp_hook_step_may_fail(step);
        exit_on_timeout = may_fail ? 1 : 0;
        struct sigaction sa = { .sa_handler = on_alarm };
        sigaction(SIGALRM, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);
        alarm(timeout_seconds(step));

        /* Before any key is touched. */
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        struct rlimit nocore = { 0, 0 };
        setrlimit(RLIMIT_CORE, &nocore);

        /* NKP_HOOK_TIMING=1 (measurements only): one line of phase times on
         * stderr at exit 0. */
        gint64 t0 = g_get_monotonic_time();
        size_t len = 0;
        g_autofree char *xml = read_stdin(&len); /* read even when unused: no EPIPE */
        double t_read = ms_since(t0);
        if (step == NKP_HOOK_NONE)
                return 0;
        int r = nkp_hook_run(env_or_null("NKP_ROOT"), env_or_null("NKP_LIBVIRT_URI"), step,
                             domain, xml, len);
        if (r < 0) {
                /* reconnect: libvirt logs the line and the VM lives on. */
                one_line(nkp_error_message());
                return may_fail ? 1 : 0;
        }
        if (may_fail && g_getenv("NKP_HOOK_TIMING"))
                fprintf(stderr, "nkp: timing read=%.1fms run=%.1fms\n", t_read, ms_since(t0));
        return 0;
}

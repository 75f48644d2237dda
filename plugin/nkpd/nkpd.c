/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpd: nkp's optional event daemon (issue 7).  Runs as root.
 *
 *  1. Automatic enrolment.  Follows libvirt's domain lifecycle events
 *     ("defined": added or updated, e.g. by virt-manager, virt-install or
 *     virt-xml --add-device --tpm) and enrols a domain with a plain emulator
 *     vTPM (no <encryption>) and no vTPM state yet with the host's default
 *     provider: DEK, keysafe in <metadata>, <encryption secret=…> -- before
 *     its first start.  A start that wins the race is refused by the hook
 *     (never in clear).  On start and after every reconnect (libvirtd
 *     restart) it scans every defined domain, so nothing defined while it
 *     was away is missed.  [vtpm] policy in nkp.conf: only "enrol" (the
 *     default) enrols.
 *  2. The vTPM certificate signer for nkp-swtpm-certs when swtpm_setup runs
 *     as a non-root swtpm_user: ROOT/run/nkp/ekca.sock, answered for root and
 *     [vtpm] swtpm_user only (SO_PEERCRED at accept), one certificate of each
 *     kind per live hook ticket, each client within 2 s and never blocking
 *     the loop (see swtpm-hooks/nkp-swtpm-certs.c, plugin/lib/daemon.c).
 *     The CA key never leaves nkpd.
 *
 * Both live in libnkp (nkp_daemon_new, nkp.h); this program parses its
 * command line, hardens the process, prints the library's log and stops on
 * a signal.
 *
 *   nkpd [--connect URI] [--no-libvirt]
 *
 * Logs one line per action on stderr (the journal under systemd).  Exits on
 * SIGTERM/SIGINT, removing its socket.  NKP_ROOT relocates nkp's files
 * (tests). */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <glib.h>

#include "nkp/nkp.h"

static volatile sig_atomic_t quit;

static void on_signal(int sig)
{
        (void) sig;
        quit = 1;
}

/* Everything but the library's debug trace (every failure, also handled
 * ones) goes to the log. */
static void print_log(enum nkp_log_level level, const char *message, void *userdata)
{
        (void) userdata;
        if (level == NKP_LOG_DEBUG)
                return;
        fprintf(stderr, "nkpd: %s\n", message);
        fflush(stderr);
}

static void harden(void)
{
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        struct rlimit nocore = { 0, 0 };
        setrlimit(RLIMIT_CORE, &nocore);
        struct sigaction sa = { .sa_handler = on_signal };
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);
}

int main(int argc, char **argv)
{
        const char *uri = "qemu:///system";
        unsigned flags = 0;
        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--connect") == 0 && i + 1 < argc)
                        uri = argv[++i];
                else if (strcmp(argv[i], "--no-libvirt") == 0)
                        flags |= NKP_DAEMON_NO_LIBVIRT;
                else {
                        fprintf(stderr, "Usage: nkpd [--connect URI] [--no-libvirt]\n");
                        return 2;
                }
        }
        harden();
        nkp_set_log_func(print_log, NULL);

        const char *root = g_getenv("NKP_ROOT");
        nkp_context *ctx = NULL;
        nkp_daemon *d = NULL;
        if (nkp_context_new(root && root[0] ? root : "/", &ctx) < 0 ||
            nkp_daemon_new(ctx, uri, flags, &d) < 0) {
                print_log(NKP_LOG_ERROR, nkp_error_message(), NULL);
                nkp_context_free(ctx);
                return 1;
        }
        int status = 0;
        while (!quit && status == 0)
                if (nkp_daemon_iterate(d) < 0) {
                        /* Exit 1: systemd's Restart=on-failure starts a new one. */
                        print_log(NKP_LOG_ERROR, nkp_error_message(), NULL);
                        status = 1;
                }
        nkp_daemon_free(d);
        nkp_context_free(ctx);
        print_log(NKP_LOG_INFO, "stopped", NULL);
        return status;
}

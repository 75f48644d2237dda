/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpd: nkp's optional event daemon (issue 7).  Runs as root.
 *
 *  1. Automatic enrolment.  Follows libvirt's domain lifecycle events
 *     (VIR_DOMAIN_EVENT_DEFINED: added or updated, e.g. by virt-manager,
 *     virt-install or virt-xml --add-device --tpm) and enrols a domain with a
 *     plain emulator vTPM (no <encryption>) and no vTPM state yet with the
 *     host's default provider: DEK, keysafe in <metadata>, <encryption
 *     secret=…> -- before its first start (nkp_vm_auto_enrol, enrol.c).  A
 *     start that wins the race is refused by the hook (never in clear).  On
 *     start and after every reconnect (libvirtd restart) it scans every
 *     defined domain, so nothing defined while it was away is missed.
 *     [vtpm] policy in nkp.conf: only "enrol" (the default) enrols.
 *  2. The vTPM certificate signer for nkp-swtpm-certs when swtpm_setup runs
 *     as a non-root swtpm_user: ROOT/run/nkp/ekca.sock, answered for root and
 *     [vtpm] swtpm_user only (SO_PEERCRED), for VMs with a live hook ticket
 *     (see swtpm-hooks/nkp-swtpm-certs.c).  The CA key never leaves nkpd.
 *
 *   nkpd [--connect URI] [--no-libvirt]
 *
 * Logs one line per action on stderr (the journal under systemd).  Exits on
 * SIGTERM/SIGINT, removing its socket.  NKP_ROOT relocates nkp's files
 * (tests). */
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <libvirt/libvirt.h>

#include "nkp-private.h"

static volatile sig_atomic_t quit;
static nkp_context *ctx;
static uid_t swtpm_uid = (uid_t) -1;
static GPtrArray *pending; /* domain names from events */
static bool conn_closed;

static void logline(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static void logline(const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        g_autofree char *m = g_strdup_vprintf(fmt, ap);
        va_end(ap);
        fprintf(stderr, "nkpd: %s\n", m);
        fflush(stderr);
}

static void on_signal(int sig)
{
        (void) sig;
        quit = 1;
}

static void on_tick(int timer, void *opaque)
{
        (void) timer;
        (void) opaque;
}

/* ---- the signer socket ------------------------------------------------------ */

static void on_client(int watch, int fd, int events, void *opaque)
{
        (void) watch;
        (void) events;
        (void) opaque;
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
                return;
        g_autofree char *note = NULL;
        if (nkp_ekca_serve(ctx, c, swtpm_uid, &note) < 0)
                logline("certificate request refused: %s", nkp_error_message());
        else if (note)
                logline("%s", note);
        close(c);
}

static int listen_signer(char **ret_path)
{
        g_autofree char *path = nkp_context_path(ctx, NKP_EKCA_SOCKET);
        g_autofree char *dir = g_path_get_dirname(path);
        if (g_mkdir_with_parents(dir, 0755) < 0)
                return nkp_fail(-errno, "Cannot make '%s': %s.", dir, g_strerror(errno));
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof sa.sun_path)
                return nkp_fail(-ENAMETOOLONG, "The socket path '%s' is too long.", path);
        strcpy(sa.sun_path, path);
        (void) unlink(path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0 || chmod(path, 0666) < 0 ||
            listen(fd, 16) < 0) {
                int e = errno;
                if (fd >= 0)
                        close(fd);
                return nkp_fail(-e, "Cannot listen on '%s': %s.", path, g_strerror(e));
        }
        *ret_path = g_steal_pointer(&path);
        return fd;
}

/* ---- libvirt -------------------------------------------------------------------- */

static int on_lifecycle(virConnectPtr conn, virDomainPtr dom, int event, int detail, void *opaque)
{
        (void) conn;
        (void) detail;
        (void) opaque;
        if (event == VIR_DOMAIN_EVENT_DEFINED) {
                const char *name = virDomainGetName(dom);
                if (name)
                        g_ptr_array_add(pending, g_strdup(name));
        }
        return 0;
}

static void on_close(virConnectPtr conn, int reason, void *opaque)
{
        (void) conn;
        (void) reason;
        (void) opaque;
        conn_closed = true;
}

static void enrol(NkpVirt *v, const char *name)
{
        g_autofree char *note = NULL;
        int r = nkp_vm_auto_enrol(ctx, v, name, &note);
        if (r < 0)
                logline("%s", nkp_error_message());
        else if (note)
                logline("%s", note);
}

static void scan_all(NkpVirt *v)
{
        g_autoptr(GPtrArray) names = NULL;
        if (nkp_virt_domain_list(v, &names) < 0) {
                logline("%s", nkp_error_message());
                return;
        }
        for (guint i = 0; i < names->len; i++)
                enrol(v, names->pdata[i]);
}

static NkpVirt *connect_libvirt(const char *uri, int *ret_cb)
{
        NkpVirt *v = NULL;
        if (nkp_virt_open(uri, 0, &v) < 0)
                return NULL;
        virConnectPtr conn = nkp_virt_connection(v);
        int cb = virConnectDomainEventRegisterAny(conn, NULL, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                  VIR_DOMAIN_EVENT_CALLBACK(on_lifecycle), NULL,
                                                  NULL);
        if (cb < 0) {
                nkp_virt_close(v);
                return NULL;
        }
        virConnectRegisterCloseCallback(conn, on_close, NULL, NULL);
        virConnectSetKeepAlive(conn, 5, 3);
        conn_closed = false;
        *ret_cb = cb;
        logline("following libvirt's domain events at '%s'", uri ? uri : "(default)");
        scan_all(v);
        return v;
}

static void disconnect_libvirt(NkpVirt *v, int cb)
{
        virConnectPtr conn = nkp_virt_connection(v);
        virConnectDomainEventDeregisterAny(conn, cb);
        virConnectUnregisterCloseCallback(conn, on_close);
        nkp_virt_close(v);
}

int main(int argc, char **argv)
{
        const char *uri = "qemu:///system";
        bool use_libvirt = true;
        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--connect") == 0 && i + 1 < argc)
                        uri = argv[++i];
                else if (strcmp(argv[i], "--no-libvirt") == 0)
                        use_libvirt = false;
                else {
                        fprintf(stderr, "Usage: nkpd [--connect URI] [--no-libvirt]\n");
                        return 2;
                }
        }
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        struct rlimit nocore = { 0, 0 };
        setrlimit(RLIMIT_CORE, &nocore);
        struct sigaction sa = { .sa_handler = on_signal };
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);

        const char *root = g_getenv("NKP_ROOT");
        if (nkp_context_new(root && root[0] ? root : "/", &ctx) < 0) {
                logline("%s", nkp_error_message());
                return 1;
        }
        struct passwd *pw = getpwnam(ctx->vtpm_swtpm_user);
        if (pw)
                swtpm_uid = pw->pw_uid;
        else
                logline("swtpm user '%s' unknown: the signer answers root only",
                        ctx->vtpm_swtpm_user);

        if (virEventRegisterDefaultImpl() < 0) {
                logline("cannot start libvirt's event loop");
                return 1;
        }
        g_autofree char *sock_path = NULL;
        int lfd = listen_signer(&sock_path);
        if (lfd < 0) {
                logline("%s", nkp_error_message());
                return 1;
        }
        virEventAddHandle(lfd, VIR_EVENT_HANDLE_READABLE, on_client, NULL, NULL);
        virEventAddTimeout(1000, on_tick, NULL, NULL);
        logline("vTPM certificate signer at '%s' (root and '%s'); [vtpm] policy=%s", sock_path,
                ctx->vtpm_swtpm_user,
                ctx->vtpm_policy == NKP_VTPM_POLICY_ENROL     ? "enrol"
                : ctx->vtpm_policy == NKP_VTPM_POLICY_REQUIRE ? "require"
                                                              : "off");

        pending = g_ptr_array_new_with_free_func(g_free);
        NkpVirt *v = NULL;
        int cb = -1;
        gint64 next_try = 0;
        while (!quit) {
                if (use_libvirt && !v && g_get_monotonic_time() >= next_try) {
                        v = connect_libvirt(uri, &cb);
                        if (!v)
                                next_try = g_get_monotonic_time() + 2 * G_USEC_PER_SEC;
                }
                if (virEventRunDefaultImpl() < 0)
                        break;
                if (v && conn_closed) {
                        logline("libvirt went away; reconnecting");
                        disconnect_libvirt(v, cb);
                        v = NULL;
                        g_ptr_array_set_size(pending, 0);
                        continue;
                }
                while (v && pending->len) {
                        g_autofree char *name = g_ptr_array_steal_index(pending, 0);
                        enrol(v, name);
                }
        }
        if (v)
                disconnect_libvirt(v, cb);
        close(lfd);
        (void) unlink(sock_path);
        logline("stopped");
        nkp_context_free(ctx);
        return 0;
}

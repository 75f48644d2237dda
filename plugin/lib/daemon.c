/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpd as a library (public API, nkp.h "Automatic enrolment / daemon"):
 * libvirt's default event loop carries both services,
 *
 *  - the vTPM certificate signer: a listening UNIX socket in ROOT/run/nkp
 *    (0750 root:<swtpm user's group>), its clients checked at accept
 *    (SO_PEERCRED), read without blocking and answered by nkp_ekca_answer
 *    (ekca.c: ticket, signature), so the CA key stays in this root process;
 *  - automatic enrolment: a connection to libvirt with a lifecycle event
 *    callback; names of "defined" domains are queued by the callback and
 *    enrolled after the loop pass (nkp_vm_auto_enrol, enrol.c), not inside
 *    libvirt's dispatch, whose connection lock the enrolment's own calls
 *    would need.  A closed connection (libvirtd restarted) is dropped and
 *    opened again 2 s later; every (re)connect scans every defined domain,
 *    so nothing defined while nkpd was away is missed.
 *  - copies made behind nkp's back (issue 16, issue 14's alarms): backup
 *    jobs, block copies, saves and dumps of nkp VMs raise vm-clear-copy /
 *    vm-clear-save alarms (vm-backup.c: NkpCopyWatch, the events libvirt
 *    9.0 sends and the look at running VMs' jobs every 0.5 s).
 *  - new disks (issue 15, enrol.c): the same pass runs the disk check
 *    (nkp_vm_auto_enrol_disks) for "defined" and "stopped" domains, and for
 *    every persistent definition libvirt rewrites in ROOT/etc/libvirt/qemu
 *    (inotify): libvirt 9.0 sends no event when `attach-disk --config`
 *    changes a definition.
 *  - plain snapshot layers (issue 16, vm-snapshot.c): the same pass, and a
 *    pass of its own for every running definition libvirt rewrites in
 *    ROOT/run/libvirt/qemu (inotify, the same descriptor), raise
 *    vm-plain-layer the moment `virsh snapshot-create-as --disk-only`
 *    makes a plain overlay (nkp_vm_watch_plain_layers): libvirt 9.0 sends
 *    no event for a snapshot, but rewrites both files when the snapshot
 *    changes a disk's source (a transient VM has the running one only).
 *  - definitions carrying another VM's keysafe (issue 16, vm-clone.c:
 *    virt-clone --preserve-data / --skip-copy, copies by hand) raise
 *    vm-foreign-keysafe in the same pass, before anything else, and are
 *    then left alone: nothing enrolled, nothing rewritten.
 *
 * This file, virt.c and vm-backup.c (backups, block copies, the copy watch)
 * are the only ones that call libvirt. */
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#include "dl-libvirt.h" /* libvirt is loaded by nkp_daemon_new(), not at start */
#include "nkp-private.h"

#define RECONNECT_DELAY_USEC (2 * G_USEC_PER_SEC)
#define TICK_MS 1000 /* libvirt's loop retries poll() on EINTR: wake to see the stop flag */
#define KEEPALIVE_INTERVAL 5
#define KEEPALIVE_COUNT 3
/* While vm-locked alarms are open (a network-bound provider whose Tang
 * servers did not answer, a provider restored since), nkpd runs what
 * `nkpctl host unlock` runs, first after 5 s, then backing off to 5 min:
 * each try may wait on clevis (bounded, tang.c). */
#define UNLOCK_DELAY_MIN (5 * G_USEC_PER_SEC)
#define UNLOCK_DELAY_MAX (300 * G_USEC_PER_SEC)

struct nkp_daemon {
        nkp_context *ctx;
        /* the signer */
        uid_t swtpm_uid; /* (uid_t) -1: root only */
        gid_t swtpm_gid; /* the socket directory's group; 0 (root) if the user is unknown */
        int listen_fd;
        GPtrArray *clients; /* SignerClient: those being read */
        char *socket_path;
        int listen_watch;
        int tick_timer;
        /* libvirt */
        bool use_libvirt;
        char *uri; /* NULL: libvirt's default */
        NkpVirt *virt;
        int event_cb;
        bool conn_closed;
        bool unreachable_logged;
        gint64 next_connect; /* monotonic, µs */
        gint64 next_unlock;  /* monotonic, µs: the next retry while vm-locked alarms are open */
        gint64 unlock_delay; /* µs, doubled per failed retry up to UNLOCK_DELAY_MAX */
        GPtrArray *pending;  /* names of domains from "defined" events */
        GPtrArray *pending_chains; /* names of running domains whose status XML changed */
        int defs_fd;         /* inotify on ROOT/etc/libvirt/qemu, -1 when none */
        int run_wd;          /* its watch on ROOT/run/libvirt/qemu, -1 when none */
        int defs_watch;
        NkpCopyWatch *copies; /* copies behind nkp's back (vm-backup.c) */
        int job_cb, block_cb;
        gint64 next_poll;    /* monotonic, µs */
};

static const char *policy_name(int policy)
{
        switch (policy) {
        case NKP_VTPM_POLICY_ENROL:
                return "enrol";
        case NKP_VTPM_POLICY_REQUIRE:
                return "require";
        default:
                return "off";
        }
}

/* ---- the signer socket --------------------------------------------------------- */
/* Each client is a small state in libvirt's loop, never a blocking read:
 * SO_PEERCRED right after accept (others are refused before a byte is
 * read), then its request is read as it arrives, answered when whole, and
 * dropped at NKP_EKCA_CLIENT_DEADLINE_MS after accept whatever it did.  At
 * most CLIENT_MAX at once; more are refused at once.  A slow or silent
 * client costs one slot for 2 s and delays nobody. */

#define CLIENT_MAX 16

typedef struct {
        nkp_daemon *d;
        int fd;
        int watch;
        int timer;
        size_t len;
        char buf[NKP_EKCA_REQ_MAX];
} SignerClient;

static void client_close(SignerClient *c)
{
        if (c->watch >= 0)
                virEventRemoveHandle(c->watch);
        if (c->timer >= 0)
                virEventRemoveTimeout(c->timer);
        close(c->fd);
        g_ptr_array_remove_fast(c->d->clients, c);
        g_free(c);
}

static void client_answer(SignerClient *c)
{
        g_autoptr(GBytes) answer = NULL;
        g_autofree char *note = NULL;
        if (nkp_ekca_answer(c->d->ctx, c->buf, c->len, &answer, &note) < 0)
                nkp_log(NKP_LOG_WARNING, "certificate request refused: %s", nkp_error_message());
        else if (note)
                nkp_log(NKP_LOG_INFO, "%s", note);
        gsize n = 0;
        const void *p = g_bytes_get_data(answer, &n);
        /* A few KiB into the empty socket buffer of a fresh connection: never waits;
         * a client that made it fail gets nothing. */
        if (send(c->fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t) n)
                nkp_log(NKP_LOG_WARNING, "cannot send the certificate answer: %s",
                        g_strerror(errno));
        client_close(c);
}

static void on_client_data(int watch, int fd, int events, void *opaque)
{
        (void) watch;
        (void) events;
        SignerClient *c = opaque;
        for (;;) {
                ssize_t n = read(fd, c->buf + c->len, sizeof c->buf - c->len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                        return; /* more later, or the deadline */
                if (n > 0)
                        c->len += (size_t) n;
                if (n <= 0 || c->len == sizeof c->buf ||
                    nkp_ekca_request_complete(c->buf, c->len)) {
                        client_answer(c); /* whole, too long or cut: nkp_ekca_answer says */
                        return;
                }
        }
}

static void on_client_deadline(int timer, void *opaque)
{
        (void) timer;
        SignerClient *c = opaque;
        nkp_log(NKP_LOG_WARNING, "a certificate client sent no whole request within %d ms: dropped",
                NKP_EKCA_CLIENT_DEADLINE_MS);
        nkp_ekca_send_line(c->fd, "ERR nkp: ", "the certificate request did not arrive in time.");
        client_close(c);
}

static void client_add(nkp_daemon *d, int fd)
{
        if (nkp_ekca_peer_check(fd, d->swtpm_uid) < 0) {
                nkp_log(NKP_LOG_WARNING, "%s", nkp_error_message());
                nkp_ekca_send_line(fd, "ERR nkp: ", "only root and libvirt's swtpm user may ask "
                                                    "for vTPM certificates.");
                close(fd);
                return;
        }
        if (d->clients->len >= CLIENT_MAX) {
                nkp_log(NKP_LOG_WARNING, "%d certificate clients at once: one refused", CLIENT_MAX);
                nkp_ekca_send_line(fd, "ERR nkp: ", "nkpd is busy; try again.");
                close(fd);
                return;
        }
        SignerClient *c = g_new0(SignerClient, 1);
        c->d = d;
        c->fd = fd;
        c->watch = virEventAddHandle(fd, VIR_EVENT_HANDLE_READABLE, on_client_data, c, NULL);
        c->timer = virEventAddTimeout(NKP_EKCA_CLIENT_DEADLINE_MS, on_client_deadline, c, NULL);
        g_ptr_array_add(d->clients, c);
        if (c->watch < 0 || c->timer < 0) {
                nkp_log(NKP_LOG_WARNING, "cannot watch a certificate client");
                client_close(c);
        }
}

static void on_client(int watch, int fd, int events, void *opaque)
{
        (void) watch;
        (void) events;
        nkp_daemon *d = opaque;
        int c;
        while ((c = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)) >= 0)
                client_add(d, c);
}

/* ROOT/run/nkp: root and the swtpm user's group may enter (the socket), no
 * one else; set at every start, whoever made it (the hook makes it 0700). */
static int prepare_socket_dir(nkp_daemon *d, const char *dir)
{
        if (g_mkdir_with_parents(dir, 0750) < 0) {
                int e = errno;
                return nkp_fail(-e, "Cannot make '%s': %s.", dir, g_strerror(e));
        }
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 || fchown(fd, 0, d->swtpm_gid) < 0 || fchmod(fd, 0750) < 0) {
                int e = errno;
                if (fd >= 0)
                        close(fd);
                return nkp_fail(-e, "Cannot make '%s' a directory of root and group %u, mode "
                                    "0750: %s.",
                                dir, (unsigned) d->swtpm_gid, g_strerror(e));
        }
        close(fd);
        return 0;
}

static int listen_signer(nkp_daemon *d)
{
        g_autofree char *path = nkp_context_path(d->ctx, NKP_EKCA_SOCKET);
        g_autofree char *dir = g_path_get_dirname(path);
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof sa.sun_path)
                return nkp_fail(-ENAMETOOLONG, "The socket path '%s' is too long.", path);
        strcpy(sa.sun_path, path);
        int r = prepare_socket_dir(d, dir);
        if (r < 0)
                return r;
        (void) unlink(path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0 ||
            chown(path, 0, d->swtpm_gid) < 0 || chmod(path, 0660) < 0 || listen(fd, 16) < 0) {
                int e = errno;
                if (fd >= 0)
                        close(fd);
                return nkp_fail(-e, "Cannot listen on '%s': %s.", path, g_strerror(e));
        }
        d->listen_fd = fd;
        d->socket_path = g_steal_pointer(&path);
        return 0;
}

static void resolve_swtpm_user(nkp_daemon *d)
{
        struct passwd *pw = getpwnam(d->ctx->vtpm_swtpm_user);
        if (pw) {
                d->swtpm_uid = pw->pw_uid;
                d->swtpm_gid = pw->pw_gid;
        } else
                nkp_log(NKP_LOG_WARNING, "swtpm user '%s' unknown: the signer answers root only",
                        d->ctx->vtpm_swtpm_user);
}

/* ---- libvirt ------------------------------------------------------------------- */

static void on_tick(int timer, void *opaque)
{
        (void) timer;
        (void) opaque;
}

static void queue_in(GPtrArray *queue, const char *name)
{
        for (guint i = 0; i < queue->len; i++)
                if (strcmp(queue->pdata[i], name) == 0)
                        return;
        g_ptr_array_add(queue, g_strdup(name));
}

static void queue_domain(nkp_daemon *d, const char *name)
{
        queue_in(d->pending, name);
}

/* A persistent definition written (NAME.xml, rewritten by rename): its
 * domain is queued like a "defined" one.  A running one (the run
 * directory's watch): its disk chains only. */
static void on_definitions(int watch, int fd, int events, void *opaque)
{
        (void) watch;
        (void) events;
        nkp_daemon *d = opaque;
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        ssize_t n;
        while ((n = read(fd, buf, sizeof buf)) > 0) {
                for (char *p = buf; p < buf + n;) {
                        const struct inotify_event *ev = (const struct inotify_event *) p;
                        p += sizeof *ev + ev->len;
                        if (!ev->len || !g_str_has_suffix(ev->name, ".xml"))
                                continue;
                        g_autofree char *name = g_strndup(ev->name, strlen(ev->name) - 4);
                        /* read at once: the next write may have dropped a mirror */
                        if (ev->wd == d->run_wd && name[0] &&
                            nkp_copy_watch_status_written(d->ctx, d->copies, name))
                                d->next_poll = 0; /* a job started or ended: look now */
                        if (d->virt && name[0])
                                queue_in(ev->wd == d->run_wd ? d->pending_chains : d->pending,
                                         name);
                }
        }
}

static void watch_definitions(nkp_daemon *d)
{
        g_autofree char *dir = nkp_context_path(d->ctx, "/etc/libvirt/qemu");
        int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (fd < 0 || inotify_add_watch(fd, dir, IN_CLOSE_WRITE | IN_MOVED_TO) < 0) {
                nkp_log(NKP_LOG_INFO, "cannot watch '%s' (%s): new disks are seen on libvirt's "
                                      "events only",
                        dir, g_strerror(errno));
                if (fd >= 0)
                        close(fd);
                return;
        }
        d->defs_fd = fd;
        d->defs_watch = virEventAddHandle(fd, VIR_EVENT_HANDLE_READABLE, on_definitions, d, NULL);
}

/* The running definitions (status XML) in ROOT/run/libvirt/qemu, which
 * libvirtd makes: added at each connect (the same watch again when it
 * exists). */
static void watch_running(nkp_daemon *d)
{
        g_autofree char *dir = nkp_context_path(d->ctx, "/run/libvirt/qemu");
        if (d->defs_fd < 0)
                return;
        d->run_wd = inotify_add_watch(d->defs_fd, dir, IN_CLOSE_WRITE | IN_MOVED_TO);
        if (d->run_wd < 0)
                nkp_log(NKP_LOG_INFO, "cannot watch '%s' (%s): a plain snapshot layer of a "
                                      "transient VM is seen by vm status and at start only",
                        dir, g_strerror(errno));
}

static int copy_watch_idle_ms(void)
{
        const char *t = g_getenv("NKP_TEST_COPY_WATCH_IDLE_MS");
        return t ? (int) g_ascii_strtoull(t, NULL, 10) : NKP_COPY_WATCH_IDLE_MS;
}

static void queue_copy(nkp_daemon *d, virDomainPtr dom, const char *what, const char *disk)
{
        char uuid[VIR_UUID_STRING_BUFLEN];
        const char *name = virDomainGetName(dom);
        if (name && virDomainGetUUIDString(dom, uuid) == 0)
                nkp_copy_watch_event(d->copies, what, name, uuid, disk);
}

static int on_job_completed(virConnectPtr conn, virDomainPtr dom, virTypedParameterPtr params,
                            int nparams, void *opaque)
{
        (void) conn;
        int op = 0;
        if (virTypedParamsGetInt(params, nparams, VIR_DOMAIN_JOB_OPERATION, &op) == 1 &&
            op == VIR_DOMAIN_JOB_OPERATION_BACKUP)
                queue_copy(opaque, dom, "backup", NULL);
        return 0;
}

static int on_block_job(virConnectPtr conn, virDomainPtr dom, const char *disk, int type,
                        int status, void *opaque)
{
        (void) conn;
        /* READY, and the end (the watch skips the end of a job whose READY
         * it handled: the end alone means READY was not seen) */
        if (type == VIR_DOMAIN_BLOCK_JOB_TYPE_COPY && status == VIR_DOMAIN_BLOCK_JOB_READY)
                queue_copy(opaque, dom, "copy", disk);
        else if (type == VIR_DOMAIN_BLOCK_JOB_TYPE_COPY &&
                 (status == VIR_DOMAIN_BLOCK_JOB_COMPLETED || status == VIR_DOMAIN_BLOCK_JOB_CANCELED))
                queue_copy(opaque, dom, "copy-end", disk);
        return 0;
}

static int on_lifecycle(virConnectPtr conn, virDomainPtr dom, int event, int detail, void *opaque)
{
        (void) conn;
        nkp_daemon *d = opaque;
        if (event == VIR_DOMAIN_EVENT_STOPPED && detail == VIR_DOMAIN_EVENT_STOPPED_SAVED)
                queue_copy(d, dom, "save", NULL);
        /* Defined: a new vTPM or disk to enrol.  Stopped: a new empty disk
         * added while the VM ran can be converted now (enrol.c).
         * Undefined: its vm-foreign-keysafe alarm goes (vm-clone.c; virt-clone
         * defines and undefines the original's keysafe when it fails). */
        if (event == VIR_DOMAIN_EVENT_DEFINED || event == VIR_DOMAIN_EVENT_STOPPED ||
            event == VIR_DOMAIN_EVENT_UNDEFINED) {
                const char *name = virDomainGetName(dom);
                if (name)
                        queue_domain(d, name);
        }
        return 0;
}

static void on_close(virConnectPtr conn, int reason, void *opaque)
{
        (void) conn;
        (void) reason;
        nkp_daemon *d = opaque;
        d->conn_closed = true;
}

/* Plain snapshot layers: logged once per change of the alarm, not at each
 * rewrite (the alarm itself is raised once, vm-snapshot.c). */
static void check_chains(nkp_daemon *d, const char *name)
{
        /* Sealed first, so the alarm below already says so. */
        g_autofree char *sealed = NULL;
        if (nkp_vm_seal_plain_tops(d->ctx, d->virt, name, &sealed) < 0)
                nkp_log(NKP_LOG_ERROR, "%s", nkp_error_message());
        else if (sealed)
                nkp_log(NKP_LOG_WARNING, "%s", sealed);
        nkp_error_clear();
        g_autofree char *note = NULL;
        if (nkp_vm_watch_plain_layers(d->ctx, d->virt, name, &note) < 0)
                nkp_log(NKP_LOG_ERROR, "%s", nkp_error_message());
        else if (note)
                nkp_log(NKP_LOG_WARNING, "%s", note);
        nkp_error_clear();
}

static void enrol(nkp_daemon *d, const char *name)
{
        /* A copy carrying another VM's keysafe: alarm, and hands off (an
         * enrolment would rewrite a definition that is not a clone). */
        g_autofree char *foreign = NULL;
        int r = nkp_vm_watch_foreign_keysafe(d->ctx, d->virt, name, &foreign);
        if (foreign)
                nkp_log(NKP_LOG_WARNING, "%s", foreign);
        if (r < 0)
                nkp_log(NKP_LOG_ERROR, "%s", nkp_error_message());
        nkp_error_clear();
        if (r != 0)
                return;
        g_autofree char *note = NULL;
        r = nkp_vm_auto_enrol(d->ctx, d->virt, name, &note);
        if (r < 0)
                nkp_log(NKP_LOG_ERROR, "%s", nkp_error_message());
        else if (note)
                nkp_log(NKP_LOG_INFO, "%s", note);
        g_autofree char *disks_note = NULL;
        r = nkp_vm_auto_enrol_disks(d->ctx, d->virt, name, &disks_note);
        if (r < 0)
                nkp_log(NKP_LOG_ERROR, "%s", nkp_error_message());
        else if (disks_note)
                nkp_log(NKP_LOG_INFO, "%s", disks_note);
        g_autofree char *snap_note = NULL;
        if (nkp_vm_refuse_snapshots(d->ctx, d->virt, name, &snap_note) < 0)
                nkp_log(NKP_LOG_ERROR, "%s", nkp_error_message());
        else if (snap_note)
                nkp_log(NKP_LOG_INFO, "%s", snap_note);
        nkp_error_clear();
        check_chains(d, name);
}

static void scan_all(nkp_daemon *d)
{
        g_autoptr(GPtrArray) names = NULL;
        if (nkp_virt_domain_list(d->virt, &names) < 0) {
                nkp_log(NKP_LOG_ERROR, "%s", nkp_error_message());
                return;
        }
        for (guint i = 0; i < names->len; i++)
                enrol(d, names->pdata[i]);
}

static void disconnect_libvirt(nkp_daemon *d)
{
        if (!d->virt)
                return;
        virConnectPtr conn = nkp_virt_connection(d->virt);
        if (d->event_cb >= 0)
                virConnectDomainEventDeregisterAny(conn, d->event_cb);
        if (d->job_cb >= 0)
                virConnectDomainEventDeregisterAny(conn, d->job_cb);
        if (d->block_cb >= 0)
                virConnectDomainEventDeregisterAny(conn, d->block_cb);
        d->job_cb = d->block_cb = -1;
        virConnectUnregisterCloseCallback(conn, on_close);
        nkp_virt_close(d->virt);
        d->virt = NULL;
        d->event_cb = -1;
        g_ptr_array_set_size(d->pending, 0);
        g_ptr_array_set_size(d->pending_chains, 0);
}

static void connect_libvirt(nkp_daemon *d)
{
        const char *shown = d->uri ? d->uri : "(default)";
        NkpVirt *v = NULL;
        if (nkp_virt_open(d->uri, 0, &v) < 0) {
                if (!d->unreachable_logged)
                        nkp_log(NKP_LOG_WARNING, "%s Trying again every 2 s.",
                                nkp_error_message());
                d->unreachable_logged = true;
                d->next_connect = g_get_monotonic_time() + RECONNECT_DELAY_USEC;
                return;
        }
        virConnectPtr conn = nkp_virt_connection(v);
        int cb = virConnectDomainEventRegisterAny(conn, NULL, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                  VIR_DOMAIN_EVENT_CALLBACK(on_lifecycle), d,
                                                  NULL);
        if (cb < 0) {
                virErrorPtr e = virGetLastError();
                if (!d->unreachable_logged)
                        nkp_log(NKP_LOG_WARNING,
                                "Cannot follow libvirt's domain events at '%s': %s. Trying "
                                "again every 2 s.",
                                shown, e && e->message ? e->message : "unknown libvirt error");
                d->unreachable_logged = true;
                nkp_virt_close(v);
                d->next_connect = g_get_monotonic_time() + RECONNECT_DELAY_USEC;
                return;
        }
        /* the copy alarms: best effort (a libvirt without them still enrols) */
        d->job_cb = virConnectDomainEventRegisterAny(conn, NULL, VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                                     VIR_DOMAIN_EVENT_CALLBACK(on_job_completed),
                                                     d, NULL);
        d->block_cb = virConnectDomainEventRegisterAny(conn, NULL, VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                                                       VIR_DOMAIN_EVENT_CALLBACK(on_block_job), d,
                                                       NULL);
        if (d->job_cb < 0 || d->block_cb < 0)
                nkp_log(NKP_LOG_WARNING, "Cannot follow libvirt's job events: copies made "
                                         "behind nkp's back raise no alarm.");
        d->virt = v;
        d->event_cb = cb;
        d->conn_closed = false;
        d->unreachable_logged = false;
        virConnectRegisterCloseCallback(conn, on_close, d, NULL);
        virConnectSetKeepAlive(conn, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT);
        nkp_log(NKP_LOG_INFO, "following libvirt's domain events at '%s'", shown);
        watch_running(d);
        scan_all(d);
        nkp_copy_watch_start_scan(d->ctx, v, d->copies); /* made while nkpd was stopped */
}

/* ---- the daemon ------------------------------------------------------------------ */

int nkp_daemon_new(nkp_context *ctx, const char *uri, unsigned flags, nkp_daemon **ret)
{
        if (flags & ~(unsigned) NKP_DAEMON_NO_LIBVIRT)
                return nkp_fail(-EINVAL, "Unknown daemon flags 0x%x.", flags);
        int r = nkp_dlopen_libvirt(); /* its event loop serves the socket too */
        if (r < 0)
                return r;
        if (virEventRegisterDefaultImpl() < 0)
                return nkp_fail(-EIO, "Cannot start libvirt's event loop.");
        nkp_daemon *d = g_new0(nkp_daemon, 1);
        d->ctx = ctx;
        d->swtpm_uid = (uid_t) -1;
        d->listen_fd = -1;
        d->listen_watch = -1;
        d->tick_timer = -1;
        d->event_cb = -1;
        d->job_cb = d->block_cb = -1;
        d->copies = nkp_copy_watch_new();
        d->use_libvirt = !(flags & NKP_DAEMON_NO_LIBVIRT);
        d->uri = g_strdup(uri);
        d->pending = g_ptr_array_new_with_free_func(g_free);
        d->pending_chains = g_ptr_array_new_with_free_func(g_free);
        d->run_wd = -1;
        d->clients = g_ptr_array_new();
        d->defs_fd = -1;
        d->defs_watch = -1;

        resolve_swtpm_user(d);
        r = listen_signer(d);
        if (r < 0) {
                nkp_daemon_free(d);
                return r;
        }
        d->listen_watch = virEventAddHandle(d->listen_fd, VIR_EVENT_HANDLE_READABLE, on_client,
                                            d, NULL);
        d->tick_timer = virEventAddTimeout(TICK_MS, on_tick, NULL, NULL);
        if (d->use_libvirt)
                watch_definitions(d);
        if (d->listen_watch < 0 || d->tick_timer < 0) {
                nkp_daemon_free(d);
                return nkp_fail(-EIO, "Cannot watch the signer socket in libvirt's event loop.");
        }
        nkp_log(NKP_LOG_INFO, "vTPM certificate signer at '%s' (root and '%s'); [vtpm] policy=%s; "
                              "[disks] policy=%s",
                d->socket_path, ctx->vtpm_swtpm_user, policy_name(ctx->vtpm_policy),
                policy_name(ctx->disks_policy)); /* the same three words and values */
        /* The host key at boot, before VMs are started (docs/host-key.md). */
        int hk = nkp_host_key_load(ctx);
        if (hk < 0)
                nkp_log(NKP_LOG_WARNING, "%s", nkp_error_message());
        else if (hk > 0)
                nkp_log(NKP_LOG_INFO, "host key added: the protected directories are unlocked");
        nkp_error_clear();
        *ret = d;
        return 0;
}

/* The retry of locked VMs, with backoff (see UNLOCK_DELAY_MIN). */
static void retry_unlock(nkp_daemon *d)
{
        gint64 now = g_get_monotonic_time();
        if (now < d->next_unlock)
                return;
        if (!nkp_alarm_open(d->ctx, "vm-locked", NULL, NULL)) {
                d->unlock_delay = UNLOCK_DELAY_MIN;
                d->next_unlock = now + UNLOCK_DELAY_MIN;
                nkp_error_clear();
                return;
        }
        nkp_vm_status **list = NULL;
        size_t n = 0;
        unsigned still = 0;
        if (nkp_host_unlock(d->ctx, d->virt, &list, &n, &still) < 0)
                still = 1;
        nkp_vm_status_list_free(list, n);
        if (still == 0)
                nkp_log(NKP_LOG_INFO, "every locked VM is unlocked (their providers opened)");
        d->unlock_delay = still ? MIN(MAX(d->unlock_delay, UNLOCK_DELAY_MIN) * 2, UNLOCK_DELAY_MAX)
                                : UNLOCK_DELAY_MIN;
        d->next_unlock = g_get_monotonic_time() + d->unlock_delay;
        nkp_error_clear();
}

int nkp_daemon_iterate(nkp_daemon *d)
{
        if (d->use_libvirt && !d->virt && g_get_monotonic_time() >= d->next_connect)
                connect_libvirt(d);
        if (virEventRunDefaultImpl() < 0)
                return nkp_fail(-EIO, "libvirt's event loop failed.");
        if (d->virt && d->conn_closed) {
                nkp_log(NKP_LOG_WARNING, "libvirt went away; reconnecting");
                disconnect_libvirt(d); /* the next pass connects again */
                return 0;
        }
        while (d->virt && d->pending->len) {
                g_autofree char *name = g_ptr_array_steal_index(d->pending, 0);
                enrol(d, name);
        }
        while (d->virt && d->pending_chains->len) {
                g_autofree char *name = g_ptr_array_steal_index(d->pending_chains, 0);
                check_chains(d, name);
        }
        if (d->virt)
                retry_unlock(d);
        if (d->virt) {
                nkp_copy_watch_process(d->ctx, d->virt, d->copies);
                if (g_get_monotonic_time() >= d->next_poll) {
                        int ms = nkp_copy_watch_poll(d->ctx, d->virt, d->copies)
                                         ? NKP_COPY_WATCH_BUSY_MS
                                         : copy_watch_idle_ms();
                        d->next_poll = g_get_monotonic_time() + (gint64) ms * 1000;
                        virEventUpdateTimeout(d->tick_timer, ms); /* wake for the next look */
                }
        }
        return 0;
}

void nkp_daemon_free(nkp_daemon *d)
{
        if (!d)
                return;
        disconnect_libvirt(d);
        while (d->clients->len)
                client_close(d->clients->pdata[0]);
        g_ptr_array_unref(d->clients);
        if (d->listen_watch >= 0)
                virEventRemoveHandle(d->listen_watch);
        if (d->tick_timer >= 0)
                virEventRemoveTimeout(d->tick_timer);
        if (d->defs_watch >= 0)
                virEventRemoveHandle(d->defs_watch);
        if (d->defs_fd >= 0)
                close(d->defs_fd);
        if (d->listen_fd >= 0)
                close(d->listen_fd);
        if (d->socket_path)
                (void) unlink(d->socket_path);
        g_free(d->socket_path);
        g_free(d->uri);
        g_ptr_array_unref(d->pending);
        g_ptr_array_unref(d->pending_chains);
        nkp_copy_watch_free(d->copies);
        g_free(d);
}

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
 * A domain without an nkp keysafe, or input that is not a domain XML and
 * does not mention nkp's namespace, is not nkp's business: exit 0, no
 * output.  Input that mentions nkp's namespace but cannot be parsed: exit 1
 * with one line (for the steps that can fail).
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
 * Measured in the lab (integration/t-nkp-lifecycle.sh, TCG, 2 vCPUs, a
 * loaded machine): hook prepare for a VM with a vTPM and one disk ~23 ms
 * inside the hook (connect ~6 ms, two secrets defined and set ~14 ms),
 * 33-62 ms median through nsenter; 8 simultaneous `virsh start` of
 * encrypted VMs all succeed in ~5 s; 24 simultaneous (more than
 * max_workers = 20) all succeed too: 17.9 s for all 24 first starts
 * (swtpm_setup included), 12.2 s for the next 24 (`virsh start --paused`).
 *
 * Key hygiene: the DEKs live only in nkp_secret buffers (locked, wiped) and
 * in the secret API call; the process is made non-dumpable and core files
 * are disabled before any key is touched.
 *
 * The migrate step (destination, `migrate begin`)
 * ------------------------------------------------
 * In this order, each failure one line naming the VM, this host
 * (g_get_host_name()) and the fix, plus a "migration-refused" alarm:
 *   1. every provider the incoming keysafe names is here (store or key
 *      cache) with the same key id and fingerprint.  A provider of the same
 *      name with another key (or the same key id with another key) is
 *      drift, said as such;
 *   2. every wrapped DEK unwraps (a keysafe altered in the incoming XML
 *      fails here, or already when the XML is parsed);
 *   3. TLS policy: this host's libvirt forces TLS for migrations
 *      (migrate_tls_force = 1 in qemu.conf), or nkp.conf allows plain
 *      migrations ([migration] allow_plain = true).  The hook cannot see
 *      virsh's flags, and libvirt checks migrate_tls_force only where a
 *      migration begins (the source), so nkp makes it a condition for a
 *      host to receive nkp VMs: every host of a pool that receives them
 *      then refuses to send in clear too.  docs/migration.md defends it.
 * Then the secrets are defined as for a start (same UUIDs, same values:
 * the vTPM state arrives encrypted with the migration key).  A successful
 * step clears an earlier "migration-refused" alarm for the VM.
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

#include "nkp-private.h"

enum action {
        ACT_NONE,
        ACT_START,     /* prepare begin, restore begin */
        ACT_MIGRATE,   /* migrate begin */
        ACT_RECONNECT, /* reconnect begin */
        ACT_RELEASE,   /* release end */
};

static volatile sig_atomic_t exit_on_timeout = 1;

/* NKP_HOOK_TIMING=1 (measurements only): one line of phase times on stderr
 * at exit 0. */
static gint64 t_start;
static GString *timing;

static void mark(const char *phase)
{
        if (!timing)
                return;
        g_string_append_printf(timing, " %s=%.1fms", phase,
                               (double) (g_get_monotonic_time() - t_start) / 1000.0);
}

static void on_alarm(int sig)
{
        (void) sig;
        static const char msg[] = "nkp: the hook ran out of time (libvirt or the key store did "
                                  "not answer); see the libvirtd log.\n";
        ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void) w;
        _exit(exit_on_timeout);
}

static enum action classify(const char *op, const char *subop)
{
        if (strcmp(op, "prepare") == 0 && strcmp(subop, "begin") == 0)
                return ACT_START;
        if (strcmp(op, "restore") == 0 && strcmp(subop, "begin") == 0)
                return ACT_START;
        if (strcmp(op, "migrate") == 0 && strcmp(subop, "begin") == 0)
                return ACT_MIGRATE;
        if (strcmp(op, "reconnect") == 0 && strcmp(subop, "begin") == 0)
                return ACT_RECONNECT;
        if (strcmp(op, "release") == 0 && strcmp(subop, "end") == 0)
                return ACT_RELEASE;
        return ACT_NONE;
}

/* Reads stdin up to the cap; *ret_len = NKP_DOMAIN_XML_MAX + 1 means "too
 * large" (the rest is drained so libvirt never sees EPIPE). */
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

static void one_line(const char *domain, const char *msg)
{
        /* Exactly one line: fold any newline the message might hold. */
        g_autofree char *m = g_strdup(msg && msg[0] ? msg : "failed (no detail)");
        for (char *p = m; *p; p++)
                if (*p == '\n' || *p == '\r')
                        *p = ' ';
        (void) domain;
        fprintf(stderr, "nkp: %s\n", m);
        fflush(stderr);
}

static const char *libvirt_uri(void)
{
        const char *u = g_getenv("NKP_LIBVIRT_URI");
        return u && u[0] ? u : NKP_HOOK_DEFAULT_URI;
}

/* Defines every secret of the VM.  Returns 0 or a negative errno (message
 * set). */
static int define_secrets(nkp_context *ctx, const NkpDomain *d)
{
        g_autoptr(GPtrArray) secrets = NULL;
        int r = nkp_vm_unlock(ctx, d, true, &secrets);
        mark("unwrapped");
        if (r == -ENOKEY || r == -EKEYREJECTED) {
                g_autofree char *msg = g_strdup(nkp_error_message());
                (void) nkp_alarm_raise(ctx, "vm-locked", d->name, msg);
                nkp_fail(r, "%s", msg);
                return r;
        }
        if (r < 0)
                return r;

        g_autoptr(NkpVirt) v = NULL;
        r = nkp_virt_open(libvirt_uri(), 0, &v);
        mark("connected");
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot start: its keys cannot be handed to "
                                          "libvirt",
                                       d->name);
        for (guint i = 0; i < secrets->len; i++) {
                const NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_DISK) == 0 && !s->volume)
                        continue; /* the disk is no longer in the VM */
                r = nkp_virt_secret_define(v, s->secret_uuid, s->kind, d->uuid, s->volume,
                                           s->value);
                if (r < 0)
                        return nkp_fail_prefix(r, "VM '%s' cannot start", d->name);
        }
        mark("defined");
        return 0;
}

static void undefine_secrets(const NkpDomain *d)
{
        g_autoptr(NkpVirt) v = NULL;
        if (nkp_virt_open(libvirt_uri(), 0, &v) < 0)
                return;
        for (size_t i = 0; i < nkp_keysafe_n_entries(d->keysafe); i++)
                (void) nkp_virt_secret_undefine(v, nkp_keysafe_entry_secret_uuid(d->keysafe, i));
}

/* ---- the migrate step (destination) ------------------------------------- */

/* migrate_tls_force in libvirt's qemu.conf (virConf syntax; the first
 * assignment wins, as in libvirt).  A missing file is libvirt's default: 0. */
static bool qemu_conf_forces_tls(const char *path)
{
        g_autofree char *text = NULL;
        if (!g_file_get_contents(path, &text, NULL, NULL))
                return false;
        g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
        for (char **l = lines; *l; l++) {
                char *hash = strchr(*l, '#');
                if (hash)
                        *hash = '\0';
                char *p = g_strstrip(*l);
                if (!g_str_has_prefix(p, "migrate_tls_force"))
                        continue;
                p += strlen("migrate_tls_force");
                while (*p == ' ' || *p == '\t')
                        p++;
                if (*p != '=')
                        continue; /* another key with that prefix */
                p = g_strstrip(p + 1);
                return strcmp(p, "1") == 0;
        }
        return false;
}

/* A provider in this host's store or key cache with `name` but another key
 * id than `key_id`: its key id into `ret` (NKP_UUID_STRING_LEN + 1). */
static bool provider_name_drift(nkp_context *ctx, const char *name, const char *key_id, char *ret)
{
        g_autoptr(NkpStore) store = NULL;
        if (nkp_store_load(ctx, &store) == 0) {
                const NkpStoreEntry *e = nkp_store_find(store, name);
                if (e && g_ascii_strcasecmp(e->key_id, key_id) != 0) {
                        g_strlcpy(ret, e->key_id, NKP_UUID_STRING_LEN + 1);
                        return true;
                }
        }
        g_autoptr(GArray) cached = NULL;
        if (nkp_cache_list(ctx, &cached) == 0) {
                for (guint i = 0; i < cached->len; i++) {
                        const NkpCacheInfo *c = &g_array_index(cached, NkpCacheInfo, i);
                        if (!c->deleted && strcmp(c->name, name) == 0 &&
                            g_ascii_strcasecmp(c->key_id, key_id) != 0) {
                                g_strlcpy(ret, c->key_id, NKP_UUID_STRING_LEN + 1);
                                return true;
                        }
                }
        }
        nkp_error_clear();
        return false;
}

static int migrate_refuse(nkp_context *ctx, const NkpDomain *d, int err, const char *msg)
{
        (void) nkp_alarm_raise(ctx, "migration-refused", d->name, msg);
        return nkp_fail(err, "%s", msg);
}

/* Steps 1-3 of "The migrate step" above.  0, or a negative errno with the
 * one-line message set (and the alarm recorded). */
static int migrate_check(nkp_context *ctx, const NkpDomain *d)
{
        const char *host = g_get_host_name();
        const char *pname = nkp_keysafe_provider_name(d->keysafe);
        const char *key_id = nkp_keysafe_provider_key_id(d->keysafe);
        if (!pname)
                pname = "?";
        if (!key_id)
                key_id = "?";

        int r = nkp_vm_unlock(ctx, d, false, NULL);
        if (r == -ENOKEY) {
                char other[NKP_UUID_STRING_LEN + 1];
                g_autofree char *msg = NULL;
                if (provider_name_drift(ctx, pname, key_id, other))
                        msg = g_strdup_printf(
                                "VM '%s' cannot be migrated to host '%s': provider drift: the "
                                "provider '%s' here is another key (key id %s) than the '%s' that "
                                "protects the VM (key id %s). Remove this one (nkpctl provider "
                                "delete %s) and restore the VM's provider from its backup "
                                "(nkpctl provider restore FILE.p12), then migrate again.",
                                d->name, host, pname, other, pname, key_id, pname);
                else
                        msg = g_strdup_printf(
                                "VM '%s' cannot be migrated to host '%s': its key provider '%s' "
                                "(key id %s) is not on this host. Restore it here first (nkpctl "
                                "provider restore FILE.p12), then migrate again.",
                                d->name, host, pname, key_id);
                return migrate_refuse(ctx, d, r, msg);
        }
        if (r == -EKEYREJECTED) {
                g_autofree char *msg = g_strdup_printf(
                        "VM '%s' cannot be migrated to host '%s': provider drift: the provider "
                        "with key id %s here holds another key than the '%s' that protects the "
                        "VM (fingerprint mismatch). Restore the VM's provider from its own "
                        "backup here (nkpctl provider restore FILE.p12), then migrate again.",
                        d->name, host, key_id, pname);
                return migrate_refuse(ctx, d, r, msg);
        }
        if (r < 0) {
                g_autofree char *msg = g_strdup_printf(
                        "VM '%s' cannot be migrated to host '%s'%s: %s", d->name, host,
                        r == -EBADMSG ? " (the keysafe in the incoming domain XML was altered "
                                        "or damaged; the VM stays where it is)"
                                      : "",
                        nkp_error_message());
                return migrate_refuse(ctx, d, r, msg);
        }

        if (!ctx->migration_allow_plain && !qemu_conf_forces_tls(ctx->migration_qemu_conf)) {
                g_autofree char *msg = g_strdup_printf(
                        "VM '%s' cannot be migrated to host '%s': nkp VMs only move between "
                        "hosts that force TLS for migrations, and this one does not "
                        "(migrate_tls_force is not 1 in %s). Set migrate_tls_force = 1 there, "
                        "restart libvirtd and migrate with --tls; or allow plain migrations "
                        "in %s ([migration] allow_plain = true).",
                        d->name, host, ctx->migration_qemu_conf, ctx->conf_path);
                return migrate_refuse(ctx, d, -EPERM, msg);
        }
        (void) nkp_alarm_clear(ctx, "migration-refused", d->name);
        nkp_error_clear();
        return 0;
}

static unsigned timeout_seconds(enum action act)
{
        const char *t = g_getenv("NKP_HOOK_TIMEOUT");
        if (t && t[0]) {
                unsigned long v = strtoul(t, NULL, 10);
                if (v > 0 && v < 3600)
                        return (unsigned) v;
        }
        return act == ACT_RECONNECT ? 10 : 20;
}

/* issue 7: a VM with a plain emulator vTPM and no keysafe.  The [vtpm]
 * policy decides (enrol.c): no state yet -> refused until nkpd has enrolled
 * it (never started in clear); require -> refused; off, or existing clear
 * state -> not nkp's business. */
static int plain_vtpm_start(const char *domain, const NkpDomain *d)
{
        const char *root = g_getenv("NKP_ROOT");
        g_autoptr(nkp_context) ctx = NULL;
        if (nkp_context_new(root && root[0] ? root : "/", &ctx) < 0 ||
            nkp_vtpm_start_check(ctx, d) < 0) {
                one_line(domain, nkp_error_message());
                return 1;
        }
        return 0;
}

/* issue 7: the first start of an nkp vTPM runs swtpm_setup, which calls
 * nkp-swtpm-certs; the ticket tells it (or nkpd) that this VM's vTPM is
 * being manufactured now, by this provider (see swtpm-hooks/). */
static int ekca_ticket(nkp_context *ctx, const NkpDomain *d)
{
        if (!d->has_vtpm || !d->tpm_secret || nkp_vtpm_state(ctx, d) != NKP_VTPM_STATE_NONE)
                return 0;
        int r = nkp_ekca_ticket_write(ctx, d->uuid, nkp_keysafe_provider_key_id(d->keysafe),
                                      NKP_EKCA_TICKET_TTL);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot start: its vTPM certificate ticket "
                                          "cannot be written",
                                       d->name);
        return 0;
}

/* issue 6: `nkpctl vm encrypt/decrypt/rekey --deep` replaces the VM's files
 * under a journal and a lock (journal.c, docs/crash-safety.md).  Lock held:
 * that command is running; the VM must not start on half-converted files.
 * Lock free but a journal: the command died (kill -9, power loss); the
 * files are made to match the definition being started, old side or new
 * (renames and unlinks only: bounded, and no call into libvirt).  Then the
 * start goes on.  Returns 0, or -1 with the one line written. */
static int finish_interrupted(const char *domain, const NkpDomain *d)
{
        uint8_t raw_uuid[16];
        if (!d->uuid || nkp_uuid_parse(d->uuid, raw_uuid) < 0)
                return 0; /* libvirt always gives one; nkpctl never journals without */
        const char *root = g_getenv("NKP_ROOT");
        g_autoptr(nkp_context) ctx = NULL;
        if (nkp_context_new(root && root[0] ? root : "/", &ctx) < 0) {
                nkp_error_clear();
                return 0; /* the steps below report a broken config if it matters */
        }
        int fd = -1;
        int r = nkp_journal_lock(ctx, d->uuid, false, &fd);
        if (r == -ENOENT)
                return 0; /* nkpctl never converted this VM's files */
        g_autoptr(NkpJournal) j = NULL;
        if (r == -EBUSY) {
                g_autofree char *msg = NULL;
                if (nkp_journal_load(ctx, d->uuid, &j) == 0)
                        msg = g_strdup_printf("VM '%s' cannot start now: it is being re-encrypted "
                                              "by nkpctl (%s, %s); wait for it to finish, then "
                                              "start it.",
                                              d->name,
                                              strcmp(j->op, "rekey-deep") == 0 ? "vm rekey --deep"
                                                                               : j->op,
                                              nkp_journal_phase_name(j->phase));
                else
                        msg = g_strdup_printf("VM '%s' cannot start now: nkpctl is changing its "
                                              "keys; wait for it to finish, then start it.",
                                              d->name);
                one_line(domain, msg);
                return -1;
        }
        if (r < 0) {
                one_line(domain, nkp_error_message());
                return -1;
        }
        r = nkp_journal_load(ctx, d->uuid, &j);
        if (r == 0) {
                g_autofree char *sig = nkp_domain_signature(d);
                r = nkp_journal_reconcile(ctx, j, sig, NULL);
                if (r < 0) {
                        /* The message names the VM and the fix. */
                        nkp_journal_unlock(fd);
                        one_line(domain, nkp_error_message());
                        return -1;
                }
                mark("reconciled");
        } else if (r != -ENOENT) {
                g_autofree char *msg = g_strdup_printf("VM '%s' cannot start: %s", d->name,
                                                       nkp_error_message());
                nkp_journal_unlock(fd);
                one_line(domain, msg);
                return -1;
        }
        nkp_journal_unlock(fd);
        nkp_error_clear();
        return 0;
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
        enum action act = classify(argv[2], argv[3]);
        exit_on_timeout = (act == ACT_START || act == ACT_MIGRATE) ? 1 : 0;
        struct sigaction sa = { .sa_handler = on_alarm };
        sigaction(SIGALRM, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);
        alarm(timeout_seconds(act));

        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        struct rlimit nocore = { 0, 0 };
        setrlimit(RLIMIT_CORE, &nocore);

        t_start = g_get_monotonic_time();
        if (g_getenv("NKP_HOOK_TIMING"))
                timing = g_string_new(NULL);
        size_t len = 0;
        g_autofree char *xml = read_stdin(&len);
        mark("read"); /* read even when unused: no EPIPE */
        if (act == ACT_NONE)
                return 0;
        const bool may_fail = act == ACT_START || act == ACT_MIGRATE;

        g_autoptr(NkpDomain) d = NULL;
        int r = nkp_domain_parse(xml, len, &d);
        if (r < 0) {
                if (!nkp_domain_mentions_nkp(xml, len) || !may_fail)
                        return 0; /* not nkp's, or a step that must not fail */
                g_autofree char *msg = g_strdup_printf(
                        "VM '%s' cannot %s%s%s: its domain XML carries nkp data that cannot "
                        "be read: %s",
                        domain, act == ACT_MIGRATE ? "be migrated to host '" : "start",
                        act == ACT_MIGRATE ? g_get_host_name() : "",
                        act == ACT_MIGRATE ? "'" : "", nkp_error_message());
                one_line(domain, msg);
                return 1;
        }
        mark("parsed");
        if (act == ACT_START && finish_interrupted(domain, d) < 0)
                return 1;
        if (!d->keysafe) {
                /* issue 7: a plain emulator vTPM (virt-manager & co.) */
                if (act == ACT_START && d->has_vtpm && !d->tpm_secret)
                        return plain_vtpm_start(domain, d);
                return 0;
        }

        const char *root = g_getenv("NKP_ROOT");
        g_autoptr(nkp_context) ctx = NULL;
        r = nkp_context_new(root && root[0] ? root : "/", &ctx);
        if (r < 0) {
                if (!may_fail)
                        return 0;
                one_line(domain, nkp_error_message());
                return 1;
        }

        if (act == ACT_MIGRATE && migrate_check(ctx, d) < 0) {
                one_line(domain, nkp_error_message());
                return 1;
        }

        switch (act) {
        case ACT_START:
        case ACT_MIGRATE:
                r = define_secrets(ctx, d);
                if (r == 0 && act == ACT_START)
                        r = nkp_vtpm_start_check(ctx, d); /* a plain vTPM added to an nkp VM */
                if (r == 0 && act == ACT_START)
                        r = ekca_ticket(ctx, d);
                if (r < 0) {
                        one_line(domain, nkp_error_message());
                        return 1;
                }
                if (timing)
                        fprintf(stderr, "nkp: timing%s\n", timing->str);
                return 0;
        case ACT_RECONNECT:
                r = define_secrets(ctx, d);
                if (r < 0)
                        one_line(domain, nkp_error_message()); /* logged by libvirt; VM lives */
                return 0;
        case ACT_RELEASE:
                undefine_secrets(d);
                nkp_ekca_ticket_remove(ctx, d->uuid);
                return 0;
        case ACT_NONE:
                break;
        }
        return 0;
}

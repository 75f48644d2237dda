/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Encrypted copies of an nkp VM's disks (issue 16): `nkpctl vm backup`,
 * `vm restore-backup`, `vm blockcopy`, and the marks that tell nkpd which
 * copy jobs are nkp's own (daemon.c alarms on the others).
 *
 * Which key: every backup image and block copy is a LUKS qcow2 under the
 * disk's own DEK (the libvirt secret the hook defined for the running VM).
 * Restoring then needs only what restoring the VM needs anyway: the keysafe
 * (kept in the backup's domain.xml) and its provider; no second key to wrap,
 * store, rotate or lose; libvirt encrypts the push target itself, so no
 * clear byte of the guest ever leaves QEMU.  The price: a deep rekey does
 * not reach older backups (they stay under the old DEK, which the keysafe
 * copy in their domain.xml still opens while the provider lives).
 *
 * A backup directory holds one chain (docs/backup.md):
 *   manifest      the text below, rewritten atomically after each level
 *   domain.xml    the VM's persistent definition with its keysafe, at level 0
 *   T.N.qcow2     disk target T at level N (0 full, N>0 incremental on the
 *                 checkpoint of level N-1; libvirt's push-mode backup)
 *   vtpm.permall  the vTPM state (encrypted under the vTPM's DEK), latest
 *
 * manifest, version 1 (one "key=value" a line, order fixed, nothing else):
 *   nkp-backup 1
 *   vm=NAME            (must equal domain.xml's <name>)
 *   uuid=UUID          (… its <uuid>)
 *   key_id=UUID        (… its keysafe's provider key id)
 *   disk=T SECRET-UUID (one line per disk, 1..16; T a target name)
 *   level=N CHECKPOINT (one line per level, N = 0, 1, …; CHECKPOINT nkp-DIGITS
 *                       or "-" when the VM was shut off: no incremental after it)
 *   mac=BASE64         (IV 12 | tag 16: AES-256-GCM over no plaintext, the AAD
 *                       "nkp backup v1" 0 | the lines above | 0 | domain.xml |
 *                       0 | vtpm.permall; the key HKDF-SHA256(KEK of domain.xml's
 *                       keysafe, info "nkp backup mac v1"): a changed
 *                       manifest, definition or vTPM state is refused at
 *                       restore, and only a holder of the provider can make one)
 * File names are derived from T and N, never read from the manifest. */
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libvirt/libvirt.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libxml/xpath.h>

#include "dl-libvirt.h"
#include "nkp-private.h"

#define MANIFEST_NAME "manifest"
#define DOMAIN_NAME "domain.xml"
#define VTPM_NAME "vtpm.permall"
#define MANIFEST_MAX (64 * 1024)
#define MAX_DISKS 16
#define MAX_LEVELS 1000
#define OWN_JOB_DIR "own-jobs"
#define OWN_JOB_OPEN_MAX (6 * 3600) /* a mark whose job never ended (killed) */
#define JOB_POLL_USEC (100 * 1000)
/* What libvirt creates: AES-256-XTS as qemu-img's default, PBKDF2 over
 * SHA-512 for the reason tools.c gives (QEMU 7.2's "Unable to get accurate
 * CPU usage" at LUKS creation; the failures left are retried). */
#define LUKS_CIPHER "<cipher name='aes' size='256' mode='xts' hash='sha512'/><ivgen name='plain64'/>"
#define LUKS_ATTEMPTS 6

/* ---- the manifest ----------------------------------------------------------- */

void nkp_backup_manifest_free(NkpBackupManifest *m)
{
        if (!m)
                return;
        g_free(m->vm);
        g_free(m->uuid);
        g_free(m->key_id);
        g_strfreev(m->targets);
        g_strfreev(m->secrets);
        g_strfreev(m->checkpoints);
        g_free(m);
}

static bool target_valid(const char *t)
{
        size_t n = strlen(t);
        if (n == 0 || n > 16 || !g_ascii_islower(t[0]))
                return false;
        for (const char *p = t; *p; p++)
                if (!g_ascii_islower(*p) && !g_ascii_isdigit(*p))
                        return false;
        return true;
}

static bool checkpoint_valid(const char *c)
{
        if (strcmp(c, "-") == 0)
                return true;
        if (!g_str_has_prefix(c, "nkp-") || strlen(c) > 4 + 24 || !c[4])
                return false;
        for (const char *p = c + 4; *p; p++)
                if (!g_ascii_isdigit(*p) && *p != '-')
                        return false;
        return true;
}

static bool uuid_valid(const char *s)
{
        uint8_t b[16];
        return nkp_uuid_parse(s, b) == 0;
}

static int bad(const char *what, unsigned line)
{
        return nkp_fail(-EBADMSG, "The backup manifest is damaged or not nkp's (line %u: %s); "
                                  "nothing was restored.",
                        line, what);
}

int nkp_backup_manifest_parse(const char *text, size_t len, NkpBackupManifest **ret)
{
        if (len > MANIFEST_MAX)
                return nkp_fail(-EFBIG, "The backup manifest is over %d bytes; nothing was "
                                        "restored.",
                                MANIFEST_MAX);
        if (!g_utf8_validate(text, (gssize) len, NULL))
                return bad("not text", 0);
        for (size_t i = 0; i < len; i++)
                if (g_ascii_iscntrl(text[i]) && text[i] != '\n')
                        return bad("a control character", 0); /* NUL, CR, ESC … */
        g_autofree char *copy = g_strndup(text, len);
        g_auto(GStrv) lines = g_strsplit(copy, "\n", -1);
        g_autoptr(NkpBackupManifest) m = g_new0(NkpBackupManifest, 1);
        g_autoptr(GPtrArray) targets = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) secrets = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) cps = g_ptr_array_new_with_free_func(g_free);
        unsigned n = g_strv_length(lines);
        /* a final newline leaves one empty string; nothing else may be empty */
        if (n == 0 || lines[n - 1][0] != '\0')
                return bad("no final newline", n);
        n--;
        if (n < 5 || strcmp(lines[0], "nkp-backup 1") != 0)
                return bad("not 'nkp-backup 1'", 1);
        const char *keys[] = { "vm=", "uuid=", "key_id=" };
        char **fields[] = { &m->vm, &m->uuid, &m->key_id };
        for (unsigned i = 0; i < 3; i++) {
                if (!g_str_has_prefix(lines[1 + i], keys[i]))
                        return bad(keys[i], 2 + i);
                *fields[i] = g_strdup(lines[1 + i] + strlen(keys[i]));
        }
        if (!m->vm[0] || strlen(m->vm) > 256)
                return bad("vm", 2);
        if (!uuid_valid(m->uuid))
                return bad("uuid", 3);
        if (!uuid_valid(m->key_id))
                return bad("key_id", 4);
        unsigned i = 4;
        for (; i < n && g_str_has_prefix(lines[i], "disk="); i++) {
                g_auto(GStrv) f = g_strsplit(lines[i] + 5, " ", -1);
                if (g_strv_length(f) != 2 || !target_valid(f[0]) || !uuid_valid(f[1]))
                        return bad("disk", i + 1);
                for (guint k = 0; k < targets->len; k++)
                        if (strcmp(targets->pdata[k], f[0]) == 0)
                                return bad("a disk twice", i + 1);
                if (targets->len == MAX_DISKS)
                        return bad("too many disks", i + 1);
                g_ptr_array_add(targets, g_strdup(f[0]));
                g_ptr_array_add(secrets, g_strdup(f[1]));
        }
        if (targets->len == 0)
                return bad("no disk", i + 1);
        if (n > 0 && g_str_has_prefix(lines[n - 1], "mac=")) {
                gsize raw_len = 0;
                g_autofree guchar *raw = g_base64_decode(lines[n - 1] + 4, &raw_len);
                g_autofree char *again = g_base64_encode(raw, raw_len);
                if (raw_len != sizeof m->mac || strcmp(again, lines[n - 1] + 4) != 0)
                        return bad("mac", n);
                memcpy(m->mac, raw, sizeof m->mac);
                m->has_mac = true;
                n--;
        }
        for (; i < n; i++) {
                if (!g_str_has_prefix(lines[i], "level="))
                        return bad("not a level", i + 1);
                g_auto(GStrv) f = g_strsplit(lines[i] + 6, " ", -1);
                g_autofree char *want = g_strdup_printf("%u", cps->len);
                if (g_strv_length(f) != 2 || strcmp(f[0], want) != 0 || !checkpoint_valid(f[1]))
                        return bad("level", i + 1);
                if (cps->len > 0 && strcmp(cps->pdata[cps->len - 1], "-") == 0)
                        return bad("an incremental level after one without a checkpoint", i + 1);
                if (cps->len == MAX_LEVELS)
                        return bad("too many levels", i + 1);
                g_ptr_array_add(cps, g_strdup(f[1]));
        }
        if (cps->len == 0)
                return bad("no level", n);
        m->n_disks = targets->len;
        m->n_levels = cps->len;
        g_ptr_array_add(targets, NULL);
        g_ptr_array_add(secrets, NULL);
        g_ptr_array_add(cps, NULL);
        m->targets = (char **) g_ptr_array_free(g_steal_pointer(&targets), FALSE);
        m->secrets = (char **) g_ptr_array_free(g_steal_pointer(&secrets), FALSE);
        m->checkpoints = (char **) g_ptr_array_free(g_steal_pointer(&cps), FALSE);
        *ret = g_steal_pointer(&m);
        return 0;
}

char *nkp_backup_manifest_format(const NkpBackupManifest *m)
{
        GString *s = g_string_new("nkp-backup 1\n");
        g_string_append_printf(s, "vm=%s\nuuid=%s\nkey_id=%s\n", m->vm, m->uuid, m->key_id);
        for (size_t i = 0; i < m->n_disks; i++)
                g_string_append_printf(s, "disk=%s %s\n", m->targets[i], m->secrets[i]);
        for (size_t i = 0; i < m->n_levels; i++)
                g_string_append_printf(s, "level=%zu %s\n", i, m->checkpoints[i]);
        if (m->has_mac) {
                g_autofree char *b64 = g_base64_encode(m->mac, sizeof m->mac);
                g_string_append_printf(s, "mac=%s\n", b64);
        }
        return g_string_free(s, FALSE);
}

/* ---- the manifest's MAC ---------------------------------------------------------- */

static int mac_key(nkp_context *ctx, const NkpDomain *d, uint8_t key[32])
{
        g_autoptr(nkp_secret) kek = NULL;
        int r = nkp_vm_kek(ctx, d, &kek);
        if (r < 0)
                return r;
        static const char info[] = "nkp backup mac v1";
        return nkp_hkdf_sha256(nkp_secret_data(kek), nkp_secret_len(kek), NULL, 0,
                               (const uint8_t *) info, sizeof info - 1, key, 32);
}

/* The AAD: what the MAC covers (the manifest without its mac line, the
 * definition, the vTPM state: each 0-separated after a version string). */
static GByteArray *mac_input(const NkpBackupManifest *m, const char *dir)
{
        NkpBackupManifest body = *m;
        body.has_mac = false;
        g_autofree char *text = nkp_backup_manifest_format(&body);
        GByteArray *a = g_byte_array_new();
        static const char head[] = "nkp backup v1";
        g_byte_array_append(a, (const guint8 *) head, sizeof head); /* with its 0 */
        g_byte_array_append(a, (const guint8 *) text, (guint) strlen(text));
        const char *names[] = { DOMAIN_NAME, VTPM_NAME };
        for (size_t i = 0; i < G_N_ELEMENTS(names); i++) {
                g_autofree char *path = g_build_filename(dir, names[i], NULL);
                g_autofree char *data = NULL;
                size_t len = 0;
                g_byte_array_append(a, (const guint8 *) "", 1);
                if (nkp_read_file(path, 64 * 1024 * 1024, false, &data, &len) == 0)
                        g_byte_array_append(a, (const guint8 *) data, (guint) len);
        }
        return a;
}

static int mac_seal(nkp_context *ctx, const NkpDomain *d, NkpBackupManifest *m, const char *dir)
{
        uint8_t key[32];
        int r = mac_key(ctx, d, key);
        if (r < 0)
                return r;
        m->has_mac = false;
        g_autoptr(GByteArray) aad = mac_input(m, dir);
        r = nkp_random_bytes(m->mac, NKP_GCM_IV_SIZE);
        if (r == 0)
                r = nkp_aes256gcm_seal(key, m->mac, NKP_GCM_IV_SIZE, aad->data, aad->len, NULL, 0,
                                       NULL, m->mac + NKP_GCM_IV_SIZE);
        nkp_wipe(key, sizeof key);
        if (r < 0)
                return r;
        m->has_mac = true;
        return 0;
}

/* 0 when the manifest, domain.xml and vTPM state in `dir` are as nkp wrote
 * them; -EBADMSG (with the fix) when not, or when there is no MAC. */
static int mac_check(nkp_context *ctx, const NkpDomain *d, const NkpBackupManifest *m,
                     const char *dir)
{
        if (!m->has_mac)
                return nkp_fail(-EBADMSG, "The backup in '%s' has no MAC (not written by nkp, or "
                                          "cut short); nothing was done.",
                                dir);
        uint8_t key[32];
        int r = mac_key(ctx, d, key);
        if (r < 0)
                return r;
        g_autoptr(GByteArray) aad = mac_input(m, dir);
        r = nkp_aes256gcm_open(key, sizeof key, m->mac, NKP_GCM_IV_SIZE, aad->data, aad->len,
                               NULL, 0, m->mac + NKP_GCM_IV_SIZE, NKP_GCM_TAG_SIZE, NULL);
        nkp_wipe(key, sizeof key);
        nkp_error_clear();
        if (r < 0)
                return nkp_fail(-EBADMSG, "The backup in '%s' was altered (its manifest, "
                                          "domain.xml or vTPM state does not match its MAC); "
                                          "nothing was done.",
                                dir);
        return 0;
}

static int manifest_read(const char *dir, NkpBackupManifest **ret)
{
        g_autofree char *path = g_build_filename(dir, MANIFEST_NAME, NULL);
        g_autofree char *text = NULL;
        size_t len = 0;
        int r = nkp_read_file(path, MANIFEST_MAX + 1, false, &text, &len);
        if (r == -ENOENT)
                return nkp_fail(-ENOENT, "'%s' holds no nkp backup (no %s).", dir, MANIFEST_NAME);
        if (r < 0)
                return nkp_fail(r, "Cannot read '%s': %s.", path, g_strerror(-r));
        return nkp_backup_manifest_parse(text, len, ret);
}

static int manifest_write(const char *dir, const NkpBackupManifest *m)
{
        g_autofree char *path = g_build_filename(dir, MANIFEST_NAME, NULL);
        g_autofree char *text = nkp_backup_manifest_format(m);
        int r = nkp_write_file_atomic(path, text, strlen(text), 0600, false);
        if (r < 0)
                return nkp_fail(r, "Cannot write '%s': %s.", path, g_strerror(-r));
        return 0;
}

/* ---- nkp's own jobs ----------------------------------------------------------- */
/* ROOT/run/nkp/own-jobs/<vm uuid>.<what>: "<start> <end>" (real-time
 * seconds; end 0 while the job runs).  nkpd takes an event of that VM and
 * kind as nkp's own when it comes between start and end + 30 s (the event
 * reaches nkpd after the job ended), or within OWN_JOB_OPEN_MAX of a start
 * whose end was never written (a killed nkpctl).  One job sends one such
 * event (a backup's JOB_COMPLETED, a copy's READY): the claim removes the
 * mark, so a job made behind nkp's back right after nkp's own still alarms. */

static char *own_job_path(nkp_context *ctx, const char *vm_uuid, const char *what)
{
        g_autofree char *name = g_strdup_printf("%s.%s", vm_uuid, what);
        return g_build_filename(ctx->run_dir, OWN_JOB_DIR, name, NULL);
}

int nkp_own_job_mark(nkp_context *ctx, const char *vm_uuid, const char *what, bool ended)
{
        g_autofree char *dir = g_build_filename(ctx->run_dir, OWN_JOB_DIR, NULL);
        g_autofree char *path = own_job_path(ctx, vm_uuid, what);
        int r = nkp_mkdir_private(dir);
        if (r < 0)
                return nkp_fail(r, "Cannot make '%s': %s.", dir, g_strerror(-r));
        int64_t now = g_get_real_time() / G_USEC_PER_SEC, start = now;
        if (ended) {
                g_autofree char *old = NULL;
                size_t len = 0;
                if (nkp_read_file(path, 128, false, &old, &len) < 0)
                        return 0; /* nkpd claimed it already (or never will): keep it gone */
                start = g_ascii_strtoll(old, NULL, 10);
        }
        g_autofree char *text = g_strdup_printf("%" G_GINT64_FORMAT " %" G_GINT64_FORMAT "\n",
                                                start, ended ? now : (int64_t) 0);
        r = nkp_write_file_atomic(path, text, strlen(text), 0600, false);
        if (r < 0)
                return nkp_fail(r, "Cannot write '%s': %s.", path, g_strerror(-r));
        return 0;
}

bool nkp_own_job_claims(nkp_context *ctx, const char *vm_uuid, const char *what, int64_t at)
{
        g_autofree char *path = own_job_path(ctx, vm_uuid, what);
        g_autofree char *text = NULL;
        size_t len = 0;
        if (nkp_read_file(path, 128, false, &text, &len) < 0)
                return false;
        char *end = NULL;
        int64_t start = g_ascii_strtoll(text, &end, 10);
        int64_t stop = end ? g_ascii_strtoll(end, NULL, 10) : 0;
        if (at < start - 2)
                return false;
        bool claimed = stop == 0 ? at <= start + OWN_JOB_OPEN_MAX : at <= stop + 30;
        if (claimed)
                (void) nkp_unlink_nofollow(path);
        return claimed;
}

/* ---- libvirt ------------------------------------------------------------------ */

static const char *virt_error(void)
{
        virErrorPtr e = virGetLastError();
        return e && e->message ? e->message : "unknown libvirt error";
}

static virDomainPtr lookup(NkpVirt *v, const char *name)
{
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(v), name);
        if (!dom)
                nkp_fail(-ENOENT, "No libvirt domain '%s': %s.", name, virt_error());
        return dom;
}

/* Waits until the domain has no job; then 0 when its last completed job
 * succeeded, else -EIO naming what libvirt said. */
static int wait_job(virDomainPtr dom, const char *vm, const char *what)
{
        for (;;) {
                virDomainJobInfo info;
                if (virDomainGetJobInfo(dom, &info) < 0)
                        return nkp_fail(-EIO, "Cannot follow the %s of VM '%s': %s.", what, vm,
                                        virt_error());
                if (info.type == VIR_DOMAIN_JOB_NONE)
                        break;
                g_usleep(JOB_POLL_USEC);
        }
        int type = 0, nparams = 0;
        virTypedParameterPtr params = NULL;
        if (virDomainGetJobStats(dom, &type, &params, &nparams, VIR_DOMAIN_JOB_STATS_COMPLETED) < 0)
                return nkp_fail(-EIO, "Cannot read how the %s of VM '%s' ended: %s.", what, vm,
                                virt_error());
        const char *err = NULL;
        virTypedParamsGetString(params, nparams, VIR_DOMAIN_JOB_ERRMSG, &err);
        int r = 0;
        if (type != VIR_DOMAIN_JOB_COMPLETED)
                r = nkp_fail(-EIO, "The %s of VM '%s' failed: %s.", what, vm,
                             err ? err : "libvirt gives no reason");
        virTypedParamsFree(params, nparams);
        return r;
}

/* ---- backup --------------------------------------------------------------------- */

/* The LUKS disks of `d` that its keysafe covers (the backup's disks). */
static GPtrArray *keyed_disks(const NkpDomain *d)
{
        GPtrArray *out = g_ptr_array_new();
        for (guint i = 0; i < d->disks->len; i++) {
                const NkpDomainDisk *disk = d->disks->pdata[i];
                if (disk->encryption_secret && disk->source_file &&
                    g_strcmp0(disk->encryption_format, "luks") == 0)
                        g_ptr_array_add(out, (gpointer) disk);
        }
        return out;
}

static char *image_path(const char *dir, const char *target, size_t level)
{
        g_autofree char *name = g_strdup_printf("%s.%zu.qcow2", target, level);
        return g_build_filename(dir, name, NULL);
}

/* A qcow2 whose header says LUKS (crypt_method 2 at offset 32): the check
 * that what libvirt or qemu-img wrote is encrypted before nkp says so. */
static int check_luks_qcow2(const char *path)
{
        uint8_t h[36];
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        ssize_t n = fd >= 0 ? pread(fd, h, sizeof h, 0) : -1;
        if (fd >= 0)
                close(fd);
        if (n != (ssize_t) sizeof h || memcmp(h, "QFI\xfb", 4) != 0 ||
            ((uint32_t) h[32] << 24 | (uint32_t) h[33] << 16 | (uint32_t) h[34] << 8 | h[35]) != 2)
                return nkp_fail(-EBADMSG, "'%s' is not a LUKS-encrypted qcow2; remove it.", path);
        return 0;
}

static char *backup_xml(const char *dir, GPtrArray *disks, size_t level, const char *incremental)
{
        GString *x = g_string_new("<domainbackup mode='push'>");
        if (incremental)
                g_string_append_printf(x, "<incremental>%s</incremental>", incremental);
        g_string_append(x, "<disks>");
        for (guint i = 0; i < disks->len; i++) {
                const NkpDomainDisk *disk = disks->pdata[i];
                g_autofree char *path = image_path(dir, disk->target, level);
                g_autofree char *esc = g_markup_escape_text(path, -1);
                g_string_append_printf(x,
                                       "<disk name='%s' type='file'><driver type='qcow2'/>"
                                       "<target file='%s'><encryption format='luks'>"
                                       "<secret type='passphrase' uuid='%s'/>" LUKS_CIPHER
                                       "</encryption></target></disk>",
                                       disk->target, esc, disk->encryption_secret);
        }
        g_string_append(x, "</disks></domainbackup>");
        return g_string_free(x, FALSE);
}

/* Copies the vTPM state (already encrypted under the vTPM's DEK) into the
 * backup; none is fine (a VM without a vTPM, or never started). */
static int copy_vtpm_state(nkp_context *ctx, const NkpDomain *d, const char *dir)
{
        if (!d->has_vtpm)
                return 0;
        g_autofree char *src = g_build_filename(ctx->vtpm_state_dir, d->uuid, "tpm2",
                                                "tpm2-00.permall", NULL);
        g_autofree char *data = NULL;
        size_t len = 0;
        int r = nkp_read_file(src, 64 * 1024 * 1024, false, &data, &len);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return nkp_fail(r, "Cannot read the vTPM state '%s': %s.", src, g_strerror(-r));
        g_autofree char *dst = g_build_filename(dir, VTPM_NAME, NULL);
        r = nkp_write_file_atomic(dst, data, len, 0600, false);
        if (r < 0)
                return nkp_fail(r, "Cannot write '%s': %s.", dst, g_strerror(-r));
        return 0;
}

/* qemu-img convert of one LUKS chain (images[0] the base … images[n-1] the
 * top, each under `value`) into a new LUKS qcow2 `dst` under `value`. */
static int convert_chain(char *const *images, size_t n, const nkp_secret *value, const char *dst)
{
        GString *opts = g_string_new("driver=qcow2");
        for (size_t k = n; k-- > 0;) {
                GString *prefix = g_string_new("");
                for (size_t j = k + 1; j < n; j++)
                        g_string_append(prefix, "backing.");
                if (k != n - 1)
                        g_string_append_printf(opts, ",%sdriver=qcow2", prefix->str);
                g_string_append_printf(opts, ",%sfile.filename=%s,%sencrypt.key-secret=s0",
                                       prefix->str, images[k], prefix->str);
                g_string_free(prefix, TRUE);
        }
        g_autofree char *src_opts = g_string_free(opts, FALSE);
        const char *argv[] = { "qemu-img", "convert", "-q",
                               /* one object: the pipe is read once */
                               "--object", "secret,id=s0,file=/dev/fd/3,format=raw",
                               "--image-opts", src_opts, "-O", "qcow2",
                               "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                                     "encrypt.iter-time=10,encrypt.hash-alg=sha512",
                               dst, NULL };
        nkp_secret *secrets[] = { (nkp_secret *) value };
        const NkpToolRun run = { .argv = argv, .secrets = secrets, .n_secrets = 1, .blob_fd = -1 };
        int r = 0;
        g_autofree char *err = NULL;
        for (int attempt = 0; attempt < 6; attempt++) {
                if (attempt > 0)
                        g_usleep((gulong) (100000 << attempt)); /* QEMU 7.2's PBKDF flake (tools.c) */
                g_clear_pointer(&err, g_free);
                (void) nkp_unlink_nofollow(dst);
                r = nkp_tool_run(&run, &err);
                if (r == 0 || !err || !strstr(err, "accurate CPU usage"))
                        break;
        }
        if (r < 0)
                return r;
        if (r > 0) {
                (void) nkp_unlink_nofollow(dst);
                return nkp_fail(-EIO, "qemu-img could not write '%s': %s.", dst,
                                err && err[0] ? err : "no detail");
        }
        return check_luks_qcow2(dst);
}

static const NkpVmSecret *secret_of(GPtrArray *secrets, const char *secret_uuid)
{
        for (guint i = 0; secrets && i < secrets->len; i++) {
                const NkpVmSecret *s = secrets->pdata[i];
                if (g_strcmp0(s->secret_uuid, secret_uuid) == 0)
                        return s;
        }
        return NULL;
}

/* Shut-off VM: a full copy of each disk file, still under its DEK. */
static int backup_offline(nkp_context *ctx, const NkpDomain *d, GPtrArray *disks, const char *dir)
{
        g_autoptr(GPtrArray) secrets = NULL;
        int r = nkp_vm_unlock(ctx, d, true, &secrets);
        if (r < 0)
                return r;
        for (guint i = 0; i < disks->len; i++) {
                const NkpDomainDisk *disk = disks->pdata[i];
                const NkpVmSecret *s = secret_of(secrets, disk->encryption_secret);
                if (!s || !s->value)
                        return nkp_fail(-EBADMSG, "VM '%s': its keysafe holds no key for disk "
                                                  "'%s'.",
                                        d->name, disk->target);
                char *images[] = { disk->source_file };
                g_autofree char *dst = image_path(dir, disk->target, 0);
                r = convert_chain(images, 1, s->value, dst);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int backup_online(nkp_context *ctx, NkpVirt *v, const NkpDomain *d, GPtrArray *disks,
                         const char *dir, size_t level, const char *incremental,
                         char **ret_checkpoint)
{
        virDomainPtr dom = lookup(v, d->name);
        if (!dom)
                return -ENOENT;
        int r = 0;
        if (incremental) {
                virDomainCheckpointPtr cp = virDomainCheckpointLookupByName(dom, incremental, 0);
                if (!cp) {
                        virDomainFree(dom);
                        return nkp_fail(-ESTALE, "VM '%s' no longer has the checkpoint '%s' of "
                                                 "the last backup in '%s' (libvirt: %s); take a "
                                                 "full backup into a new directory.",
                                        d->name, incremental, dir, virt_error());
                }
                virDomainCheckpointFree(cp);
        }
        g_autofree char *checkpoint = g_strdup_printf(
                "nkp-%" G_GINT64_FORMAT "-%zu", g_get_real_time() / G_USEC_PER_SEC, level);
        g_autofree char *cp_xml = g_strdup_printf(
                "<domaincheckpoint><name>%s</name><description>nkpctl vm backup</description>"
                "</domaincheckpoint>",
                checkpoint);
        g_autofree char *xml = backup_xml(dir, disks, level, incremental);
        r = nkp_own_job_mark(ctx, d->uuid, "backup", false);
        for (int attempt = 0; r == 0; attempt++) {
                if (virDomainBackupBegin(dom, xml, cp_xml, 0) == 0)
                        break;
                if (attempt + 1 < LUKS_ATTEMPTS && strstr(virt_error(), "accurate CPU usage")) {
                        g_usleep((gulong) (200000 << attempt)); /* libvirt removed its images */
                        continue;
                }
                r = nkp_fail(-EIO, "libvirt refused the backup of VM '%s': %s.", d->name,
                             virt_error());
        }
        if (r == 0)
                r = wait_job(dom, d->name, "backup");
        (void) nkp_own_job_mark(ctx, d->uuid, "backup", true);
        virDomainFree(dom);
        if (r < 0)
                return r;
        *ret_checkpoint = g_steal_pointer(&checkpoint);
        return 0;
}

/* The backup's domain.xml, parsed. */
static int backup_domain(const char *dir, NkpDomain **ret)
{
        g_autofree char *dpath = g_build_filename(dir, DOMAIN_NAME, NULL);
        g_autofree char *xml = NULL;
        size_t len = 0;
        int r = nkp_read_file(dpath, NKP_DOMAIN_XML_MAX, false, &xml, &len);
        if (r < 0)
                return nkp_fail(r, "Cannot read '%s': %s.", dpath, g_strerror(-r));
        r = nkp_domain_parse(xml, len, ret);
        if (r < 0)
                return nkp_fail_prefix(r, "The backup's %s is damaged", DOMAIN_NAME);
        if (!(*ret)->keysafe) {
                g_clear_pointer(ret, nkp_domain_free);
                return nkp_fail(-EBADMSG, "The backup's %s holds no nkp keysafe.", DOMAIN_NAME);
        }
        return 0;
}

int nkp_vm_backup(nkp_context *ctx, nkp_virt *v, const char *domain, const char *dir,
                  bool incremental, unsigned *ret_level)
{
        if (!g_path_is_absolute(dir))
                return nkp_fail(-EINVAL, "The backup directory '%s' must be an absolute path.",
                                dir);
        int active = nkp_virt_domain_is_active(v, domain);
        if (active < 0)
                return active;
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        int r = nkp_virt_domain_xml(v, domain, active == 0, &xml);
        if (r < 0)
                return r;
        r = nkp_domain_parse(xml, strlen(xml), &d);
        if (r < 0)
                return r;
        if (!d->keysafe)
                return nkp_fail(-EINVAL, "VM '%s' is not protected by nkp: nothing of it is "
                                         "encrypted, so nkp has no key for its backup. Encrypt "
                                         "it first: nkpctl vm encrypt %s",
                                d->name, d->name);
        g_autoptr(GPtrArray) disks = keyed_disks(d);
        if (disks->len == 0 || disks->len > MAX_DISKS)
                return nkp_fail(-EINVAL, "VM '%s' has %u encrypted disks; nkp backs up 1 to %d.",
                                d->name, disks->len, MAX_DISKS);
        /* the provider must be here: the same check a start makes */
        r = nkp_vm_unlock(ctx, d, false, NULL);
        if (r < 0)
                return r;

        g_autoptr(NkpBackupManifest) m = NULL;
        g_autoptr(NkpDomain) d0 = NULL; /* the definition in the backup: its keysafe keys the MAC */
        if (incremental) {
                r = manifest_read(dir, &m);
                if (r < 0)
                        return r;
                if (strcmp(m->uuid, d->uuid) != 0)
                        return nkp_fail(-EINVAL, "'%s' holds a backup of another VM ('%s', %s); "
                                                 "back up '%s' into its own directory.",
                                        dir, m->vm, m->uuid, d->name);
                r = backup_domain(dir, &d0);
                if (r == 0)
                        r = mac_check(ctx, d0, m, dir);
                if (r < 0)
                        return r;
                if (active == 0)
                        return nkp_fail(-EOPNOTSUPP, "VM '%s' is shut off: libvirt 9.0 takes "
                                                     "incremental backups of running VMs only. "
                                                     "Start it, or take a full backup into a "
                                                     "new directory.",
                                        d->name);
                const char *last = m->checkpoints[m->n_levels - 1];
                if (strcmp(last, "-") == 0)
                        return nkp_fail(-EOPNOTSUPP, "The last backup in '%s' was taken while VM "
                                                     "'%s' was shut off and has no checkpoint; "
                                                     "take a full backup into a new directory.",
                                        dir, d->name);
                if (m->n_levels >= MAX_LEVELS)
                        return nkp_fail(-E2BIG, "'%s' holds %d levels already; take a full "
                                                "backup into a new directory.",
                                        dir, MAX_LEVELS);
                for (guint i = 0; i < disks->len; i++) {
                        const NkpDomainDisk *disk = disks->pdata[i];
                        if (m->n_disks != disks->len || strcmp(m->targets[i], disk->target) != 0 ||
                            strcmp(m->secrets[i], disk->encryption_secret) != 0)
                                return nkp_fail(-ESTALE, "VM '%s' has other disks or keys than "
                                                         "its backup in '%s' (disks added, or "
                                                         "a deep rekey); take a full backup "
                                                         "into a new directory.",
                                                d->name, dir);
                }
        } else {
                r = nkp_mkdir_private(dir);
                if (r < 0)
                        return nkp_fail(r, "Cannot use '%s' as the backup directory: %s (it "
                                           "must be root's, mode 0700).",
                                        dir, g_strerror(-r));
                g_autofree char *mpath = g_build_filename(dir, MANIFEST_NAME, NULL);
                if (g_file_test(mpath, G_FILE_TEST_EXISTS))
                        return nkp_fail(-EEXIST, "'%s' holds a backup already: add to it with "
                                                 "--incremental, or use a new directory.",
                                        dir);
                m = g_new0(NkpBackupManifest, 1);
                m->vm = g_strdup(d->name);
                m->uuid = g_strdup(d->uuid);
                m->key_id = g_strdup(nkp_keysafe_provider_key_id(d->keysafe));
                m->n_disks = disks->len;
                m->targets = g_new0(char *, disks->len + 1);
                m->secrets = g_new0(char *, disks->len + 1);
                for (guint i = 0; i < disks->len; i++) {
                        const NkpDomainDisk *disk = disks->pdata[i];
                        m->targets[i] = g_strdup(disk->target);
                        m->secrets[i] = g_strdup(disk->encryption_secret);
                }
                m->checkpoints = g_new0(char *, 1);
        }
        size_t level = m->n_levels;
        for (guint i = 0; i < disks->len; i++) {
                const NkpDomainDisk *disk = disks->pdata[i];
                g_autofree char *path = image_path(dir, disk->target, level);
                if (g_file_test(path, G_FILE_TEST_EXISTS))
                        return nkp_fail(-EEXIST, "'%s' exists already (an interrupted backup?); "
                                                 "remove it and run the backup again.",
                                        path);
        }
        if (level == 0) {
                g_autofree char *inactive = NULL;
                r = nkp_virt_domain_xml(v, domain, true, &inactive);
                if (r < 0)
                        return r;
                g_autofree char *dpath = g_build_filename(dir, DOMAIN_NAME, NULL);
                r = nkp_write_file_atomic(dpath, inactive, strlen(inactive), 0600, false);
                if (r < 0)
                        return nkp_fail(r, "Cannot write '%s': %s.", dpath, g_strerror(-r));
        }
        g_autofree char *checkpoint = NULL;
        if (active)
                r = backup_online(ctx, v, d, disks, dir, level,
                                  level ? m->checkpoints[level - 1] : NULL, &checkpoint);
        else
                r = backup_offline(ctx, d, disks, dir);
        if (r < 0)
                return r;
        for (guint i = 0; i < disks->len; i++) {
                const NkpDomainDisk *disk = disks->pdata[i];
                g_autofree char *path = image_path(dir, disk->target, level);
                r = check_luks_qcow2(path);
                if (r < 0)
                        return r;
        }
        r = copy_vtpm_state(ctx, d, dir);
        if (r < 0)
                return r;
        m->checkpoints = g_renew(char *, m->checkpoints, level + 2);
        m->checkpoints[level] = g_strdup(checkpoint ? checkpoint : "-");
        m->checkpoints[level + 1] = NULL;
        m->n_levels = level + 1;
        if (!d0 && (r = backup_domain(dir, &d0)) < 0)
                return r;
        r = mac_seal(ctx, d0, m, dir);
        if (r < 0)
                return r;
        r = manifest_write(dir, m);
        if (r < 0)
                return r;
        if (ret_level)
                *ret_level = (unsigned) level;
        return 0;
}

/* ---- restore ---------------------------------------------------------------------- */

/* The domain XML for the restored VM: `name`, each backed-up disk's source
 * at its new path (dst[i] for m->targets[i]). */
static int restored_xml(const char *xml, const char *name, const NkpBackupManifest *m,
                        char *const *dst, char **ret)
{
        xmlDocPtr doc = xmlReadMemory(xml, (int) strlen(xml), NULL, NULL,
                                      XML_PARSE_NONET | XML_PARSE_NOBLANKS);
        if (!doc)
                return nkp_fail(-EBADMSG, "The backup's %s cannot be read.", DOMAIN_NAME);
        int r = 0;
        xmlXPathContextPtr xp = xmlXPathNewContext(doc);
        xmlXPathObjectPtr o = xmlXPathEvalExpression(BAD_CAST "/domain/name", xp);
        if (o && o->nodesetval && o->nodesetval->nodeNr == 1)
                xmlNodeSetContent(o->nodesetval->nodeTab[0], BAD_CAST name);
        else
                r = -EBADMSG;
        xmlXPathFreeObject(o);
        for (size_t i = 0; r == 0 && i < m->n_disks; i++) {
                g_autofree char *q = g_strdup_printf(
                        "/domain/devices/disk[target/@dev='%s']/source", m->targets[i]);
                o = xmlXPathEvalExpression(BAD_CAST q, xp);
                if (o && o->nodesetval && o->nodesetval->nodeNr == 1)
                        xmlSetProp(o->nodesetval->nodeTab[0], BAD_CAST "file", BAD_CAST dst[i]);
                else
                        r = -EBADMSG;
                xmlXPathFreeObject(o);
        }
        xmlXPathFreeContext(xp);
        if (r == 0) {
                xmlChar *out = NULL;
                int len = 0;
                xmlDocDumpMemory(doc, &out, &len);
                *ret = g_strndup((const char *) out, (gsize) len);
                xmlFree(out);
        }
        xmlFreeDoc(doc);
        if (r < 0)
                return nkp_fail(r, "The backup's %s lacks a disk the manifest names.",
                                DOMAIN_NAME);
        return 0;
}

static int restore_vtpm(nkp_context *ctx, const NkpDomain *d, const char *dir)
{
        g_autofree char *src = g_build_filename(dir, VTPM_NAME, NULL);
        g_autofree char *data = NULL;
        size_t len = 0;
        int r = nkp_read_file(src, 64 * 1024 * 1024, false, &data, &len);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return nkp_fail(r, "Cannot read '%s': %s.", src, g_strerror(-r));
        g_autofree char *vmdir = g_build_filename(ctx->vtpm_state_dir, d->uuid, NULL);
        g_autofree char *tpmdir = g_build_filename(vmdir, "tpm2", NULL);
        g_autofree char *dst = g_build_filename(tpmdir, "tpm2-00.permall", NULL);
        struct passwd *pw = getpwnam(ctx->vtpm_swtpm_user);
        uid_t uid = pw ? pw->pw_uid : 0;
        gid_t gid = pw ? pw->pw_gid : 0;
        if (g_mkdir_with_parents(tpmdir, 0700) < 0 || chown(vmdir, uid, gid) < 0 ||
            chown(tpmdir, uid, gid) < 0) {
                int e = errno;
                return nkp_fail(-e, "Cannot make '%s': %s.", tpmdir, g_strerror(e));
        }
        r = nkp_write_file_atomic(dst, data, len, 0600, true);
        if (r < 0)
                return nkp_fail(r, "Cannot write the vTPM state '%s': %s.", dst, g_strerror(-r));
        if (chown(dst, uid, gid) < 0) {
                int e = errno;
                return nkp_fail(-e, "Cannot give '%s' to '%s': %s.", dst, ctx->vtpm_swtpm_user,
                                g_strerror(e));
        }
        return 0;
}

int nkp_vm_restore_backup(nkp_context *ctx, nkp_virt *v, const char *dir, const char *new_name,
                          const char *disk_dir, char **ret_name)
{
        g_autoptr(NkpBackupManifest) m = NULL;
        int r = manifest_read(dir, &m);
        if (r < 0)
                return r;
        g_autofree char *dpath = g_build_filename(dir, DOMAIN_NAME, NULL);
        g_autofree char *xml = NULL;
        size_t len = 0;
        r = nkp_read_file(dpath, NKP_DOMAIN_XML_MAX, false, &xml, &len);
        if (r < 0)
                return nkp_fail(r, "Cannot read '%s': %s.", dpath, g_strerror(-r));
        g_autoptr(NkpDomain) d = NULL;
        r = nkp_domain_parse(xml, len, &d);
        if (r < 0)
                return nkp_fail_prefix(r, "The backup's %s is damaged", DOMAIN_NAME);
        if (strcmp(d->uuid, m->uuid) != 0 || strcmp(d->name, m->vm) != 0 || !d->keysafe ||
            g_strcmp0(nkp_keysafe_provider_key_id(d->keysafe), m->key_id) != 0)
                return nkp_fail(-EBADMSG, "The backup in '%s' does not match its %s (another "
                                          "VM, or no keysafe); nothing was restored.",
                                dir, DOMAIN_NAME);
        for (size_t i = 0; i < m->n_disks; i++) {
                const NkpDomainDisk *disk = nkp_domain_find_disk(d, m->targets[i]);
                if (!disk || !disk->source_file ||
                    g_strcmp0(disk->encryption_secret, m->secrets[i]) != 0)
                        return nkp_fail(-EBADMSG, "The backup's disk '%s' is not an encrypted "
                                                  "disk of its %s; nothing was restored.",
                                        m->targets[i], DOMAIN_NAME);
                for (size_t level = 0; level < m->n_levels; level++) {
                        g_autofree char *p = image_path(dir, m->targets[i], level);
                        r = check_luks_qcow2(p);
                        if (r < 0)
                                return nkp_fail_prefix(r, "The backup in '%s' is incomplete",
                                                       dir);
                }
        }
        r = mac_check(ctx, d, m, dir);
        if (r < 0)
                return r;
        const char *name = new_name ? new_name : d->name;
        virConnectPtr conn = nkp_virt_connection(v);
        virDomainPtr other = virDomainLookupByUUIDString(conn, d->uuid);
        if (other) {
                virDomainFree(other);
                return nkp_fail(-EEXIST, "A VM with UUID %s (the backed-up VM's) is defined on "
                                         "this host: restore on another host, or undefine it "
                                         "first; nothing was restored.",
                                d->uuid);
        }
        other = virDomainLookupByName(conn, name);
        if (other) {
                virDomainFree(other);
                return nkp_fail(-EEXIST, "A VM named '%s' exists on this host: restore with "
                                         "--name NEW; nothing was restored.",
                                name);
        }
        g_autoptr(GPtrArray) secrets = NULL;
        r = nkp_vm_unlock(ctx, d, true, &secrets);
        if (r < 0)
                return r;
        g_auto(GStrv) dst = g_new0(char *, m->n_disks + 1);
        for (size_t i = 0; i < m->n_disks; i++) {
                const NkpDomainDisk *disk = nkp_domain_find_disk(d, m->targets[i]);
                g_autofree char *ddir = disk_dir ? g_strdup(disk_dir)
                                                 : g_path_get_dirname(disk->source_file);
                g_autofree char *base = g_strdup_printf("%s-%s.qcow2", name, m->targets[i]);
                dst[i] = g_build_filename(ddir, base, NULL);
                if (g_file_test(dst[i], G_FILE_TEST_EXISTS))
                        return nkp_fail(-EEXIST, "'%s' exists: restore with --name NEW or "
                                                 "--disk-dir DIR; nothing was restored.",
                                        dst[i]);
        }
        /* every refusal is behind: from here files are written */
        for (size_t i = 0; i < m->n_disks; i++) {
                const NkpVmSecret *s = secret_of(secrets, m->secrets[i]);
                if (!s || !s->value)
                        return nkp_fail(-EBADMSG, "The backup's keysafe holds no key for disk "
                                                  "'%s'.",
                                        m->targets[i]);
                g_auto(GStrv) images = g_new0(char *, m->n_levels + 1);
                for (size_t level = 0; level < m->n_levels; level++)
                        images[level] = image_path(dir, m->targets[i], level);
                g_autofree char *tmp = g_strconcat(dst[i], ".nkp-new", NULL);
                r = convert_chain(images, m->n_levels, s->value, tmp);
                if (r == 0 && rename(tmp, dst[i]) < 0)
                        r = nkp_fail(-errno, "Cannot rename '%s': %s.", tmp, g_strerror(errno));
                if (r < 0) {
                        (void) nkp_unlink_nofollow(tmp);
                        for (size_t k = 0; k < i; k++)
                                (void) nkp_unlink_nofollow(dst[k]);
                        return r;
                }
        }
        g_autofree char *new_xml = NULL;
        r = restored_xml(xml, name, m, dst, &new_xml);
        if (r == 0)
                r = restore_vtpm(ctx, d, dir);
        if (r == 0)
                r = nkp_virt_domain_define(v, new_xml);
        if (r < 0) {
                for (size_t i = 0; i < m->n_disks; i++)
                        (void) nkp_unlink_nofollow(dst[i]);
                return r;
        }
        if (ret_name)
                *ret_name = g_strdup(name);
        return 0;
}

/* ---- block copy ------------------------------------------------------------------------ */

static bool mirror_ready(virDomainPtr dom, const char *target)
{
        char *xml = virDomainGetXMLDesc(dom, 0);
        if (!xml)
                return false;
        bool ready = false;
        g_autofree char *needle = g_strdup_printf("<target dev='%s'", target);
        /* the disk element holding this target: its <mirror … ready='yes'> */
        const char *t = strstr(xml, needle);
        if (t) {
                const char *start = g_strrstr_len(xml, t - xml, "<disk ");
                const char *m = start ? strstr(start, "<mirror ") : NULL;
                const char *end = start ? strstr(start, "</disk>") : NULL;
                if (m && end && m < end) {
                        const char *tag_end = strchr(m, '>');
                        g_autofree char *tag = g_strndup(m, tag_end ? (gsize) (tag_end - m) : 0);
                        ready = strstr(tag, "ready='yes'") != NULL;
                }
        }
        free(xml);
        return ready;
}

int nkp_vm_blockcopy(nkp_context *ctx, nkp_virt *v, const char *domain, const char *target,
                     const char *dest)
{
        if (!g_path_is_absolute(dest))
                return nkp_fail(-EINVAL, "The copy's path '%s' must be absolute.", dest);
        if (g_file_test(dest, G_FILE_TEST_EXISTS))
                return nkp_fail(-EEXIST, "'%s' exists; name a new file.", dest);
        int active = nkp_virt_domain_is_active(v, domain);
        if (active < 0)
                return active;
        if (active == 0)
                return nkp_fail(-EOPNOTSUPP, "VM '%s' is shut off: a block copy needs it "
                                             "running (for a shut-off VM take a backup: nkpctl "
                                             "vm backup %s DIR).",
                                domain, domain);
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        int r = nkp_virt_domain_xml(v, domain, false, &xml);
        if (r < 0)
                return r;
        if ((r = nkp_domain_parse(xml, strlen(xml), &d)) < 0)
                return r;
        const NkpDomainDisk *disk = nkp_domain_find_disk(d, target);
        if (!d->keysafe || !disk || !disk->encryption_secret ||
            g_strcmp0(disk->encryption_format, "luks") != 0)
                return nkp_fail(-EINVAL, "Disk '%s' of VM '%s' is not encrypted by nkp; nkp "
                                         "copies only the disks it encrypted.",
                                target, domain);
        g_autofree char *esc = g_markup_escape_text(dest, -1);
        g_autofree char *dest_xml = g_strdup_printf(
                "<disk type='file'><driver type='qcow2'/><source file='%s'>"
                "<encryption format='luks'><secret type='passphrase' uuid='%s'/>"
                "</encryption></source></disk>", /* no <cipher>: a disk refuses it */
                esc, disk->encryption_secret);
        virDomainPtr dom = lookup(v, domain);
        if (!dom)
                return -ENOENT;
        r = nkp_own_job_mark(ctx, d->uuid, "copy", false);
        for (int attempt = 0; r == 0; attempt++) {
                if (virDomainBlockCopy(dom, target, dest_xml, NULL, 0,
                                       VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB) == 0)
                        break;
                if (attempt + 1 < LUKS_ATTEMPTS && strstr(virt_error(), "accurate CPU usage")) {
                        (void) nkp_unlink_nofollow(dest);
                        g_usleep((gulong) (200000 << attempt));
                        continue;
                }
                r = nkp_fail(-EIO, "libvirt refused the block copy of '%s' of VM '%s': %s.",
                             target, domain, virt_error());
        }
        while (r == 0 && !mirror_ready(dom, target)) {
                virDomainBlockJobInfo info;
                if (virDomainGetBlockJobInfo(dom, target, &info, 0) <= 0) {
                        r = nkp_fail(-EIO, "The block copy of '%s' of VM '%s' stopped: %s.",
                                     target, domain, virt_error());
                        break;
                }
                g_usleep(JOB_POLL_USEC);
        }
        /* ready: ending the job without a pivot leaves the copy complete and
         * consistent (virsh blockcopy --finish) */
        if (r == 0 && virDomainBlockJobAbort(dom, target, 0) < 0)
                r = nkp_fail(-EIO, "Cannot finish the block copy of '%s' of VM '%s': %s.",
                             target, domain, virt_error());
        (void) nkp_own_job_mark(ctx, d->uuid, "copy", true);
        virDomainFree(dom);
        if (r < 0) {
                (void) nkp_unlink_nofollow(dest);
                return r;
        }
        return check_luks_qcow2(dest);
}

/* ---- nkpd: copies made behind nkp's back ----------------------------------------------- */
/* libvirt 9.0 (measured in the lab, docs/backup.md) announces:
 *   virsh backup-begin, virtnbdbackup  JOB_COMPLETED, operation backup (9),
 *                                      at the end only (push and pull mode)
 *   virsh blockcopy                    BLOCK_JOB(_2) type copy, READY, then
 *                                      COMPLETED (pivot) or CANCELED (--finish)
 *   virsh save, managedsave            JOB_COMPLETED operation save (2), then
 *                                      lifecycle STOPPED_SAVED
 *   virsh dump                         nothing at all
 * and no event names a file.  So nkpd also looks, every 0.5 s, at the jobs
 * of running nkp VMs: a backup job's XML names its targets (and whether they
 * are encrypted); a save or dump job's file is the regular file QEMU holds
 * open write-only (/proc/PID/fd; libvirt hands QEMU that fd).  What the
 * look saw is kept per VM UUID until the event that ends the job. */

struct NkpCopyWatch {
        GHashTable *seen;    /* "uuid what" -> char* what the look saw (targets, file) */
        GHashTable *alarmed; /* "uuid dump" -> non-NULL: this dump job is alarmed already */
        GHashTable *dumps;   /* uuid -> name: dump jobs seen, no file seen yet */
        GHashTable *copies;  /* "uuid disk": block copies whose READY was handled */
        GHashTable *mirrors; /* "name disk" -> "E<file>" (encrypted) or "P<file>": block
                              * copy destinations last seen in the VM's status XML */
        GPtrArray *pending;  /* NkpCopyEvent* */
        GHashTable *memchecks;  /* names whose status XML was written: current snapshot to read */
        GHashTable *jobfiles;   /* uuid -> "SECONDS FILE": a snapshot job's look alarmed FILE then */
        GHashTable *memlooked;  /* "uuid created snapshot": current snapshots judged already */
        GHashTable *memrecord;  /* the record (below), loaded at first need; NULL before */
};

typedef struct {
        char *what; /* "backup", "copy", "save" */
        char *name;
        char *uuid;
        char *disk; /* copy: the target dev */
        int64_t at; /* real time, s */
} NkpCopyEvent;

static void copy_event_free(gpointer p)
{
        NkpCopyEvent *e = p;
        g_free(e->what);
        g_free(e->name);
        g_free(e->uuid);
        g_free(e->disk);
        g_free(e);
}

NkpCopyWatch *nkp_copy_watch_new(void)
{
        NkpCopyWatch *w = g_new0(NkpCopyWatch, 1);
        w->seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        w->alarmed = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        w->dumps = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        w->copies = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        w->mirrors = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        w->pending = g_ptr_array_new_with_free_func(copy_event_free);
        w->memchecks = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        w->jobfiles = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        w->memlooked = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        return w;
}

void nkp_copy_watch_free(NkpCopyWatch *w)
{
        if (!w)
                return;
        g_hash_table_unref(w->seen);
        g_hash_table_unref(w->alarmed);
        g_hash_table_unref(w->dumps);
        g_hash_table_unref(w->copies);
        g_hash_table_unref(w->mirrors);
        g_ptr_array_unref(w->pending);
        g_hash_table_unref(w->memchecks);
        g_hash_table_unref(w->jobfiles);
        g_hash_table_unref(w->memlooked);
        if (w->memrecord)
                g_hash_table_unref(w->memrecord);
        g_free(w);
}

void nkp_copy_watch_event(NkpCopyWatch *w, const char *what, const char *name, const char *uuid,
                          const char *disk)
{
        NkpCopyEvent *e = g_new0(NkpCopyEvent, 1);
        e->what = g_strdup(what);
        e->name = g_strdup(name);
        e->uuid = g_strdup(uuid);
        e->disk = g_strdup(disk);
        e->at = g_get_real_time() / G_USEC_PER_SEC;
        g_ptr_array_add(w->pending, e);
}

/* The protected directory (nkp host protect) holding `path`, or NULL. */
static char *protected_dir_of(nkp_context *ctx, const char *path)
{
        g_autoptr(nkp_hostkey_status) st = NULL;
        if (!path || nkp_hostkey_status_get(ctx, &st) < 0) {
                nkp_error_clear();
                return NULL;
        }
        for (size_t i = 0; i < nkp_hostkey_status_n_dirs(st); i++) {
                const char *dir = nkp_hostkey_status_dir(st, i);
                const char *state = nkp_hostkey_status_dir_state(st, i);
                if (!g_str_has_prefix(state, "unlocked") && !g_str_has_prefix(state, "lock"))
                        continue; /* not encrypted (yet) */
                size_t n = strlen(dir);
                if (strncmp(path, dir, n) == 0 && (path[n] == '/' || dir[n - 1] == '/'))
                        return g_strdup(dir);
        }
        return NULL;
}

/* Every "pipe:[N]" among the fds of process `pid`. */
static GHashTable *pipes_of(const char *pid)
{
        GHashTable *set = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        g_autofree char *fddir = g_strdup_printf("/proc/%s/fd", pid);
        GDir *dir = g_dir_open(fddir, 0, NULL);
        const char *fd;
        while (dir && (fd = g_dir_read_name(dir))) {
                g_autofree char *link = g_build_filename(fddir, fd, NULL);
                char *target = g_file_read_link(link, NULL);
                if (target && g_str_has_prefix(target, "pipe:"))
                        g_hash_table_add(set, target);
                else
                        g_free(target);
        }
        if (dir)
                g_dir_close(dir);
        return set;
}

/* libvirt 9.0 writes dumps and saves through libvirt_iohelper: QEMU writes
 * into a pipe, the helper (argv: libvirt_iohelper PATH FD …) into PATH.
 * The helper sharing a pipe with QEMU `qemu_pid` names the file. */
static char *iohelper_file(long qemu_pid)
{
        g_autofree char *qpid = g_strdup_printf("%ld", qemu_pid);
        g_autoptr(GHashTable) qpipes = pipes_of(qpid);
        if (g_hash_table_size(qpipes) == 0)
                return NULL;
        GDir *proc = g_dir_open("/proc", 0, NULL);
        const char *pid;
        char *found = NULL;
        while (!found && proc && (pid = g_dir_read_name(proc))) {
                if (!g_ascii_isdigit(pid[0]))
                        continue;
                g_autofree char *cmdpath = g_strdup_printf("/proc/%s/cmdline", pid);
                g_autofree char *cmd = NULL;
                gsize len = 0;
                if (!g_file_get_contents(cmdpath, &cmd, &len, NULL) || len == 0)
                        continue;
                g_autofree char *base = g_path_get_basename(cmd);
                size_t n0 = strlen(cmd);
                if (strcmp(base, "libvirt_iohelper") != 0 || n0 + 1 >= len || cmd[n0 + 1] != '/')
                        continue;
                g_autoptr(GHashTable) hp = pipes_of(pid);
                GHashTableIter it;
                gpointer k;
                g_hash_table_iter_init(&it, hp);
                while (g_hash_table_iter_next(&it, &k, NULL))
                        if (g_hash_table_contains(qpipes, k)) {
                                found = g_strdup(cmd + n0 + 1);
                                break;
                        }
        }
        if (proc)
                g_dir_close(proc);
        return found;
}

/* The regular file QEMU of VM `name` holds open write-only (not append): the
 * target of a save or dump that libvirt handed it, or else the file of the
 * libvirt_iohelper that QEMU writes it through. */
static char *qemu_output_file(nkp_context *ctx, const char *name)
{
        g_autofree char *rel = g_strdup_printf("/run/libvirt/qemu/%s.pid", name);
        g_autofree char *pidfile = nkp_context_path(ctx, rel);
        g_autofree char *text = NULL;
        size_t len = 0;
        if (nkp_read_file(pidfile, 64, false, &text, &len) < 0)
                return NULL;
        long pid = strtol(text, NULL, 10);
        if (pid <= 0)
                return NULL;
        g_autofree char *run = nkp_context_path(ctx, "/run/");
        g_autofree char *fddir = g_strdup_printf("/proc/%ld/fd", pid);
        GDir *dir = g_dir_open(fddir, 0, NULL);
        if (!dir)
                return NULL;
        char *found = NULL;
        const char *fd;
        while (!found && (fd = g_dir_read_name(dir))) {
                g_autofree char *link = g_build_filename(fddir, fd, NULL);
                g_autofree char *info_path = g_strdup_printf("/proc/%ld/fdinfo/%s", pid, fd);
                g_autofree char *info = NULL, *target = g_file_read_link(link, NULL);
                struct stat st;
                if (!target || target[0] != '/' || stat(link, &st) < 0 || !S_ISREG(st.st_mode) ||
                    !g_file_get_contents(info_path, &info, NULL, NULL))
                        continue;
                const char *f = strstr(info, "flags:");
                unsigned long flags = f ? strtoul(f + 6, NULL, 8) : 0;
                /* QEMU keeps its pid file open write-only too; logs are appended */
                if ((flags & O_ACCMODE) == O_WRONLY && !(flags & O_APPEND) &&
                    strcmp(target, pidfile) != 0 && !g_str_has_prefix(target, run) &&
                    !g_str_has_prefix(target, "/var/log/"))
                        found = g_steal_pointer(&target);
        }
        g_dir_close(dir);
        return found ? found : iohelper_file(pid);
}

/* "<target file> (encrypted)" for each disk of a running backup job, or
 * "pull mode (NBD export)" when it exports instead. */
static char *backup_targets(virDomainPtr dom)
{
        char *xml = virDomainBackupGetXMLDesc(dom, 0);
        if (!xml)
                return NULL;
        g_autoptr(GString) out = g_string_new("");
        if (strstr(xml, "mode='pull'") || strstr(xml, "mode=\"pull\""))
                g_string_append(out, "pull mode: the disks exported in clear over NBD");
        bool all_encrypted = strstr(xml, "<target") != NULL;
        for (const char *p = strstr(xml, "<target"); p; p = strstr(p + 1, "<target")) {
                const char *end = strstr(p, "</target>");
                const char *self_close = strstr(p, "/>");
                const char *enc = strstr(p, "<encryption");
                bool encrypted = enc && end && enc < end &&
                                 !(self_close && self_close < strchr(p, '>') + 1);
                if (!encrypted)
                        all_encrypted = false;
                const char *file = strstr(p, "file='");
                if (file && (!end || file < end)) {
                        file += 6;
                        const char *q = strchr(file, '\'');
                        if (q)
                                g_string_append_printf(out, "%s%.*s", out->len ? ", " : "",
                                                       (int) (q - file), file);
                }
        }
        free(xml);
        if (all_encrypted && !strstr(out->str, "pull mode"))
                return g_strdup("encrypted");
        return g_string_free(g_steal_pointer(&out), FALSE);
}

static bool is_nkp_vm(NkpVirt *v, const char *name, bool live)
{
        g_autofree char *ks = NULL;
        int r = nkp_virt_keysafe_get(v, name, live, &ks);
        nkp_error_clear();
        return r == 0 && ks != NULL;
}

/* True when the alarm is recorded (a failure is logged). */
static bool raise_clear(nkp_context *ctx, const char *kind, const char *name, const char *msg)
{
        bool ok = nkp_alarm_raise(ctx, kind, name, msg) == 0;
        if (!ok)
                nkp_log(NKP_LOG_ERROR, "%s", nkp_error_message());
        else
                nkp_log(NKP_LOG_WARNING, "alarm %s for '%s': %s", kind, name, msg);
        nkp_error_clear();
        return ok;
}

static void alarm_dump(nkp_context *ctx, const char *name, const char *file)
{
        g_autofree char *msg = g_strdup_printf(
                "VM '%s' was dumped (virsh dump) to '%s', outside the directories the host key "
                "protects: the guest's memory is in that file in clear. Delete it (shred), and "
                "dump into a protected directory (nkpctl host status lists them).",
                name, file ? file : "a file libvirt does not name");
        raise_clear(ctx, "vm-clear-save", name, msg);
}

/* An external memory snapshot (virsh snapshot-create-as --memspec file=F)
 * writes the guest's memory like a save; nkp's own disk-only snapshots are
 * snapshot jobs too, but QEMU writes no file for them. */
static void alarm_memory_snapshot(nkp_context *ctx, const char *name, const char *file)
{
        g_autofree char *msg = g_strdup_printf(
                "A snapshot of VM '%s' with its memory (virsh snapshot-create-as --memspec) is "
                "being written to '%s', outside the directories the host key protects: the "
                "guest's memory is in that file in clear. Delete the snapshot (virsh "
                "snapshot-delete) and that file (shred); snapshot with: nkpctl vm snapshot %s NAME",
                name, file, name);
        raise_clear(ctx, "vm-clear-save", name, msg);
}

/* The memory file of a snapshot job of running VM `name`: alarmed once per
 * job (`running` gets its key, so the mark goes with the job). */
static void look_at_snapshot(nkp_context *ctx, NkpCopyWatch *w, const char *name,
                             const char *uuid, GHashTable *running)
{
        g_autofree char *key = g_strdup_printf("%s snapshot", uuid);
        g_hash_table_add(running, g_strdup(uuid));
        if (g_hash_table_contains(w->alarmed, key))
                return;
        g_autofree char *file = qemu_output_file(ctx, name);
        g_autofree char *prot = file ? protected_dir_of(ctx, file) : NULL;
        if (!file)
                return; /* a disk-only snapshot, or the file not open yet */
        if (!prot) {
                alarm_memory_snapshot(ctx, name, file);
                g_hash_table_replace(w->jobfiles, g_strdup(uuid),
                                     g_strdup_printf("%" G_GINT64_FORMAT " %s",
                                                     g_get_real_time() / G_USEC_PER_SEC, file));
        }
        g_hash_table_add(w->alarmed, g_steal_pointer(&key));
}

bool nkp_copy_watch_poll(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w)
{
        bool busy = false;
        g_autoptr(GHashTable) dumping = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        g_autoptr(GHashTable) snapshotting =
                g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        virDomainPtr *doms = NULL;
        int n = virConnectListAllDomains(nkp_virt_connection(v), &doms,
                                         VIR_CONNECT_LIST_DOMAINS_ACTIVE);
        for (int i = 0; i < n; i++) {
                virDomainJobInfo info;
                int type = 0, nparams = 0, op = 0;
                virTypedParameterPtr params = NULL;
                char uuid[VIR_UUID_STRING_BUFLEN];
                const char *name = virDomainGetName(doms[i]);
                bool job = name && virDomainGetUUIDString(doms[i], uuid) == 0 &&
                           virDomainGetJobInfo(doms[i], &info) == 0 &&
                           info.type != VIR_DOMAIN_JOB_NONE &&
                           virDomainGetJobStats(doms[i], &type, &params, &nparams, 0) == 0 &&
                           virTypedParamsGetInt(params, nparams, VIR_DOMAIN_JOB_OPERATION, &op) == 1;
                if (job && op == VIR_DOMAIN_JOB_OPERATION_SNAPSHOT && is_nkp_vm(v, name, true)) {
                        busy = true;
                        look_at_snapshot(ctx, w, name, uuid, snapshotting);
                } else if (job &&
                           (op == VIR_DOMAIN_JOB_OPERATION_BACKUP ||
                            op == VIR_DOMAIN_JOB_OPERATION_SAVE ||
                            op == VIR_DOMAIN_JOB_OPERATION_DUMP) &&
                           is_nkp_vm(v, name, true)) {
                        const char *what = op == VIR_DOMAIN_JOB_OPERATION_BACKUP ? "backup"
                                           : op == VIR_DOMAIN_JOB_OPERATION_SAVE ? "save"
                                                                                 : "dump";
                        char *seen = op == VIR_DOMAIN_JOB_OPERATION_BACKUP
                                             ? backup_targets(doms[i])
                                             : qemu_output_file(ctx, name);
                        g_autofree char *key = g_strdup_printf("%s %s", uuid, what);
                        busy = true; /* look again soon: the file is open only for a while */
                        if (op == VIR_DOMAIN_JOB_OPERATION_DUMP) {
                                g_hash_table_add(dumping, g_strdup(uuid));
                                if (seen && !g_hash_table_contains(w->alarmed, key)) {
                                        g_autofree char *prot = protected_dir_of(ctx, seen);
                                        if (!prot)
                                                alarm_dump(ctx, name, seen);
                                        g_hash_table_add(w->alarmed, g_strdup(key));
                                        g_hash_table_remove(w->dumps, uuid);
                                } else if (!g_hash_table_contains(w->alarmed, key)) {
                                        g_hash_table_replace(w->dumps, g_strdup(uuid),
                                                             g_strdup(name));
                                }
                        }
                        if (seen)
                                g_hash_table_replace(w->seen, g_strdup(key), seen);
                }
                virTypedParamsFree(params, nparams);
                virDomainFree(doms[i]);
        }
        free(doms);
        /* dumps that ended before their file was seen: alarmed without it;
         * the alarmed mark of an ended dump goes (the next dump alarms again) */
        GHashTableIter it;
        gpointer k, val;
        g_hash_table_iter_init(&it, w->dumps);
        while (g_hash_table_iter_next(&it, &k, &val)) {
                if (!g_hash_table_contains(dumping, k)) {
                        alarm_dump(ctx, val, NULL);
                        g_hash_table_iter_remove(&it);
                }
        }
        g_hash_table_iter_init(&it, w->alarmed);
        while (g_hash_table_iter_next(&it, &k, NULL)) {
                g_autofree char *u = g_strndup(k, strcspn(k, " "));
                bool snapshot = g_str_has_suffix(k, " snapshot");
                if (!g_hash_table_contains(snapshot ? snapshotting : dumping, u))
                        g_hash_table_iter_remove(&it);
        }
        nkp_error_clear();
        return busy;
}

/* The <mirror> inside the <disk> element that starts at `disk` and ends at
 * `end` (text libvirt wrote: the live or the status XML): its file, and
 * whether it has an <encryption>.  NULL when the disk has no mirror. */
static char *mirror_in_disk(const char *disk, const char *end, bool *ret_encrypted)
{
        *ret_encrypted = false;
        const char *m = strstr(disk, "<mirror");
        if (!m || m > end)
                return NULL;
        const char *mend = strstr(m, "</mirror>");
        const char *enc = strstr(m, "<encryption");
        *ret_encrypted = enc && mend && enc < mend;
        const char *f = strstr(m, "file='");
        if (!f || (mend && f > mend) || f > end)
                return NULL;
        f += 6;
        const char *q = strchr(f, '\'');
        return q ? g_strndup(f, (gsize) (q - f)) : NULL;
}

/* The live XML's <mirror> of disk `target`: its file, and whether it has an
 * <encryption>. */
static char *mirror_of(NkpVirt *v, const char *name, const char *target, bool *ret_encrypted)
{
        *ret_encrypted = false;
        g_autofree char *xml = NULL;
        if (nkp_virt_domain_xml(v, name, false, &xml) < 0) {
                nkp_error_clear();
                return NULL;
        }
        g_autofree char *needle = g_strdup_printf("<target dev='%s'", target);
        const char *t = strstr(xml, needle);
        const char *start = t ? g_strrstr_len(xml, t - xml, "<disk ") : NULL;
        const char *end = start ? strstr(start, "</disk>") : NULL;
        return end ? mirror_in_disk(start, end, ret_encrypted) : NULL;
}

/* The text between `open` and the next `close` after it in `xml`, or NULL. */
static char *between(const char *xml, const char *open, const char *close)
{
        const char *a = xml ? strstr(xml, open) : NULL;
        const char *b = a ? strstr(a + strlen(open), close) : NULL;
        return b ? g_strndup(a + strlen(open), (gsize) (b - a - strlen(open))) : NULL;
}

/* libvirt writes the status XML when an async job starts and ends
 * (<job ... async='dump'>): a dump libvirt announces nowhere else is noted
 * here, so one that ends before the next look is alarmed all the same. */
static bool note_job(NkpCopyWatch *w, const char *name, const char *xml)
{
        g_autofree char *job = between(xml, "<job ", ">");
        g_autofree char *async = job ? between(job, "async='", "'") : NULL;
        if (!async || (strcmp(async, "dump") != 0 && strcmp(async, "save") != 0 &&
                       strcmp(async, "backup") != 0 && strcmp(async, "snapshot") != 0))
                return false;
        g_autofree char *dom = between(xml, "<domain ", "</domain>");
        g_autofree char *uuid = dom ? between(dom, "<uuid>", "</uuid>") : NULL;
        g_autofree char *key = uuid ? g_strdup_printf("%s dump", uuid) : NULL;
        if (strcmp(async, "dump") == 0 && uuid && !g_hash_table_contains(w->alarmed, key))
                g_hash_table_replace(w->dumps, g_steal_pointer(&uuid), g_strdup(name));
        return true;
}

bool nkp_copy_watch_status_written(nkp_context *ctx, NkpCopyWatch *w, const char *name)
{
        g_autofree char *rel = g_strdup_printf("/run/libvirt/qemu/%s.xml", name);
        g_autofree char *path = nkp_context_path(ctx, rel);
        g_autofree char *xml = NULL;
        if (!g_file_get_contents(path, &xml, NULL, NULL))
                return false; /* gone: the VM stopped */
        bool job = note_job(w, name, xml);
        g_hash_table_add(w->memchecks, g_strdup(name));
        /* the <domain> only: libvirt's private data (<blockjobs>) names disks too */
        const char *dom = strstr(xml, "<domain ");
        for (const char *disk = dom ? strstr(dom, "<disk ") : NULL; disk;
             disk = strstr(disk + 1, "<disk ")) {
                const char *end = strstr(disk, "</disk>");
                const char *t = strstr(disk, "<target dev='");
                if (!end || !t || t > end)
                        continue;
                t += strlen("<target dev='");
                const char *q = strchr(t, '\'');
                bool encrypted = false;
                g_autofree char *file = mirror_in_disk(disk, end, &encrypted);
                if (!q || !file)
                        continue;
                g_autofree char *dev = g_strndup(t, (gsize) (q - t));
                g_hash_table_replace(w->mirrors, g_strdup_printf("%s %s", name, dev),
                                     g_strdup_printf("%c%s", encrypted ? 'E' : 'P', file));
        }
        return job;
}

/* A save image of VM `uuid` written since `since` in one of the protected
 * directories (libvirt names no file; a `virsh save` into a protected
 * directory must not alarm). */
static char *find_protected_save(nkp_context *ctx, const char *uuid, int64_t since)
{
        g_autoptr(nkp_hostkey_status) st = NULL;
        if (nkp_hostkey_status_get(ctx, &st) < 0) {
                nkp_error_clear();
                return NULL;
        }
        g_autofree char *want = g_strdup_printf("<uuid>%s</uuid>", uuid);
        for (size_t i = 0; i < nkp_hostkey_status_n_dirs(st); i++) {
                const char *dirpath = nkp_hostkey_status_dir(st, i);
                if (!g_str_has_prefix(nkp_hostkey_status_dir_state(st, i), "unlocked"))
                        continue;
                GDir *dir = g_dir_open(dirpath, 0, NULL);
                const char *e;
                while (dir && (e = g_dir_read_name(dir))) {
                        g_autofree char *p = g_build_filename(dirpath, e, NULL);
                        struct stat sb;
                        if (stat(p, &sb) < 0 || !S_ISREG(sb.st_mode) || sb.st_mtime < since)
                                continue;
                        char head[16384];
                        int fd = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
                        ssize_t n = fd >= 0 ? pread(fd, head, sizeof head - 1, 0) : -1;
                        if (fd >= 0)
                                close(fd);
                        if (n < 16 || memcmp(head, "LibvirtQemudSa", 14) != 0)
                                continue;
                        head[n] = '\0';
                        if (memmem(head, (size_t) n, want, strlen(want))) {
                                g_dir_close(dir);
                                return g_steal_pointer(&p);
                        }
                }
                if (dir)
                        g_dir_close(dir);
        }
        return NULL;
}

static void process_backup(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w, NkpCopyEvent *e)
{
        g_autofree char *key = g_strdup_printf("%s backup", e->uuid);
        g_autofree char *seen = NULL;
        g_hash_table_steal_extended(w->seen, key, NULL, (gpointer *) &seen);
        if (!is_nkp_vm(v, e->name, true) && !is_nkp_vm(v, e->name, false))
                return;
        if (nkp_own_job_claims(ctx, e->uuid, "backup", e->at) ||
            g_strcmp0(seen, "encrypted") == 0)
                return;
        g_autofree char *msg = g_strdup_printf(
                "A backup of VM '%s' was made behind nkp's back (virsh backup-begin, "
                "virtnbdbackup…): %s%s%s in clear. Delete that copy, and back up with: nkpctl vm "
                "backup %s DIR",
                e->name, seen ? "its copy (" : "its copy", seen ? seen : "",
                seen ? ") holds the guest's data" : " holds the guest's data", e->name);
        raise_clear(ctx, "vm-clear-copy", e->name, msg);
}

static void process_copy(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w, NkpCopyEvent *e)
{
        if (!is_nkp_vm(v, e->name, true)) {
                nkp_log(NKP_LOG_INFO, "block copy of '%s' of '%s': not an nkp VM", e->disk,
                        e->name);
                return;
        }
        bool encrypted = false;
        g_autofree char *file = mirror_of(v, e->name, e->disk, &encrypted);
        /* a copy that ended before this look: its destination as the status
         * XML named it while the copy ran */
        g_autofree char *key = g_strdup_printf("%s %s", e->name, e->disk);
        const char *noted = file ? NULL : g_hash_table_lookup(w->mirrors, key);
        if (noted) {
                encrypted = noted[0] == 'E';
                file = g_strdup(noted + 1);
        }
        /* claimed first, always: the claim uses nkp's mark up (vm-backup's own
         * copies are encrypted too, and a mark left over would claim the next
         * plain copy) */
        bool own = nkp_own_job_claims(ctx, e->uuid, "copy", e->at);
        if (encrypted || own) {
                nkp_log(NKP_LOG_INFO, "block copy of '%s' of '%s' to '%s': %s", e->disk, e->name,
                        file ? file : "?", own ? "nkp's own" : "encrypted");
                return;
        }
        g_autofree char *msg = g_strdup_printf(
                "Disk '%s' of VM '%s' was block-copied behind nkp's back (virsh blockcopy) to "
                "'%s' in clear. Delete that copy, and copy with: nkpctl vm blockcopy %s %s DEST",
                e->disk, e->name, file ? file : "a file libvirt no longer names", e->name,
                e->disk);
        raise_clear(ctx, "vm-clear-copy", e->name, msg);
}

static void process_save(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w, NkpCopyEvent *e)
{
        g_autofree char *key = g_strdup_printf("%s save", e->uuid);
        g_autofree char *file = NULL;
        g_hash_table_steal_extended(w->seen, key, NULL, (gpointer *) &file);
        if (!is_nkp_vm(v, e->name, false))
                return;
        if (!file && nkp_virt_domain_has_managed_save(v, e->name) == 1) {
                g_autofree char *rel = g_strdup_printf("/var/lib/libvirt/qemu/save/%s.save",
                                                       e->name);
                file = nkp_context_path(ctx, rel);
        }
        nkp_error_clear();
        g_autofree char *prot = protected_dir_of(ctx, file);
        if (!prot && !file)
                prot = find_protected_save(ctx, e->uuid, e->at - 600);
        if (prot)
                return;
        g_autofree char *msg = g_strdup_printf(
                "VM '%s' was saved (virsh save, managedsave) to '%s', outside the directories "
                "the host key protects: the guest's memory is in that file in clear. Restore "
                "it (virsh restore / start), delete the image, and save into a protected "
                "directory (nkpctl host protect; nkpctl host status lists them).",
                e->name, file ? file : "a file libvirt does not name");
        raise_clear(ctx, "vm-clear-save", e->name, msg);
}

/* True when the look at snapshot `s`'s own job alarmed its file (not the
 * look at an older job: a --no-metadata snapshot to the same file left no
 * record to clear it with). */
static bool alarmed_during_job(NkpCopyWatch *w, const char *uuid, const NkpRevertSnapshot *s)
{
        const char *entry = g_hash_table_lookup(w->jobfiles, uuid);
        char *file = NULL;
        int64_t at = entry ? g_ascii_strtoll(entry, &file, 10) : 0;
        return entry && file[0] == ' ' && at >= s->created &&
               strcmp(file + 1, s->memory_file) == 0;
}

/* ---- the record of alarmed memory snapshots --------------------------------------
 * ROOT/var/lib/nkp/memory-snapshots (0600, written atomically, no key
 * material): one line per memory snapshot of an nkp VM whose file in clear
 * nkpd alarmed, "VM-UUID CREATED SNAPSHOT-NAME" (CREATED: the snapshot's
 * <creationTime>, so a new snapshot under an old name is a new line).  It
 * makes the alarm once per snapshot across nkpd's restarts: the start scan
 * alarms every memory snapshot in clear not in it (made while nkpd was
 * stopped, or before nkp was installed: that is the point), and neither
 * the scan nor the watch raises again one the admin has cleared.  A record
 * that cannot be read or is damaged is logged and taken as empty: alarming
 * again is the safe direction, and the next start scan writes it anew.
 * Lines of deleted snapshots are pruned at the start scan. */
#define MEMRECORD_PATH "/var/lib/nkp/memory-snapshots"
#define MEMRECORD_MAX (1024 * 1024)

static char *memrecord_key(const char *uuid, const NkpRevertSnapshot *s)
{
        return g_strdup_printf("%s %" G_GINT64_FORMAT " %s", uuid, s->created, s->name);
}

/* "UUID CREATED NAME": CREATED decimal, NAME not empty. */
static bool memrecord_line_valid(const char *line)
{
        const char *sp = strchr(line, ' ');
        g_autofree char *uuid = sp ? g_strndup(line, (size_t) (sp - line)) : NULL;
        bool ok = uuid && uuid_valid(uuid);
        nkp_error_clear();
        if (!ok || !g_ascii_isdigit(sp[1]))
                return false;
        const char *p = sp + 1;
        while (g_ascii_isdigit(*p))
                p++;
        return *p == ' ' && p[1] != '\0';
}

/* The record's lines, as a set (the watch owns it); loaded at first need. */
static GHashTable *memrecord(nkp_context *ctx, NkpCopyWatch *w)
{
        if (w->memrecord)
                return w->memrecord;
        w->memrecord = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        g_autofree char *path = nkp_context_path(ctx, MEMRECORD_PATH);
        g_autofree char *text = NULL;
        int r = nkp_read_file(path, MEMRECORD_MAX, true, &text, NULL);
        if (r < 0 && r != -ENOENT)
                nkp_log(NKP_LOG_WARNING, "%s The record of alarmed memory snapshots is taken as "
                                         "empty: each memory snapshot in clear is alarmed again.",
                        nkp_error_message());
        nkp_error_clear();
        g_auto(GStrv) lines = text ? g_strsplit(text, "\n", -1) : NULL;
        for (guint i = 0; lines && lines[i]; i++) {
                if (lines[i][0] == '\0' && !lines[i + 1])
                        break; /* after the last newline */
                if (!memrecord_line_valid(lines[i])) {
                        nkp_log(NKP_LOG_WARNING,
                                "The record of alarmed memory snapshots '%s' is damaged (line %u); "
                                "it is taken as empty: each memory snapshot in clear is alarmed "
                                "again, and the record is written anew.",
                                path, i + 1);
                        g_hash_table_remove_all(w->memrecord);
                        break;
                }
                g_hash_table_add(w->memrecord, g_strdup(lines[i]));
        }
        return w->memrecord;
}

static void memrecord_save(nkp_context *ctx, GHashTable *rec)
{
        GList *keys = g_list_sort(g_hash_table_get_keys(rec), (GCompareFunc) strcmp);
        g_autoptr(GString) text = g_string_new(NULL);
        for (GList *l = keys; l; l = l->next)
                g_string_append_printf(text, "%s\n", (const char *) l->data);
        g_list_free(keys);
        g_autofree char *path = nkp_context_path(ctx, MEMRECORD_PATH);
        int r = nkp_mkdir_private(ctx->store_dir);
        if (r < 0)
                nkp_fail(r, "Cannot create '%s': %s.", ctx->store_dir, strerror(-r));
        if (r < 0 || nkp_write_file_atomic(path, text->str, text->len, 0600, false) < 0)
                nkp_log(NKP_LOG_ERROR, "%s The memory snapshots alarmed now are alarmed again "
                                       "when nkpd restarts.",
                        nkp_error_message());
        nkp_error_clear();
}

/* `key` (memrecord_key) into the record and the record to disk.  A name
 * with a newline cannot be a line: that snapshot is alarmed at each start. */
static void memrecord_add(nkp_context *ctx, NkpCopyWatch *w, const char *key)
{
        if (strchr(key, '\n'))
                return;
        g_hash_table_add(memrecord(ctx, w), g_strdup(key));
        memrecord_save(ctx, w->memrecord);
}

/* True when snapshot `s` keeps the guest's memory in a file that still
 * exists outside the protected directories. */
static bool memory_in_clear(nkp_context *ctx, const NkpRevertSnapshot *s)
{
        struct stat sb;
        if (!s->memory_file || stat(s->memory_file, &sb) < 0)
                return false;
        g_autofree char *prot = protected_dir_of(ctx, s->memory_file);
        return prot == NULL;
}

/* One alarm for the memory snapshots `snaps` (NkpRevertSnapshot*, at least
 * one) of VM `name`: the first named with its file, the others by name
 * while the line stays short (an alarm is at most 1024 bytes), then
 * counted.  True when raised. */
static bool alarm_snapshots_in_clear(nkp_context *ctx, const char *name, GPtrArray *snaps)
{
        const NkpRevertSnapshot *first = snaps->pdata[0];
        g_autoptr(GString) others = g_string_new(NULL);
        guint named = 1;
        for (; named < snaps->len && others->len < 160; named++) {
                const NkpRevertSnapshot *s = snaps->pdata[named];
                g_string_append_printf(others, "%s'%s'", others->len ? ", " : "", s->name);
        }
        if (named < snaps->len)
                g_string_append_printf(others, " and %u more", snaps->len - named);
        g_autofree char *also = snaps->len > 1
                                        ? g_strdup_printf(" So do its snapshots %s (virsh "
                                                          "snapshot-dumpxml %s S names the file).",
                                                          others->str, name)
                                        : g_strdup("");
        g_autofree char *msg = g_strdup_printf(
                "Snapshot '%s' of VM '%s' holds the guest's memory in clear in '%s' (outside the "
                "directories the host key protects).%s Delete the snapshot (virsh snapshot-delete "
                "%s %s) and shred that file; snapshot with: nkpctl vm snapshot %s NAME",
                first->name, name, first->memory_file, also, name, first->name, name);
        return raise_clear(ctx, "vm-clear-save", name, msg);
}

/* The current snapshot of running nkp VM `dom` (`name`, `uuid`), looked at
 * once: a memory file in clear not in the record is alarmed (unless the
 * look at its job alarmed that file) and recorded. */
static void check_memory_snapshot(nkp_context *ctx, NkpCopyWatch *w, virDomainPtr dom,
                                  const char *name, const char *uuid)
{
        virDomainSnapshotPtr snap = virDomainSnapshotCurrent(dom, 0);
        char *xml = snap ? virDomainSnapshotGetXMLDesc(snap, 0) : NULL;
        const char *sname = snap ? virDomainSnapshotGetName(snap) : NULL;
        g_autoptr(NkpRevertSnapshot) s = NULL;
        if (xml && sname && nkp_revert_snapshot_parse(sname, xml, &s) == 0 && s->memory_file) {
                g_autofree char *key = memrecord_key(uuid, s);
                if (!g_hash_table_contains(w->memlooked, key)) {
                        if (!g_hash_table_contains(memrecord(ctx, w), key) &&
                            memory_in_clear(ctx, s)) {
                                g_autoptr(GPtrArray) one = g_ptr_array_new();
                                g_ptr_array_add(one, s);
                                if (alarmed_during_job(w, uuid, s) ||
                                    alarm_snapshots_in_clear(ctx, name, one))
                                        memrecord_add(ctx, w, key);
                        }
                        g_hash_table_add(w->memlooked, g_steal_pointer(&key));
                        g_hash_table_remove(w->jobfiles, uuid);
                }
        }
        free(xml);
        if (snap)
                virDomainSnapshotFree(snap);
        nkp_error_clear();
}

static void check_memory_snapshots(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w)
{
        GHashTableIter it;
        gpointer k;
        g_hash_table_iter_init(&it, w->memchecks);
        while (g_hash_table_iter_next(&it, &k, NULL)) {
                virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(v), k);
                char uuid[VIR_UUID_STRING_BUFLEN];
                if (dom && virDomainGetUUIDString(dom, uuid) == 0 && is_nkp_vm(v, k, true))
                        check_memory_snapshot(ctx, w, dom, k, uuid);
                if (dom)
                        virDomainFree(dom);
                g_hash_table_iter_remove(&it);
        }
        nkp_error_clear();
}

/* Every memory snapshot in clear of nkp VM `dom` not in the record: one
 * alarm, then each into `kept`; the record's lines of its snapshots that
 * still exist into `kept`.  Returns how many were alarmed. */
static guint scan_vm_memory_snapshots(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w,
                                      virDomainPtr dom, GHashTable *kept)
{
        const char *name = virDomainGetName(dom);
        char uuid[VIR_UUID_STRING_BUFLEN];
        if (!name || virDomainGetUUIDString(dom, uuid) < 0 ||
            !is_nkp_vm(v, name, virDomainIsActive(dom) == 1))
                return 0; /* not nkp's (any more): its lines go */
        g_autoptr(GPtrArray) snaps = NULL;
        if (nkp_vm_snapshots(v, name, &snaps) < 0) {
                nkp_log(NKP_LOG_WARNING, "%s Its memory snapshots are not checked now.",
                        nkp_error_message());
                nkp_error_clear();
                GHashTableIter it;
                gpointer k;
                g_hash_table_iter_init(&it, memrecord(ctx, w));
                while (g_hash_table_iter_next(&it, &k, NULL))
                        if (g_str_has_prefix(k, uuid))
                                g_hash_table_add(kept, g_strdup(k));
                return 0;
        }
        g_autoptr(GPtrArray) in_clear = g_ptr_array_new();
        g_autoptr(GPtrArray) keys = g_ptr_array_new_with_free_func(g_free);
        for (guint i = 0; i < snaps->len; i++) {
                const NkpRevertSnapshot *s = snaps->pdata[i];
                g_autofree char *key = memrecord_key(uuid, s);
                if (g_hash_table_contains(memrecord(ctx, w), key))
                        g_hash_table_add(kept, g_steal_pointer(&key));
                else if (memory_in_clear(ctx, s)) {
                        g_ptr_array_add(in_clear, snaps->pdata[i]);
                        g_ptr_array_add(keys, g_steal_pointer(&key));
                }
        }
        if (!in_clear->len || !alarm_snapshots_in_clear(ctx, name, in_clear))
                return 0;
        for (guint i = 0; i < keys->len; i++)
                if (!strchr(keys->pdata[i], '\n'))
                        g_hash_table_add(kept, g_strdup(keys->pdata[i]));
        return in_clear->len;
}

void nkp_copy_watch_start_scan(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w)
{
        virDomainPtr *doms = NULL;
        int n = virConnectListAllDomains(nkp_virt_connection(v), &doms, 0);
        if (n < 0) {
                nkp_log(NKP_LOG_WARNING, "Cannot list libvirt's domains: %s. Memory snapshots "
                                         "made while nkpd was stopped are not checked now.",
                        virt_error());
                nkp_error_clear();
                return;
        }
        GHashTable *rec = memrecord(ctx, w);
        g_autoptr(GHashTable) kept = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        guint alarmed = 0;
        for (int i = 0; i < n; i++) {
                alarmed += scan_vm_memory_snapshots(ctx, v, w, doms[i], kept);
                virDomainFree(doms[i]);
        }
        free(doms);
        guint pruned = g_hash_table_size(rec) + alarmed - g_hash_table_size(kept);
        /* one line each scan: the lab test waits for it */
        nkp_log(NKP_LOG_INFO, "memory snapshots of nkp VMs checked: %u in clear alarmed now, "
                              "%u alarmed before",
                alarmed, g_hash_table_size(kept) - MIN(alarmed, g_hash_table_size(kept)));
        if (alarmed || pruned) {
                g_hash_table_remove_all(rec);
                GHashTableIter it;
                gpointer k;
                g_hash_table_iter_init(&it, kept);
                while (g_hash_table_iter_next(&it, &k, NULL))
                        g_hash_table_add(rec, g_strdup(k));
                memrecord_save(ctx, rec);
        }
        nkp_error_clear();
}

void nkp_copy_watch_process(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w)
{
        check_memory_snapshots(ctx, v, w);
        while (w->pending->len) {
                NkpCopyEvent *e = g_ptr_array_steal_index(w->pending, 0);
                if (strcmp(e->what, "backup") == 0)
                        process_backup(ctx, v, w, e);
                else if (strcmp(e->what, "copy") == 0 || strcmp(e->what, "copy-end") == 0) {
                        g_autofree char *key = g_strdup_printf("%s %s", e->uuid, e->disk);
                        bool end = strcmp(e->what, "copy-end") == 0;
                        if (!end || !g_hash_table_remove(w->copies, key)) {
                                process_copy(ctx, v, w, e);
                                if (!end)
                                        g_hash_table_add(w->copies, g_steal_pointer(&key));
                        }
                        if (end) {
                                g_autofree char *mkey = g_strdup_printf("%s %s", e->name, e->disk);
                                g_hash_table_remove(w->mirrors, mkey);
                        }
                }
                else
                        process_save(ctx, v, w, e);
                copy_event_free(e);
        }
}

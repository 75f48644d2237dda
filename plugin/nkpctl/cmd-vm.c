/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm …: enrolling VMs (encrypt/decrypt), their status, and the
 * cross-VM helpers (provider usage, host unlock).
 *
 *   vm encrypt DOMAIN [--provider NAME] [--disks all|vda,vdb…]
 *   vm decrypt DOMAIN
 *   vm status DOMAIN | vm list
 *
 * encrypt, on a shut-off domain:
 *  1. provider = --provider or the default; it must be active (backed up).
 *  2. a DEK per object (the emulated vTPM, each chosen disk), a keysafe
 *     (fresh KEK salt) holding them wrapped, a random secret UUID each.
 *  3. each chosen plain qcow2 P is converted to a LUKS qcow2 P.nkp-new with
 *     `qemu-img convert` (passphrase = hex(DEK) through a pipe, /dev/fd/3,
 *     never argv or a file; encrypt.iter-time=10: the key has full entropy,
 *     stretching it buys nothing and would cost ~2 s at every start), then
 *     checked with `qemu-img compare` against P.  Free space is checked
 *     first (allocated size of P + 5% + 16 MiB) and refused cleanly.
 *  4. swap: P → P.nkp-old, P.nkp-new → P (same directory, rename), then the
 *     new definition (keysafe in <metadata>, <encryption> on the disks and
 *     the vTPM backend) is defined; if libvirt refuses it the renames are
 *     undone.  Only then is P.nkp-old removed.  A crash between the swap and
 *     the define leaves P.nkp-old (the original) beside P: nothing is lost.
 *  decrypt is the same the other way round (keys from the keysafe).
 *
 * The vTPM: with no state yet (never started) it is enrolled by the XML
 * alone; libvirt hands the secret to swtpm_setup/swtpm at the first start,
 * so no clear state is ever written.  A vTPM that already has state in
 * clear (or, for decrypt, encrypted state) is refused with the reason: swtpm
 * assumes every state file is encrypted once it gets a key, so the state
 * must be re-written through swtpm_ioctl --save/--load; that conversion is
 * not implemented yet and nkp never leaves a VM half-converted.
 *
 * Exit 0 on success; one line on stderr otherwise.  libvirt calls run under
 * a process deadline (alarm, 60 s): libvirt has no per-call timeout. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <gio/gio.h>

#include "nkpctl.h"

#define LIBVIRT_DEADLINE 60

static void on_alarm(int sig)
{
        (void) sig;
        static const char msg[] = "nkpctl: libvirt did not answer within 60 seconds; is "
                                  "libvirtd running and responsive?\n";
        ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void) w;
        _exit(1);
}

static void deadline_arm(void)
{
        struct sigaction sa = { .sa_handler = on_alarm };
        sigaction(SIGALRM, &sa, NULL);
        alarm(LIBVIRT_DEADLINE);
}

static void deadline_disarm(void)
{
        alarm(0);
}

static int open_virt(NkpctlGlobals *g, NkpVirt **ret)
{
        deadline_arm();
        return nkp_virt_open(g->connect_uri, ret);
}

static int load_domain(NkpVirt *v, const char *name, char **ret_xml, NkpDomain **ret)
{
        g_autofree char *xml = NULL;
        int r = nkp_virt_domain_xml(v, name, true, &xml);
        if (r < 0)
                return r;
        r = nkp_domain_parse(xml, strlen(xml), ret);
        if (r < 0)
                return r;
        if (ret_xml)
                *ret_xml = g_steal_pointer(&xml);
        return 0;
}

/* ---- vTPM state ---------------------------------------------------------- */

enum vtpm_state { VTPM_NONE, VTPM_CLEAR, VTPM_ENCRYPTED, VTPM_UNKNOWN };

static char *vtpm_state_file(const NkpDomain *d)
{
        const char *base = g_getenv("NKP_SWTPM_STATE_DIR");
        if (!base || !base[0])
                base = "/var/lib/libvirt/swtpm";
        bool v12 = d->tpm_version && strcmp(d->tpm_version, "1.2") == 0;
        return g_build_filename(base, d->uuid, v12 ? "tpm1.2" : "tpm2",
                                v12 ? "tpm-00.permall" : "tpm2-00.permall", NULL);
}

/* swtpm's state files start with a header (swtpm_nvstore.c, packed, big
 * endian): u8 version, u8 min_version, u16 hdrsize, u16 flags, u32 totlen;
 * flags bit 0 = encrypted with the state key. */
static enum vtpm_state vtpm_state(const NkpDomain *d)
{
        g_autofree char *path = vtpm_state_file(d);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return errno == ENOENT ? VTPM_NONE : VTPM_UNKNOWN;
        uint8_t h[10];
        ssize_t n = read(fd, h, sizeof h);
        close(fd);
        if (n != (ssize_t) sizeof h || h[0] < 1 || h[0] > 3)
                return VTPM_UNKNOWN;
        unsigned flags = (unsigned) h[4] << 8 | h[5];
        return (flags & 1) ? VTPM_ENCRYPTED : VTPM_CLEAR;
}

/* ---- running qemu-img with secrets on pipes ----------------------------- */

/* Runs argv with `secrets[i]` readable on fd 3+i (a pipe filled before the
 * program starts; the value is never in argv, the environment or a file).
 * stdout is discarded; stderr is returned in *ret_err (first line). */
static int run_tool(const char *const *argv, nkp_secret *const *secrets, size_t n_secrets,
                    char **ret_err)
{
        g_autoptr(GSubprocessLauncher) l =
                g_subprocess_launcher_new(G_SUBPROCESS_FLAGS_STDOUT_SILENCE |
                                          G_SUBPROCESS_FLAGS_STDERR_PIPE);
        for (size_t i = 0; i < n_secrets; i++) {
                int p[2];
                if (pipe2(p, O_CLOEXEC) < 0)
                        return nkp_fail(-errno, "Cannot create a pipe: %s.", g_strerror(errno));
                size_t len = nkp_secret_len(secrets[i]);
                if (write(p[1], nkp_secret_data(secrets[i]), len) != (ssize_t) len) {
                        close(p[0]);
                        close(p[1]);
                        return nkp_fail(-EIO, "Cannot hand the key to %s.", argv[0]);
                }
                close(p[1]);
                g_subprocess_launcher_take_fd(l, p[0], 3 + (int) i);
        }
        g_autoptr(GError) error = NULL;
        g_autoptr(GSubprocess) sp = g_subprocess_launcher_spawnv(l, argv, &error);
        if (!sp)
                return nkp_fail(-ENOENT, "Cannot run '%s': %s.", argv[0], error->message);
        g_autofree char *err = NULL;
        if (!g_subprocess_communicate_utf8(sp, NULL, NULL, NULL, &err, &error))
                return nkp_fail(-EIO, "Running '%s' failed: %s.", argv[0], error->message);
        int status = g_subprocess_get_exit_status(sp);
        if (ret_err) {
                g_autofree char *e = g_strstrip(g_strdup(err ? err : ""));
                char *nl = strchr(e, '\n');
                if (nl)
                        *nl = '\0';
                *ret_err = g_steal_pointer(&e);
        }
        return status;
}

static int check_space(const char *path)
{
        struct stat st;
        if (stat(path, &st) < 0)
                return nkp_fail(-errno, "Cannot read the disk '%s': %s.", path, g_strerror(errno));
        g_autofree char *dir = g_path_get_dirname(path);
        struct statvfs vfs;
        if (statvfs(dir, &vfs) < 0)
                return nkp_fail(-errno, "Cannot check the free space in '%s': %s.", dir,
                                g_strerror(errno));
        guint64 need = (guint64) st.st_blocks * 512;
        need += need / 20 + 16 * 1024 * 1024;
        guint64 have = (guint64) vfs.f_bavail * vfs.f_frsize;
        if (g_getenv("NKP_TEST_FREE_SPACE"))
                have = g_ascii_strtoull(g_getenv("NKP_TEST_FREE_SPACE"), NULL, 10);
        if (have < need)
                return nkp_fail(-ENOSPC,
                                "Not enough space in '%s' to convert '%s': %" G_GUINT64_FORMAT
                                " MiB free, %" G_GUINT64_FORMAT " MiB needed (a full copy). Free "
                                "some space and run the command again; nothing was changed.",
                                dir, path, have >> 20, (need >> 20) + 1);
        return 0;
}

/* Converts `path` into `path`.nkp-new: to LUKS under `value` (encrypt), or
 * from LUKS to plain (value_in, decrypt).  Then compares the two images. */
static int convert_disk(const char *path, const nkp_secret *value_out,
                        const nkp_secret *value_in)
{
        g_autofree char *tmp = g_strconcat(path, ".nkp-new", NULL);
        g_autofree char *err = NULL;
        int r = check_space(path);
        if (r < 0)
                return r;
        (void) unlink(tmp); /* a leftover of an interrupted run */

        nkp_secret *secrets[1] = { (nkp_secret *) (value_out ? value_out : value_in) };
        g_autofree char *src_opts = g_strdup_printf(
                "driver=qcow2,file.filename=%s%s", path, value_in ? ",encrypt.key-secret=s0" : "");
        g_autofree char *dst_opts = g_strdup_printf(
                "driver=qcow2,file.filename=%s%s", tmp, value_out ? ",encrypt.key-secret=s0" : "");
        if (value_out) {
                const char *argv[] = { "qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2",
                                       "--object", "secret,id=s0,file=/dev/fd/3,format=raw",
                                       "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                                             "encrypt.iter-time=10",
                                       path, tmp, NULL };
                r = run_tool(argv, secrets, 1, &err);
        } else {
                const char *argv[] = { "qemu-img", "convert", "-q", "--object",
                                       "secret,id=s0,file=/dev/fd/3,format=raw", "--image-opts",
                                       src_opts, "-O", "qcow2", tmp, NULL };
                r = run_tool(argv, secrets, 1, &err);
        }
        if (r != 0) {
                (void) unlink(tmp);
                if (r < 0)
                        return r;
                return nkp_fail(-EIO, "qemu-img could not convert '%s': %s. Nothing was changed.",
                                path, err && err[0] ? err : "no detail");
        }
        g_clear_pointer(&err, g_free);
        const char *cmp[] = { "qemu-img", "compare", "-q", "--object",
                              "secret,id=s0,file=/dev/fd/3,format=raw", "--image-opts",
                              src_opts, dst_opts, NULL };
        r = run_tool(cmp, secrets, 1, &err);
        if (r != 0) {
                (void) unlink(tmp);
                if (r < 0)
                        return r;
                return nkp_fail(-EIO, "The converted copy of '%s' differs from it (qemu-img "
                                      "compare: %s); it was removed and nothing was changed.",
                                path, err && err[0] ? err : "differs");
        }
        /* Same owner and mode as the original, and on disk before the swap. */
        struct stat st;
        int fd = open(tmp, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || stat(path, &st) < 0 || fchmod(fd, st.st_mode & 07777) < 0 ||
            fchown(fd, st.st_uid, st.st_gid) < 0 || fsync(fd) < 0) {
                int e = errno;
                if (fd >= 0)
                        close(fd);
                (void) unlink(tmp);
                return nkp_fail(-e, "Cannot finish the converted copy of '%s': %s.", path,
                                g_strerror(e));
        }
        close(fd);
        return 0;
}

static void fsync_dir_of(const char *path)
{
        g_autofree char *dir = g_path_get_dirname(path);
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0) {
                (void) fsync(fd);
                close(fd);
        }
}

/* P → P.nkp-old, P.nkp-new → P. */
static int swap_in(const char *path)
{
        g_autofree char *tmp = g_strconcat(path, ".nkp-new", NULL);
        g_autofree char *old = g_strconcat(path, ".nkp-old", NULL);
        if (rename(path, old) < 0)
                return nkp_fail(-errno, "Cannot rename '%s': %s.", path, g_strerror(errno));
        if (rename(tmp, path) < 0) {
                int e = errno;
                (void) rename(old, path);
                return nkp_fail(-e, "Cannot rename '%s': %s.", tmp, g_strerror(e));
        }
        fsync_dir_of(path);
        return 0;
}

static void swap_back(const char *path)
{
        g_autofree char *old = g_strconcat(path, ".nkp-old", NULL);
        g_autofree char *tmp = g_strconcat(path, ".nkp-new", NULL);
        (void) rename(path, tmp);
        (void) rename(old, path);
        (void) unlink(tmp);
        fsync_dir_of(path);
}

static void drop_old(const char *path)
{
        g_autofree char *old = g_strconcat(path, ".nkp-old", NULL);
        (void) unlink(old);
        fsync_dir_of(path);
}

/* ---- encrypt ------------------------------------------------------------ */

static bool disk_is_candidate(const NkpDomainDisk *disk)
{
        return disk->target && g_strcmp0(disk->device, "disk") == 0 &&
               g_strcmp0(disk->type, "file") == 0 && disk->source_file &&
               g_strcmp0(disk->driver_type, "qcow2") == 0 && !disk->encryption_format;
}

static int pick_provider(NkpctlGlobals *g, const char *name, nkp_provider **ret)
{
        if (name) {
                int r = nkp_provider_get(g->ctx, name, ret);
                if (r == -ENOENT)
                        return nkp_fail(r, "There is no provider '%s' on this host (see: nkpctl "
                                           "provider list).",
                                        name);
                return r;
        }
        nkp_provider **list = NULL;
        size_t n = 0;
        int r = nkp_provider_list(g->ctx, &list, &n);
        if (r < 0)
                return r;
        nkp_provider *found = NULL;
        for (size_t i = 0; i < n; i++)
                if (nkp_provider_flags(list[i]) & NKP_PROVIDER_DEFAULT) {
                        found = list[i];
                        list[i] = NULL;
                        break;
                }
        nkp_provider_list_free(list, n);
        if (!found)
                return nkp_fail(-ENOENT, "No default provider on this host: name one with "
                                         "--provider NAME, or set one: nkpctl provider "
                                         "set-default NAME.");
        *ret = found;
        return 0;
}

typedef struct {
        char *target;
        char *path;
        char *secret_uuid;
        nkp_secret *value;
        bool swapped;
} DiskJob;

static void disk_job_free(gpointer p)
{
        DiskJob *j = p;
        g_free(j->target);
        g_free(j->path);
        g_free(j->secret_uuid);
        nkp_secret_free(j->value);
        g_free(j);
}

static int parse_disks(const NkpDomain *d, const char *spec, GPtrArray *jobs)
{
        bool all = !spec || strcmp(spec, "all") == 0;
        g_auto(GStrv) names = all ? NULL : g_strsplit(spec, ",", -1);
        if (all) {
                for (guint i = 0; i < d->disks->len; i++) {
                        const NkpDomainDisk *disk = d->disks->pdata[i];
                        if (!disk_is_candidate(disk)) {
                                if (g_strcmp0(disk->device, "disk") == 0 && disk->target &&
                                    !disk->encryption_format)
                                        fprintf(stderr,
                                                "nkpctl: note: disk '%s' of '%s' stays as it is "
                                                "(only file-backed qcow2 disks are encrypted).\n",
                                                disk->target, d->name);
                                continue;
                        }
                        DiskJob *j = g_new0(DiskJob, 1);
                        j->target = g_strdup(disk->target);
                        j->path = g_strdup(disk->source_file);
                        g_ptr_array_add(jobs, j);
                }
                return 0;
        }
        for (char **n = names; *n; n++) {
                if (!(*n)[0])
                        continue;
                const NkpDomainDisk *disk = nkp_domain_find_disk(d, *n);
                if (!disk)
                        return nkp_fail(-ENOENT, "VM '%s' has no disk '%s'.", d->name, *n);
                if (disk->encryption_format)
                        return nkp_fail(-EEXIST, "Disk '%s' of VM '%s' is already encrypted "
                                                 "(format '%s').",
                                        *n, d->name, disk->encryption_format);
                if (!disk_is_candidate(disk))
                        return nkp_fail(-EOPNOTSUPP,
                                        "Disk '%s' of VM '%s' is not a file-backed qcow2 disk; "
                                        "nkp encrypts qcow2 files only (convert it first: "
                                        "qemu-img convert -O qcow2).",
                                        *n, d->name);
                DiskJob *j = g_new0(DiskJob, 1);
                j->target = g_strdup(disk->target);
                j->path = g_strdup(disk->source_file);
                g_ptr_array_add(jobs, j);
        }
        return 0;
}

static int require_shut_off(NkpVirt *v, const char *name)
{
        int r = nkp_virt_domain_is_active(v, name);
        if (r < 0)
                return r;
        if (r > 0)
                return nkp_fail(-EBUSY, "VM '%s' is running; shut it down first (virsh shutdown "
                                        "'%s').",
                                name, name);
        return 0;
}

static int vm_encrypt(NkpctlGlobals *g, const char *name, const char *provider_name,
                      const char *disks)
{
        g_autoptr(NkpVirt) v = NULL;
        int r = open_virt(g, &v);
        if (r < 0)
                return nkpctl_lib_error();
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        if (load_domain(v, name, &xml, &d) < 0 || require_shut_off(v, name) < 0)
                return nkpctl_lib_error();
        deadline_disarm();
        if (d->keysafe)
                return nkpctl_error("VM '%s' is already encrypted by provider '%s'; to move it, "
                                    "use: nkpctl vm rekey '%s' --provider NAME.",
                                    name, nkp_keysafe_provider_name(d->keysafe), name);

        g_autoptr(nkp_provider) p = NULL;
        if (pick_provider(g, provider_name, &p) < 0)
                return nkpctl_lib_error();
        if (!nkp_provider_is_active(p))
                return nkpctl_error("Provider '%s' was never backed up, so it cannot protect VMs "
                                    "yet: nkpctl provider backup '%s' --out FILE.p12.",
                                    nkp_provider_name(p), nkp_provider_name(p));

        /* What to protect. */
        bool do_vtpm = false;
        if (d->has_vtpm) {
                if (d->tpm_secret)
                        return nkpctl_error("The vTPM of VM '%s' is already encrypted with the "
                                            "libvirt secret '%s', which nkp does not manage; "
                                            "nothing was changed.",
                                            name, d->tpm_secret);
                enum vtpm_state st = vtpm_state(d);
                if (st != VTPM_NONE) {
                        g_autofree char *f = vtpm_state_file(d);
                        return nkpctl_error(
                                "The vTPM of VM '%s' already has %s state ('%s'); converting "
                                "existing vTPM state is not supported yet, so nothing was "
                                "changed. Enrol VMs before their first start.",
                                name, st == VTPM_CLEAR ? "clear" : "unreadable", f);
                }
                do_vtpm = true;
        }
        g_autoptr(GPtrArray) jobs = g_ptr_array_new_with_free_func(disk_job_free);
        if (parse_disks(d, disks, jobs) < 0)
                return nkpctl_lib_error();
        if (!do_vtpm && jobs->len == 0)
                return nkpctl_error("VM '%s' has neither an emulated vTPM nor a qcow2 disk to "
                                    "encrypt; nothing was changed.",
                                    name);

        /* Keys and keysafe. */
        g_autoptr(nkp_secret) kdk = NULL, kek = NULL;
        g_autoptr(nkp_keysafe) ks = NULL;
        if (nkp_provider_get_kdk(g->ctx, nkp_provider_key_id(p), &kdk) < 0 ||
            nkp_keysafe_new(d->uuid, p, &ks) < 0 ||
            nkp_kek_derive(kdk, nkp_keysafe_kek_salt(ks), nkp_provider_key_id(p), d->uuid,
                           &kek) < 0)
                return nkpctl_lib_error();
        char vtpm_uuid[NKP_UUID_STRING_LEN + 1] = "";
        if (do_vtpm) {
                g_autoptr(nkp_secret) dek = NULL;
                nkp_uuid_random(vtpm_uuid);
                if (nkp_secret_new_random(NKP_DEK_SIZE, &dek) < 0 ||
                    nkp_keysafe_put_dek(ks, kek, NKP_OBJECT_VTPM, "vtpm", vtpm_uuid, dek) < 0)
                        return nkpctl_lib_error();
        }
        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                g_autoptr(nkp_secret) dek = NULL;
                j->secret_uuid = g_malloc(NKP_UUID_STRING_LEN + 1);
                nkp_uuid_random(j->secret_uuid);
                if (nkp_secret_new_random(NKP_DEK_SIZE, &dek) < 0 ||
                    nkp_keysafe_put_dek(ks, kek, NKP_OBJECT_DISK, j->target, j->secret_uuid,
                                        dek) < 0 ||
                    nkp_secret_value_from_dek(dek, &j->value) < 0)
                        return nkpctl_lib_error();
        }

        /* The new definition, built before anything on disk changes. */
        g_autofree char *ksxml = NULL;
        g_autoptr(NkpDomainEdit) e = NULL;
        if (nkp_keysafe_format(ks, &ksxml) < 0 || nkp_domain_edit_new(xml, strlen(xml), &e) < 0 ||
            nkp_domain_edit_set_keysafe(e, ksxml) < 0 ||
            (do_vtpm && nkp_domain_edit_set_vtpm_secret(e, vtpm_uuid) < 0))
                return nkpctl_lib_error();
        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                if (nkp_domain_edit_set_disk_luks(e, j->target, j->secret_uuid) < 0)
                        return nkpctl_lib_error();
        }
        g_autofree char *newxml = NULL;
        if (nkp_domain_edit_format(e, &newxml) < 0)
                return nkpctl_lib_error();

        /* Convert every disk (originals untouched), then swap, then define. */
        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                if (convert_disk(j->path, j->value, NULL) < 0) {
                        for (guint k = 0; k < i; k++) {
                                g_autofree char *tmp =
                                        g_strconcat(((DiskJob *) jobs->pdata[k])->path,
                                                    ".nkp-new", NULL);
                                (void) unlink(tmp);
                        }
                        return nkpctl_lib_error();
                }
        }
        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                if (swap_in(j->path) < 0) {
                        for (guint k = 0; k < i; k++)
                                swap_back(((DiskJob *) jobs->pdata[k])->path);
                        return nkpctl_lib_error();
                }
                j->swapped = true;
        }
        deadline_arm();
        if (nkp_virt_domain_define(v, newxml) < 0) {
                g_autofree char *msg = g_strdup(nkp_error_message());
                for (guint i = 0; i < jobs->len; i++)
                        swap_back(((DiskJob *) jobs->pdata[i])->path);
                return nkpctl_error("%s Nothing was changed.", msg);
        }
        deadline_disarm();
        for (guint i = 0; i < jobs->len; i++)
                drop_old(((DiskJob *) jobs->pdata[i])->path);

        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, name);
                json_builder_set_member_name(b, "provider");
                json_builder_add_string_value(b, nkp_provider_name(p));
                json_builder_set_member_name(b, "vtpm");
                json_builder_add_boolean_value(b, do_vtpm);
                json_builder_set_member_name(b, "disks");
                json_builder_begin_array(b);
                for (guint i = 0; i < jobs->len; i++)
                        json_builder_add_string_value(b, ((DiskJob *) jobs->pdata[i])->target);
                json_builder_end_array(b);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                GString *what = g_string_new(do_vtpm ? "vTPM" : "");
                for (guint i = 0; i < jobs->len; i++)
                        g_string_append_printf(what, "%s%s", what->len ? ", " : "",
                                               ((DiskJob *) jobs->pdata[i])->target);
                printf("VM '%s' is encrypted by provider '%s' (%s).\n", name,
                       nkp_provider_name(p), what->str);
                g_string_free(what, TRUE);
        }
        return 0;
}

/* ---- decrypt ------------------------------------------------------------ */

static int vm_decrypt(NkpctlGlobals *g, const char *name)
{
        g_autoptr(NkpVirt) v = NULL;
        if (open_virt(g, &v) < 0)
                return nkpctl_lib_error();
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        if (load_domain(v, name, &xml, &d) < 0 || require_shut_off(v, name) < 0)
                return nkpctl_lib_error();
        deadline_disarm();
        if (!d->keysafe)
                return nkpctl_error("VM '%s' is not encrypted by nkp; nothing to do.", name);

        g_autoptr(GPtrArray) secrets = NULL;
        if (nkp_vm_unlock(g->ctx, d, true, &secrets) < 0)
                return nkpctl_lib_error();

        bool has_vtpm_entry = false;
        g_autoptr(GPtrArray) jobs = g_ptr_array_new_with_free_func(disk_job_free);
        for (guint i = 0; i < secrets->len; i++) {
                NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_VTPM) == 0) {
                        has_vtpm_entry = true;
                        continue;
                }
                const NkpDomainDisk *disk = nkp_domain_find_disk(d, s->object_id);
                if (!disk || !disk->encryption_format)
                        continue; /* detached, or never converted: nothing to undo */
                if (!disk->source_file)
                        return nkpctl_error("Disk '%s' of VM '%s' has no file path.",
                                            s->object_id, name);
                DiskJob *j = g_new0(DiskJob, 1);
                j->target = g_strdup(s->object_id);
                j->path = g_strdup(disk->source_file);
                j->value = g_steal_pointer(&s->value);
                g_ptr_array_add(jobs, j);
        }
        if (has_vtpm_entry && d->has_vtpm) {
                enum vtpm_state st = vtpm_state(d);
                if (st != VTPM_NONE) {
                        g_autofree char *f = vtpm_state_file(d);
                        return nkpctl_error(
                                "The vTPM of VM '%s' has encrypted state ('%s'); converting it "
                                "back to clear state is not supported yet, so nothing was "
                                "changed.",
                                name, f);
                }
        }

        g_autoptr(NkpDomainEdit) e = NULL;
        if (nkp_domain_edit_new(xml, strlen(xml), &e) < 0 ||
            nkp_domain_edit_set_keysafe(e, NULL) < 0)
                return nkpctl_lib_error();
        if (has_vtpm_entry && d->has_vtpm && nkp_domain_edit_set_vtpm_secret(e, NULL) < 0)
                return nkpctl_lib_error();
        for (guint i = 0; i < jobs->len; i++)
                if (nkp_domain_edit_set_disk_luks(e, ((DiskJob *) jobs->pdata[i])->target,
                                                  NULL) < 0)
                        return nkpctl_lib_error();
        g_autofree char *newxml = NULL;
        if (nkp_domain_edit_format(e, &newxml) < 0)
                return nkpctl_lib_error();

        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                if (convert_disk(j->path, NULL, j->value) < 0) {
                        for (guint k = 0; k < i; k++) {
                                g_autofree char *tmp =
                                        g_strconcat(((DiskJob *) jobs->pdata[k])->path,
                                                    ".nkp-new", NULL);
                                (void) unlink(tmp);
                        }
                        return nkpctl_lib_error();
                }
        }
        for (guint i = 0; i < jobs->len; i++) {
                if (swap_in(((DiskJob *) jobs->pdata[i])->path) < 0) {
                        for (guint k = 0; k < i; k++)
                                swap_back(((DiskJob *) jobs->pdata[k])->path);
                        return nkpctl_lib_error();
                }
        }
        deadline_arm();
        if (nkp_virt_domain_define(v, newxml) < 0) {
                g_autofree char *msg = g_strdup(nkp_error_message());
                for (guint i = 0; i < jobs->len; i++)
                        swap_back(((DiskJob *) jobs->pdata[i])->path);
                return nkpctl_error("%s Nothing was changed.", msg);
        }
        /* Its secrets, if a start left any behind. */
        for (guint i = 0; i < secrets->len; i++)
                (void) nkp_virt_secret_undefine(v, ((NkpVmSecret *) secrets->pdata[i])->secret_uuid);
        deadline_disarm();
        for (guint i = 0; i < jobs->len; i++)
                drop_old(((DiskJob *) jobs->pdata[i])->path);
        nkp_alarm_clear(g->ctx, "vm-locked", name);
        if (!g->json)
                printf("VM '%s' is no longer encrypted by nkp.\n", name);
        else {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, name);
                json_builder_set_member_name(b, "state");
                json_builder_add_string_value(b, "plain");
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        }
        return 0;
}

/* ---- status / list ------------------------------------------------------ */

typedef struct {
        char *name;
        char *uuid;
        const char *state; /* "plain", "encrypted", "locked", "error" */
        char *provider;
        char *key_id;
        char *reason;
        bool running;
        GPtrArray *objects; /* "kind:id" */
} VmStatus;

static void vm_status_clear(VmStatus *s)
{
        g_free(s->name);
        g_free(s->uuid);
        g_free(s->provider);
        g_free(s->key_id);
        g_free(s->reason);
        if (s->objects)
                g_ptr_array_unref(s->objects);
}

static void status_of(NkpctlGlobals *g, NkpVirt *v, const char *name, VmStatus *s)
{
        g_autoptr(NkpDomain) d = NULL;
        s->name = g_strdup(name);
        s->objects = g_ptr_array_new_with_free_func(g_free);
        if (load_domain(v, name, NULL, &d) < 0) {
                s->state = "error";
                s->reason = g_strdup(nkp_error_message());
                return;
        }
        s->uuid = g_strdup(d->uuid);
        s->running = nkp_virt_domain_is_active(v, name) > 0;
        if (!d->keysafe) {
                s->state = "plain";
                return;
        }
        s->provider = g_strdup(nkp_keysafe_provider_name(d->keysafe));
        s->key_id = g_strdup(nkp_keysafe_provider_key_id(d->keysafe));
        for (size_t i = 0; i < nkp_keysafe_n_entries(d->keysafe); i++)
                g_ptr_array_add(s->objects,
                                g_strdup_printf("%s:%s", nkp_keysafe_entry_kind(d->keysafe, i),
                                                nkp_keysafe_entry_id(d->keysafe, i)));
        if (nkp_vm_unlock(g->ctx, d, false, NULL) < 0) {
                s->state = "locked";
                s->reason = g_strdup(nkp_error_message());
        } else {
                s->state = "encrypted";
        }
}

static void add_str(JsonBuilder *b, const char *member, const char *value)
{
        json_builder_set_member_name(b, member);
        if (value)
                json_builder_add_string_value(b, value);
        else
                json_builder_add_null_value(b);
}

static void status_json(JsonBuilder *b, const VmStatus *s)
{
        json_builder_begin_object(b);
        add_str(b, "name", s->name);
        add_str(b, "uuid", s->uuid);
        add_str(b, "state", s->state);
        json_builder_set_member_name(b, "running");
        json_builder_add_boolean_value(b, s->running);
        add_str(b, "provider", s->provider);
        add_str(b, "key_id", s->key_id);
        add_str(b, "reason", s->reason);
        json_builder_set_member_name(b, "objects");
        json_builder_begin_array(b);
        for (guint i = 0; s->objects && i < s->objects->len; i++)
                json_builder_add_string_value(b, s->objects->pdata[i]);
        json_builder_end_array(b);
        json_builder_end_object(b);
}

static void status_line(const VmStatus *s)
{
        if (strcmp(s->state, "encrypted") == 0) {
                g_autofree char *objs = NULL;
                g_ptr_array_add(s->objects, NULL);
                objs = g_strjoinv(", ", (char **) s->objects->pdata);
                g_ptr_array_remove_index(s->objects, s->objects->len - 1);
                printf("%s: encrypted by %s (%s)\n", s->name, s->provider, objs);
        } else if (strcmp(s->state, "locked") == 0)
                printf("%s: locked: %s\n", s->name, s->reason);
        else if (strcmp(s->state, "plain") == 0)
                printf("%s: plain\n", s->name);
        else
                printf("%s: error: %s\n", s->name, s->reason);
}

static int vm_status(NkpctlGlobals *g, const char *name)
{
        g_autoptr(NkpVirt) v = NULL;
        if (open_virt(g, &v) < 0)
                return nkpctl_lib_error();
        VmStatus s = { 0 };
        status_of(g, v, name, &s);
        int rc = strcmp(s.state, "error") == 0 ? nkpctl_error("%s", s.reason) : 0;
        if (rc == 0) {
                if (g->json) {
                        g_autoptr(JsonBuilder) b = json_builder_new();
                        status_json(b, &s);
                        nkpctl_print_json(json_builder_get_root(b));
                } else {
                        status_line(&s);
                }
        }
        vm_status_clear(&s);
        return rc;
}

static int vm_list(NkpctlGlobals *g)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(GPtrArray) names = NULL;
        if (open_virt(g, &v) < 0 || nkp_virt_domain_list(v, &names) < 0)
                return nkpctl_lib_error();
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_array(b);
        for (guint i = 0; i < names->len; i++) {
                VmStatus s = { 0 };
                status_of(g, v, names->pdata[i], &s);
                if (g->json)
                        status_json(b, &s);
                else
                        status_line(&s);
                vm_status_clear(&s);
        }
        json_builder_end_array(b);
        if (g->json)
                nkpctl_print_json(json_builder_get_root(b));
        return 0;
}

/* ---- entry points ------------------------------------------------------- */

static const char vm_usage[] =
        "Usage: nkpctl vm encrypt DOMAIN [--provider NAME] [--disks all|vda,vdb…]\n"
        "       nkpctl vm decrypt DOMAIN\n"
        "       nkpctl vm status DOMAIN | nkpctl vm list\n";

int nkpctl_vm(NkpctlGlobals *g, int argc, char **argv)
{
        if (argc < 2) {
                fputs(vm_usage, stderr);
                return 2;
        }
        const char *cmd = argv[1];
        if (strcmp(cmd, "list") == 0 && argc == 2)
                return vm_list(g);
        if (strcmp(cmd, "status") == 0 && argc == 3)
                return vm_status(g, argv[2]);
        if (strcmp(cmd, "decrypt") == 0 && argc == 3)
                return vm_decrypt(g, argv[2]);
        if (strcmp(cmd, "encrypt") == 0 && argc >= 3) {
                const char *provider = NULL, *disks = NULL, *domain = NULL;
                for (int i = 2; i < argc; i++) {
                        if (strcmp(argv[i], "--provider") == 0 && i + 1 < argc)
                                provider = argv[++i];
                        else if (g_str_has_prefix(argv[i], "--provider="))
                                provider = argv[i] + strlen("--provider=");
                        else if (strcmp(argv[i], "--disks") == 0 && i + 1 < argc)
                                disks = argv[++i];
                        else if (g_str_has_prefix(argv[i], "--disks="))
                                disks = argv[i] + strlen("--disks=");
                        else if (argv[i][0] != '-' && !domain)
                                domain = argv[i];
                        else {
                                fputs(vm_usage, stderr);
                                return nkpctl_error("unknown or incomplete option '%s'.",
                                                    argv[i]);
                        }
                }
                if (!domain) {
                        fputs(vm_usage, stderr);
                        return 2;
                }
                return vm_encrypt(g, domain, provider, disks);
        }
        if (strcmp(cmd, "rekey") == 0)
                return nkpctl_error("'vm rekey' is not implemented yet.");
        fputs(vm_usage, stderr);
        return nkpctl_error("unknown vm command '%s'.", cmd);
}

int nkpctl_vms_using_provider(NkpctlGlobals *g, const char *key_id, GPtrArray **ret_names)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(GPtrArray) names = NULL;
        if (open_virt(g, &v) < 0 || nkp_virt_domain_list(v, &names) < 0)
                return nkp_fail_prefix(-ECONNREFUSED, "Cannot tell which VMs use the provider");
        g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(g_free);
        for (guint i = 0; i < names->len; i++) {
                g_autoptr(NkpDomain) d = NULL;
                int r = load_domain(v, names->pdata[i], NULL, &d);
                if (r == -ENOENT)
                        continue; /* undefined meanwhile */
                if (r < 0) {
                        /* A VM whose nkp data is damaged may use it: count it. */
                        g_autofree char *xml = NULL;
                        if (nkp_virt_domain_xml(v, names->pdata[i], true, &xml) == 0 &&
                            strstr(xml, key_id))
                                g_ptr_array_add(out, g_strdup(names->pdata[i]));
                        continue;
                }
                if (d->keysafe &&
                    g_ascii_strcasecmp(nkp_keysafe_provider_key_id(d->keysafe), key_id) == 0)
                        g_ptr_array_add(out, g_strdup(names->pdata[i]));
        }
        deadline_disarm();
        *ret_names = g_steal_pointer(&out);
        return 0;
}

int nkpctl_host_unlock(NkpctlGlobals *g)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(GPtrArray) names = NULL;
        if (open_virt(g, &v) < 0 || nkp_virt_domain_list(v, &names) < 0)
                return nkpctl_lib_error();
        unsigned unlocked = 0, still = 0;
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_array(b);
        for (guint i = 0; i < names->len; i++) {
                VmStatus s = { 0 };
                status_of(g, v, names->pdata[i], &s);
                if (strcmp(s.state, "encrypted") == 0) {
                        nkp_alarm_clear(g->ctx, "vm-locked", s.name);
                        unlocked++;
                        if (!g->json)
                                printf("%s: unlocked (provider '%s')\n", s.name, s.provider);
                } else if (strcmp(s.state, "locked") == 0) {
                        still++;
                        if (!g->json)
                                printf("%s: still locked: %s\n", s.name, s.reason);
                }
                if (g->json && strcmp(s.state, "plain") != 0)
                        status_json(b, &s);
                vm_status_clear(&s);
        }
        json_builder_end_array(b);
        deadline_disarm();
        if (g->json)
                nkpctl_print_json(json_builder_get_root(b));
        else if (unlocked + still == 0)
                printf("No VM on this host is encrypted by nkp.\n");
        if (still)
                return nkpctl_error("%u VM(s) are still locked: restore their providers (nkpctl "
                                    "provider restore FILE.p12), then run nkpctl host unlock "
                                    "again.",
                                    still);
        return 0;
}

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm …: enrolling VMs (encrypt/decrypt), deep rekey, their status,
 * crash recovery, and the cross-VM helpers (provider usage, host unlock).
 *
 *   vm encrypt DOMAIN [--provider NAME] [--disks all|vda,vdb…]
 *   vm decrypt DOMAIN
 *   vm rekey DOMAIN --deep [--provider NAME]   (parsed in cmd-rekey.c)
 *   vm status DOMAIN | vm list
 *
 * encrypt, on a shut-off domain:
 *  1. provider = --provider or the default; it must be active (backed up).
 *  2. a DEK per object (the emulated vTPM, each chosen disk), a keysafe
 *     (fresh KEK salt) holding them wrapped, a random secret UUID each.
 *  3. each chosen plain qcow2 P is converted to a LUKS qcow2 P.nkp-new with
 *     `qemu-img convert` (passphrase = hex(DEK) through a pipe, /dev/fd/N,
 *     never argv or a file; encrypt.iter-time=10: the key has full entropy,
 *     stretching it buys nothing and would cost ~2 s at every start;
 *     encrypt.hash-alg=sha512: see LUKS_CREATE_OPTIONS), then
 *     checked with `qemu-img compare` against P.  Free space is checked
 *     first (allocated size of each P + 5% + 16 MiB) and refused cleanly.
 *  4. the files are swapped and the new definition defined under the
 *     conversion protocol (convert_and_switch, journal.c,
 *     docs/crash-safety.md): a kill -9 at any instant leaves a VM that
 *     starts, under the old keys or the new.
 *  decrypt is the same the other way round (keys from the keysafe); deep
 *  rekey goes from the old keys to new ones (LUKS to LUKS, both keys on
 *  pipes), with a new keysafe and new secret UUIDs.
 *
 * The vTPM: with no state yet (never started) it is enrolled by the XML
 * alone; libvirt hands the secret to swtpm_setup/swtpm at the first start,
 * so no clear state is ever written.  A vTPM that has state is converted
 * through swtpm's state-blob interface (see vtpm_convert), put beside the
 * state file as <file>.nkp-new and swapped in with the disks, all or
 * nothing.
 *
 * Every one of these commands holds the VM's lock from start to end, and
 * first finishes or rolls back an operation a crash interrupted.
 *
 * Exit 0 on success; one line on stderr otherwise.  libvirt calls run under
 * a deadline (nkp_virt_open, 60 s): libvirt has no per-call timeout. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <gio/gio.h>

#include "nkpctl.h"

static int open_virt(NkpctlGlobals *g, NkpVirt **ret)
{
        return nkp_virt_open(g->connect_uri, NKPCTL_LIBVIRT_DEADLINE, ret);
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

/* A tool must not outlive nkpctl: killed, nkpctl leaves a journal that the
 * next run (or the hook) reconciles, and a qemu-img still writing the
 * unlinked copy would only waste the disk. */
static void die_with_parent(gpointer data)
{
        (void) data;
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
}

/* Runs argv with `secrets[i]` readable on fd 3+i (a pipe filled before the
 * program starts; the value is never in argv, the environment or a file).
 * stdout is discarded; stderr is returned in *ret_err (first line). */
static int run_tool(const char *const *argv, nkp_secret *const *secrets, size_t n_secrets,
                    char **ret_err)
{
        g_autoptr(GSubprocessLauncher) l =
                g_subprocess_launcher_new(G_SUBPROCESS_FLAGS_STDOUT_SILENCE |
                                          G_SUBPROCESS_FLAGS_STDERR_PIPE);
        g_subprocess_launcher_set_child_setup(l, die_with_parent, NULL, NULL);
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
        int status = g_subprocess_get_if_exited(sp) ? g_subprocess_get_exit_status(sp) : 128;
        if (ret_err) {
                g_autofree char *e = g_strstrip(g_strdup(err ? err : ""));
                char *nl = strchr(e, '\n');
                if (nl)
                        *nl = '\0';
                *ret_err = g_steal_pointer(&e);
        }
        return status;
}

/* The new copies of every disk need, together, per file system: the
 * allocated size of each + 5% + 16 MiB.  Checked before anything is written.
 * NKP_TEST_FREE_SPACE (bytes) stands in for the free space (tests). */
static int check_space(GPtrArray *paths)
{
        g_autoptr(GHashTable) need_by_fs = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                                                 g_free, g_free);
        for (guint i = 0; i < paths->len; i++) {
                const char *path = paths->pdata[i];
                struct stat st;
                if (stat(path, &st) < 0)
                        return nkp_fail(-errno, "Cannot read the disk '%s': %s. Nothing was "
                                                "changed.",
                                        path, g_strerror(errno));
                g_autofree char *dir = g_path_get_dirname(path);
                struct statvfs vfs;
                if (statvfs(dir, &vfs) < 0)
                        return nkp_fail(-errno, "Cannot check the free space in '%s': %s.", dir,
                                        g_strerror(errno));
                guint64 one = (guint64) st.st_blocks * 512;
                one += one / 20 + 16 * 1024 * 1024;
                gint64 fs = (gint64) st.st_dev;
                guint64 *sum = g_hash_table_lookup(need_by_fs, &fs);
                if (!sum) {
                        sum = g_new0(guint64, 1);
                        g_hash_table_insert(need_by_fs, g_memdup2(&fs, sizeof fs), sum);
                }
                *sum += one;
                guint64 have = (guint64) vfs.f_bavail * vfs.f_frsize;
                if (g_getenv("NKP_TEST_FREE_SPACE"))
                        have = g_ascii_strtoull(g_getenv("NKP_TEST_FREE_SPACE"), NULL, 10);
                if (have < *sum)
                        return nkp_fail(-ENOSPC,
                                        "Not enough space in '%s' to convert '%s': %" G_GUINT64_FORMAT
                                        " MiB free, %" G_GUINT64_FORMAT " MiB needed (a full "
                                        "copy). Free some space and run the command again; "
                                        "nothing was changed.",
                                        dir, path, have >> 20, (*sum >> 20) + 1);
        }
        return 0;
}

/* QEMU 7.2 sizes LUKS PBKDF2 iterations by timing 2^15 of them with the
 * thread's CPU time (getrusage), and fails with "Unable to get accurate CPU
 * usage" when that reads 0 ms.  Where CPU time is accounted in ticks (4 ms
 * here) and 2^15 HMAC-SHA256 rounds take less, that was most creations
 * (21 of 30 in one measurement).  SHA-512 rounds are slower: 0 of 30 in the
 * same minute.  The hash only derives the key slot from a full-entropy
 * passphrase, so SHA-512 costs nothing in strength.  Left-over failures are
 * retried with a growing pause (the tick may be busy for a while). */
#define LUKS_CREATE_OPTIONS \
        "encrypt.format=luks,encrypt.key-secret=snew,encrypt.iter-time=10,encrypt.hash-alg=sha512"
#define LUKS_CREATE_ATTEMPTS 6

/* Converts `path` into `path`.nkp-new: from LUKS under `old_value` (or
 * plain when NULL) to LUKS under `new_value` (or plain when NULL), then
 * compares the two images (`qemu-img compare` opens both, each with its
 * own key).  Encrypt: (NULL, new); decrypt: (old, NULL); deep rekey: both. */
static int convert_disk(const char *path, const nkp_secret *old_value, const nkp_secret *new_value)
{
        g_autofree char *tmp = g_strconcat(path, ".nkp-new", NULL);
        g_autofree char *err = NULL;
        (void) unlink(tmp); /* a leftover of an interrupted run */

        nkp_secret *secrets[2];
        size_t n = 0;
        const char *argv[24];
        int a = 0;
        g_autofree char *old_obj = NULL, *new_obj = NULL;
        argv[a++] = "qemu-img";
        argv[a++] = "convert";
        argv[a++] = "-q";
        if (old_value) {
                old_obj = g_strdup_printf("secret,id=sold,file=/dev/fd/%zu,format=raw", 3 + n);
                secrets[n++] = (nkp_secret *) old_value;
        }
        if (new_value) {
                new_obj = g_strdup_printf("secret,id=snew,file=/dev/fd/%zu,format=raw", 3 + n);
                secrets[n++] = (nkp_secret *) new_value;
        }
        g_autofree char *src_opts = g_strdup_printf(
                "driver=qcow2,file.filename=%s%s", path, old_value ? ",encrypt.key-secret=sold" : "");
        g_autofree char *dst_opts = g_strdup_printf(
                "driver=qcow2,file.filename=%s%s", tmp, new_value ? ",encrypt.key-secret=snew" : "");
        int objects_at = a;
        if (old_obj) {
                argv[a++] = "--object";
                argv[a++] = old_obj;
        }
        if (new_obj) {
                argv[a++] = "--object";
                argv[a++] = new_obj;
        }
        int objects_end = a;
        argv[a++] = "--image-opts";
        argv[a++] = src_opts;
        argv[a++] = "-O";
        argv[a++] = "qcow2";
        if (new_value) {
                /* encrypt.iter-time=10: the key has full entropy, stretching
                 * it buys nothing and would cost ~2 s at every start. */
                argv[a++] = "-o";
                argv[a++] = LUKS_CREATE_OPTIONS;
        }
        argv[a++] = tmp;
        argv[a] = NULL;
        int r = 0;
        for (int attempt = 0; attempt < LUKS_CREATE_ATTEMPTS; attempt++) {
                if (attempt > 0)
                        g_usleep((gulong) (100000 << attempt)); /* 0.2 s, 0.4 s … 3.2 s */
                g_clear_pointer(&err, g_free);
                (void) unlink(tmp);
                r = run_tool(argv, secrets, n, &err);
                if (r == 0 || !new_value || !err || !strstr(err, "accurate CPU usage"))
                        break;
        }
        if (r != 0) {
                (void) unlink(tmp);
                if (r < 0)
                        return r;
                return nkp_fail(-EIO, "qemu-img could not convert '%s': %s. Nothing was changed.",
                                path, err && err[0] ? err : "no detail");
        }
        nkp_test_crash_point("disk-copied");
        g_clear_pointer(&err, g_free);
        const char *cmp[16];
        int c = 0;
        cmp[c++] = "qemu-img";
        cmp[c++] = "compare";
        cmp[c++] = "-q";
        for (int i = objects_at; i < objects_end; i++)
                cmp[c++] = argv[i];
        cmp[c++] = "--image-opts";
        cmp[c++] = src_opts;
        cmp[c++] = dst_opts;
        cmp[c] = NULL;
        r = run_tool(cmp, secrets, n, &err);
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

/* ---- converting vTPM state (clear <-> encrypted) -------------------------- */
/* swtpm assumes every state file is encrypted once it is given a key, so a
 * clear state cannot simply be opened with one.  The state is moved through
 * swtpm's own state-blob interface instead (all in a 0700 work directory
 * beside the state, <swtpm>/<uuid>/.nkp-work):
 *   A: swtpm on the current state (old key or none), not-need-init;
 *      swtpm_ioctl --save permanent → the decrypted blob
 *   B: swtpm on an empty dir with the new key (or none);
 *      swtpm_ioctl --load permanent, --init, --shutdown → B writes the state
 *      under the new key
 *   C: swtpm on B's dir with the new key, not-need-init; --save must work
 *      (proves that the new state opens under the new key)
 * The decrypted blob is removed as soon as B has it; the work directory is
 * removed at the end.  The current state is only replaced (rename) once the
 * new one is complete and verified, and put back if the define fails. */

static char *vtpm_state_dir(const NkpDomain *d)
{
        g_autofree char *f = vtpm_state_file(d);
        return g_path_get_dirname(f);
}

static char *vtpm_work_dir(const NkpDomain *d)
{
        g_autofree char *dir = vtpm_state_dir(d);
        g_autofree char *parent = g_path_get_dirname(dir);
        return g_build_filename(parent, NKP_JOURNAL_SCRATCH_NAME, NULL);
}

static int run_quiet(const char *const *argv, const nkp_secret *key)
{
        g_autoptr(GSubprocessLauncher) l = g_subprocess_launcher_new(
                G_SUBPROCESS_FLAGS_STDOUT_SILENCE | G_SUBPROCESS_FLAGS_STDERR_SILENCE);
        if (key) {
                int p[2];
                if (pipe2(p, O_CLOEXEC) < 0)
                        return nkp_fail(-errno, "Cannot create a pipe: %s.", g_strerror(errno));
                size_t len = nkp_secret_len(key);
                ssize_t w = write(p[1], nkp_secret_data(key), len);
                close(p[1]);
                if (w != (ssize_t) len) {
                        close(p[0]);
                        return nkp_fail(-EIO, "Cannot hand the key to %s.", argv[0]);
                }
                g_subprocess_launcher_take_fd(l, p[0], 3);
        }
        g_autoptr(GError) error = NULL;
        g_autoptr(GSubprocess) sp = g_subprocess_launcher_spawnv(l, argv, &error);
        if (!sp)
                return nkp_fail(-ENOENT, "Cannot run '%s': %s.", argv[0], error->message);
        if (!g_subprocess_wait(sp, NULL, &error))
                return nkp_fail(-EIO, "Running '%s' failed: %s.", argv[0], error->message);
        return g_subprocess_get_if_exited(sp) ? g_subprocess_get_exit_status(sp) : 128;
}

static bool wait_for_path(const char *path, int ms)
{
        for (int waited = 0; waited < ms; waited += 20) {
                if (access(path, F_OK) == 0)
                        return true;
                g_usleep(20 * 1000);
        }
        return false;
}

/* Starts a daemonized swtpm `tag` on `state` (with `key` or none). */
static int swtpm_up(const char *work, const char *tag, const char *state, const nkp_secret *key,
                    bool need_init)
{
        g_autofree char *ctrl = g_strdup_printf("type=unixio,path=%s/%s.ctrl", work, tag);
        g_autofree char *srv = g_strdup_printf("type=unixio,path=%s/%s.sock", work, tag);
        g_autofree char *pid = g_strdup_printf("file=%s/%s.pid", work, tag);
        g_autofree char *log = g_strdup_printf("file=%s/%s.log", work, tag);
        g_autofree char *st = g_strdup_printf("dir=%s", state);
        g_autofree char *ctrl_path = g_strdup_printf("%s/%s.ctrl", work, tag);
        const char *argv[20] = { "swtpm", "socket", "--tpm2", "--tpmstate", st, "--ctrl", ctrl,
                                 "--server", srv, "--pid", pid, "--log", log, "-d" };
        int n = 14;
        if (!need_init) {
                argv[n++] = "--flags";
                argv[n++] = "not-need-init";
        }
        if (key) {
                argv[n++] = "--key";
                argv[n++] = "pwdfd=3,mode=aes-256-cbc";
        }
        argv[n] = NULL;
        int r = run_quiet(argv, key);
        if (r < 0)
                return r;
        if (r != 0 || !wait_for_path(ctrl_path, 5000))
                return nkp_fail(-EIO, "swtpm could not open the vTPM state '%s' (see '%s/%s.log').",
                                state, work, tag);
        return 0;
}

static void swtpm_down(const char *work, const char *tag)
{
        g_autofree char *ctrl = g_strdup_printf("%s/%s.ctrl", work, tag);
        g_autofree char *pidf = g_strdup_printf("%s/%s.pid", work, tag);
        const char *argv[] = { "swtpm_ioctl", "--unix", ctrl, "-s", NULL };
        (void) run_quiet(argv, NULL);
        g_autofree char *txt = NULL;
        if (!g_file_get_contents(pidf, &txt, NULL, NULL))
                return;
        pid_t pid = (pid_t) g_ascii_strtoll(txt, NULL, 10);
        if (pid <= 1)
                return;
        for (int i = 0; i < 250 && kill(pid, 0) == 0; i++)
                g_usleep(20 * 1000);
        if (kill(pid, 0) == 0)
                kill(pid, SIGKILL);
}

static int swtpm_ioctl_blob(const char *work, const char *tag, const char *what, const char *file)
{
        g_autofree char *ctrl = g_strdup_printf("%s/%s.ctrl", work, tag);
        const char *argv[] = { "swtpm_ioctl", "--unix", ctrl, what, "permanent", file, NULL };
        int r = run_quiet(argv, NULL);
        if (r < 0)
                return r;
        return r == 0 ? 0 : nkp_fail(-EIO, "swtpm_ioctl %s failed on the vTPM state.", what);
}

static void rm_rf(const char *path)
{
        g_autoptr(GDir) dir = g_dir_open(path, 0, NULL);
        const char *e;
        while (dir && (e = g_dir_read_name(dir))) {
                g_autofree char *p = g_build_filename(path, e, NULL);
                if (g_file_test(p, G_FILE_TEST_IS_DIR) && !g_file_test(p, G_FILE_TEST_IS_SYMLINK))
                        rm_rf(p);
                else
                        (void) unlink(p);
        }
        (void) rmdir(path);
}

/* Writes the vTPM state of `d`, re-keyed from `old_key` to `new_key`
 * (either may be NULL: clear), into <work>/new/.  Touches nothing else. */
static int vtpm_convert(const NkpDomain *d, const nkp_secret *old_key, const nkp_secret *new_key)
{
        g_autofree char *state = vtpm_state_dir(d);
        g_autofree char *work = vtpm_work_dir(d);
        const char *extra[] = { "tpm2-00.volatilestate", "tpm2-00.savestate",
                                "tpm-00.volatilestate", "tpm-00.savestate" };
        for (size_t i = 0; i < G_N_ELEMENTS(extra); i++) {
                g_autofree char *p = g_build_filename(state, extra[i], NULL);
                if (access(p, F_OK) == 0)
                        return nkp_fail(-EBUSY, "The vTPM of VM '%s' has saved volatile state "
                                                "('%s'), from a suspend or a migration; start and "
                                                "shut down the VM, then retry. Nothing was changed.",
                                        d->name, p);
        }
        rm_rf(work);
        g_autofree char *newdir = g_build_filename(work, "new", NULL);
        g_autofree char *cur = g_build_filename(work, "cur", NULL);
        g_autofree char *blob = g_build_filename(work, "blob", NULL);
        g_autofree char *check = g_build_filename(work, "check", NULL);
        g_autofree char *src_file = vtpm_state_file(d);
        g_autofree char *base = g_path_get_basename(src_file);
        g_autofree char *cur_file = g_build_filename(cur, base, NULL);
        if (nkp_mkdir_private(newdir) < 0 || nkp_mkdir_private(cur) < 0)
                return nkp_fail_prefix(-EIO, "Cannot make the work directory '%s'", work);
        /* A copy of the state: swtpm may rewrite what it opens. */
        g_autofree char *data = NULL;
        gsize len = 0;
        if (!g_file_get_contents(src_file, &data, &len, NULL) ||
            nkp_write_file_atomic(cur_file, data, len, 0600, true) < 0) {
                rm_rf(work);
                return nkp_fail(-EIO, "Cannot copy the vTPM state '%s'.", src_file);
        }
        int r = swtpm_up(work, "a", cur, old_key, false);
        if (r == 0) {
                r = swtpm_ioctl_blob(work, "a", "--save", blob);
                swtpm_down(work, "a");
        }
        if (r == 0) {
                r = swtpm_up(work, "b", newdir, new_key, true);
                if (r == 0) {
                        r = swtpm_ioctl_blob(work, "b", "--load", blob);
                        g_autofree char *ctrl = g_strdup_printf("%s/b.ctrl", work);
                        const char *init[] = { "swtpm_ioctl", "--unix", ctrl, "-i", NULL };
                        if (r == 0 && run_quiet(init, NULL) != 0)
                                r = nkp_fail(-EIO, "swtpm could not start on the converted vTPM "
                                                   "state.");
                        swtpm_down(work, "b");
                }
        }
        if (access(blob, F_OK) == 0) {
                /* Overwrite the decrypted blob before it goes. */
                struct stat st;
                if (stat(blob, &st) == 0 && st.st_size > 0) {
                        g_autofree char *zero = g_malloc0(st.st_size);
                        g_file_set_contents(blob, zero, st.st_size, NULL);
                }
                (void) unlink(blob);
        }
        g_autofree char *new_file = g_build_filename(newdir, base, NULL);
        if (r == 0) {
                /* C: the new state must open under the new key. */
                r = swtpm_up(work, "c", newdir, new_key, false);
                if (r == 0) {
                        r = swtpm_ioctl_blob(work, "c", "--save", check);
                        swtpm_down(work, "c");
                }
                (void) unlink(check);
        }
        if (r == 0) {
                int fd = open(new_file, O_RDONLY | O_CLOEXEC);
                uint8_t h[6] = { 0 };
                bool ok = fd >= 0 && read(fd, h, sizeof h) == (ssize_t) sizeof h;
                if (fd >= 0)
                        close(fd);
                bool enc = ok && (h[5] & 1);
                if (!ok || enc != (new_key != NULL))
                        r = nkp_fail(-EIO, "The converted vTPM state of VM '%s' is not %s as "
                                           "expected; nothing was changed.",
                                     d->name, new_key ? "encrypted" : "clear");
        }
        if (r < 0) {
                rm_rf(work);
                return nkp_fail_prefix(r, "Cannot convert the vTPM state of VM '%s' (nothing was "
                                          "changed)",
                                       d->name);
        }
        /* Same owner and mode as the state it replaces. */
        struct stat st;
        if (stat(src_file, &st) == 0) {
                (void) chmod(new_file, st.st_mode & 07777);
                (void) chown(new_file, st.st_uid, st.st_gid);
        }
        return 0;
}


/* The converted state (vtpm_convert's <work>/new/<file>) goes beside the
 * state file as <file>.nkp-new, so that the vTPM is replaced through the
 * same three names as the disks (journal.c). */
static int vtpm_stage(const NkpDomain *d)
{
        g_autofree char *src = vtpm_state_file(d);
        g_autofree char *work = vtpm_work_dir(d);
        g_autofree char *base = g_path_get_basename(src);
        g_autofree char *made = g_build_filename(work, "new", base, NULL);
        g_autofree char *dst = g_strconcat(src, ".nkp-new", NULL);
        int fd = open(made, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) < 0 || rename(made, dst) < 0) {
                int e = errno;
                if (fd >= 0)
                        close(fd);
                return nkp_fail(-e, "Cannot put the new vTPM state of VM '%s' beside '%s': %s.",
                                d->name, src, g_strerror(e));
        }
        close(fd);
        fsync_dir_of(dst);
        rm_rf(work);
        return 0;
}

/* ---- objects and their keys --------------------------------------------- */

static bool disk_is_candidate(const NkpDomainDisk *disk)
{
        return disk->target && g_strcmp0(disk->device, "disk") == 0 &&
               g_strcmp0(disk->type, "file") == 0 && disk->source_file &&
               g_strcmp0(disk->driver_type, "qcow2") == 0 && !disk->encryption_format;
}

/* One disk to convert: from old_value (NULL: plain) to new_value (NULL:
 * plain); values are hex(DEK) as libvirt and QEMU get them. */
typedef struct {
        char *target;
        char *path;
        nkp_secret *old_value;
        nkp_secret *new_value;
} DiskJob;

static void disk_job_free(gpointer p)
{
        DiskJob *j = p;
        g_free(j->target);
        g_free(j->path);
        nkp_secret_free(j->old_value);
        nkp_secret_free(j->new_value);
        g_free(j);
}

static DiskJob *disk_job_new(const char *target, const char *path)
{
        DiskJob *j = g_new0(DiskJob, 1);
        j->target = g_strdup(target);
        j->path = g_strdup(path);
        return j;
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
                        g_ptr_array_add(jobs, disk_job_new(disk->target, disk->source_file));
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
                g_ptr_array_add(jobs, disk_job_new(disk->target, disk->source_file));
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
        /* A saved state restores with the definition and the keys it was
         * saved with, which the new files would no longer match. */
        r = nkp_virt_domain_has_managed_save(v, name);
        if (r < 0)
                return r;
        if (r > 0)
                return nkp_fail(-EBUSY, "VM '%s' has a saved state (virsh managedsave), which "
                                        "would restore with its old keys; start it and shut it "
                                        "down first (or drop the state: virsh managedsave-remove "
                                        "'%s'). Nothing was changed.",
                                name, name);
        return 0;
}

/* ---- the conversion protocol (journal.c, docs/crash-safety.md) ----------- */
/*
 * With the VM's lock held for the whole command:
 *   1. journal, phase converting          (crash point "journal")
 *   2. vTPM state -> <state>.nkp-new      ("vtpm-converted")
 *   3. each disk P -> P.nkp-new, compared ("disk-copied", "disk-converted")
 *   4. journal phase ready                ("ready")
 *   5. each file: P -> P.nkp-old, P.nkp-new -> P   ("swap-half", "swapped")
 *   6. the new definition                 ("defined")
 *   7. P.nkp-old removed, journal removed ("reconciled", "done")
 * Until 6 the definition is the old one and every file can go back; from 6
 * on it is the new one and every new copy is complete.  A failure before 6
 * rolls back at once; a crash anywhere is reconciled by the next command or
 * by the hook at the next start (to whichever definition libvirt holds). */

typedef struct {
        const char *op;         /* journal op: "encrypt", "decrypt", "rekey-deep" */
        const NkpDomain *d;     /* the definition before */
        const char *newxml;     /* the definition after */
        GPtrArray *jobs;        /* DiskJob* */
        bool vtpm;              /* convert the vTPM state too */
        const nkp_secret *vtpm_old, *vtpm_new;
} Conversion;

/* Rolls the files back after a failure before the define, keeping the
 * failure's message. */
static int roll_back(NkpctlGlobals *g, const NkpJournal *j, int err)
{
        g_autofree char *msg = g_strdup(nkp_error_message());
        if (nkp_journal_reconcile(g->ctx, j, j->old_sig, NULL) < 0)
                return nkp_fail(err, "%s (and putting the files back failed: %s; run the "
                                     "command again)",
                                msg, nkp_error_message());
        return nkp_fail(err, "%s", msg);
}

static int convert_and_switch(NkpctlGlobals *g, NkpVirt *v, const Conversion *c)
{
        const NkpDomain *d = c->d;
        g_autoptr(NkpDomain) nd = NULL;
        int r = nkp_domain_parse(c->newxml, strlen(c->newxml), &nd);
        if (r < 0)
                return nkp_fail_prefix(r, "The new definition of VM '%s' cannot be read",
                                       d->name);
        g_autofree char *old_sig = nkp_domain_signature(d);
        g_autofree char *new_sig = nkp_domain_signature(nd);
        g_autoptr(NkpJournal) j = nkp_journal_new(c->op, d->name, d->uuid, old_sig, new_sig);
        g_autoptr(GPtrArray) disk_paths = g_ptr_array_new();
        if (c->vtpm) {
                g_ptr_array_add(j->files, vtpm_state_file(d));
                g_ptr_array_add(j->scratch, vtpm_work_dir(d));
        }
        for (guint i = 0; i < c->jobs->len; i++) {
                DiskJob *dj = c->jobs->pdata[i];
                g_ptr_array_add(j->files, g_strdup(dj->path));
                g_ptr_array_add(disk_paths, dj->path);
        }
        if ((r = check_space(disk_paths)) < 0)
                return r;

        if ((r = nkp_journal_save(g->ctx, j)) < 0)
                return r;
        nkp_test_crash_point("journal");
        if (c->vtpm) {
                r = vtpm_convert(d, c->vtpm_old, c->vtpm_new);
                if (r == 0)
                        r = vtpm_stage(d);
                if (r < 0)
                        return roll_back(g, j, r);
                nkp_test_crash_point("vtpm-converted");
        }
        for (guint i = 0; i < c->jobs->len; i++) {
                DiskJob *dj = c->jobs->pdata[i];
                r = convert_disk(dj->path, dj->old_value, dj->new_value);
                if (r < 0)
                        return roll_back(g, j, r);
                nkp_test_crash_point("disk-converted");
        }
        j->phase = NKP_JOURNAL_READY;
        if ((r = nkp_journal_save(g->ctx, j)) < 0)
                return roll_back(g, j, r);
        nkp_test_crash_point("ready");

        /* The hook refuses starts while we hold the lock; this catches a
         * start that was already under way when we took it. */
        r = require_shut_off(v, d->name);
        if (r < 0)
                return roll_back(g, j, r);
        for (guint i = 0; i < j->files->len; i++) {
                if ((r = nkp_journal_swap_file(j->files->pdata[i])) < 0)
                        return roll_back(g, j, r);
                nkp_test_crash_point("swapped");
        }
        r = nkp_virt_domain_define(v, c->newxml);
        if (r < 0) {
                r = nkp_fail_prefix(r, "The new definition of VM '%s' was refused, so every file "
                                       "was put back and nothing was changed",
                                    d->name);
                return roll_back(g, j, r);
        }
        nkp_test_crash_point("defined");
        /* From here the new definition is the truth: finish forward. */
        r = nkp_journal_reconcile(g->ctx, j, j->new_sig, NULL);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' has its new definition, but the old files "
                                          "could not all be removed (run the command again)",
                                       d->name);
        nkp_test_crash_point("done");
        return 0;
}

/* ---- the VM's lock, and recovering an interrupted command ----------------- */

static const char *op_words(const char *op)
{
        if (strcmp(op, "rekey-deep") == 0)
                return "vm rekey --deep";
        if (strcmp(op, "encrypt") == 0)
                return "vm encrypt";
        if (strcmp(op, "decrypt") == 0)
                return "vm decrypt";
        return op;
}

/* Takes VM `d`'s lock (held until the process ends or *fd is released). */
static int lock_vm(NkpctlGlobals *g, const NkpDomain *d, int *ret_fd)
{
        /* The hook (at a start) and `vm status` hold the lock for
         * milliseconds: worth two seconds of patience.  A command holds it
         * for as long as a full copy of the disks takes: refused. */
        int r = -EBUSY;
        for (int i = 0; i < 40 && r == -EBUSY; i++) {
                if (i)
                        g_usleep(50 * 1000);
                r = nkp_journal_lock(g->ctx, d->uuid, true, ret_fd);
        }
        if (r == -EBUSY)
                return nkp_fail(r, "VM '%s' is being changed by another nkpctl command (vm "
                                   "encrypt, decrypt or rekey --deep); wait for it to finish, "
                                   "then run this one again. Nothing was changed.",
                                d->name);
        return r;
}

/* With the lock held: reconciles an interrupted operation to the VM's
 * persistent definition `d`.  0 nothing pending, 1 rolled back, 2 finished
 * (rolled forward); *ret_op = the journal's op when there was one. */
static int recover_locked(NkpctlGlobals *g, const NkpDomain *d, char **ret_op)
{
        g_autoptr(NkpJournal) j = NULL;
        int r = nkp_journal_load(g->ctx, d->uuid, &j);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;
        g_autofree char *sig = nkp_domain_signature(d);
        NkpReconcile outcome;
        r = nkp_journal_reconcile(g->ctx, j, sig, &outcome);
        if (r < 0)
                return r;
        if (outcome == NKP_RECONCILE_BACK)
                fprintf(stderr, "nkpctl: note: VM '%s': rolled back the interrupted '%s'; its "
                                "files are as they were before it.\n",
                        d->name, op_words(j->op));
        if (ret_op)
                *ret_op = g_strdup(j->op);
        return outcome == NKP_RECONCILE_FORWARD ? 2 : 1;
}

int nkpctl_vm_recover(NkpctlGlobals *g, NkpVirt *v, const char *name)
{
        g_autoptr(NkpDomain) d = NULL;
        int r = load_domain(v, name, NULL, &d);
        if (r < 0)
                return r;
        int fd = -1;
        if ((r = lock_vm(g, d, &fd)) < 0)
                return r;
        g_autofree char *op = NULL;
        r = recover_locked(g, d, &op);
        nkp_journal_unlock(fd);
        if (r == 2)
                fprintf(stderr, "nkpctl: note: VM '%s': finished the interrupted '%s'.\n", name,
                        op_words(op));
        return r;
}

static void print_finished(NkpctlGlobals *g, const char *name, const char *op)
{
        if (!g->json) {
                printf("VM '%s': finished the interrupted %s.\n", name, op);
                return;
        }
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "name");
        json_builder_add_string_value(b, name);
        json_builder_set_member_name(b, "finished");
        json_builder_add_string_value(b, op);
        json_builder_end_object(b);
        nkpctl_print_json(json_builder_get_root(b));
}

/* The start of encrypt, decrypt and rekey --deep: the definition, the lock
 * (kept in *ret_lock until the process ends), an interrupted operation
 * reconciled, the definition again (as it is now), the VM shut off.
 * Returns 1 when the interrupted operation was `op` itself and it was
 * finished (the command has nothing left to do), 0 to go on. */
static int begin_command(NkpctlGlobals *g, NkpVirt *v, const char *name, const char *op,
                         int *ret_lock, char **ret_xml, NkpDomain **ret)
{
        g_autoptr(NkpDomain) d = NULL;
        int r = load_domain(v, name, NULL, &d);
        if (r < 0)
                return r;
        if ((r = lock_vm(g, d, ret_lock)) < 0)
                return r;
        g_autofree char *done_op = NULL;
        r = recover_locked(g, d, &done_op);
        if (r < 0)
                return r;
        if (r == 2) {
                if (strcmp(done_op, op) == 0) {
                        print_finished(g, name, op_words(op));
                        return 1;
                }
                fprintf(stderr, "nkpctl: note: VM '%s': finished the interrupted '%s' first.\n",
                        name, op_words(done_op));
        }
        g_clear_pointer(&d, nkp_domain_free);
        r = load_domain(v, name, ret_xml, &d);
        if (r == 0)
                r = require_shut_off(v, name);
        if (r < 0)
                return r;
        *ret = g_steal_pointer(&d);
        return 0;
}

/* ---- encrypt ------------------------------------------------------------ */

static int vm_encrypt(NkpctlGlobals *g, const char *name, const char *provider_name,
                      const char *disks)
{
        g_autoptr(NkpVirt) v = NULL;
        int r = open_virt(g, &v);
        if (r < 0)
                return nkpctl_lib_error();
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        int lock = -1;
        r = begin_command(g, v, name, "encrypt", &lock, &xml, &d);
        if (r < 0)
                return nkpctl_lib_error();
        if (r == 1)
                return 0;
        if (d->keysafe)
                return nkpctl_error("VM '%s' is already encrypted by provider '%s'; to move it, "
                                    "use: nkpctl vm rekey '%s' --provider NAME.",
                                    name, nkp_keysafe_provider_name(d->keysafe), name);

        g_autoptr(nkp_provider) p = NULL;
        if (nkp_provider_pick(g->ctx, provider_name, &p) < 0)
                return nkpctl_lib_error();
        if (!nkp_provider_is_active(p))
                return nkpctl_error("Provider '%s' was never backed up, so it cannot protect VMs "
                                    "yet: nkpctl provider backup '%s' --out FILE.p12.",
                                    nkp_provider_name(p), nkp_provider_name(p));

        /* What to protect. */
        bool do_vtpm = false, convert_vtpm = false;
        if (d->has_vtpm) {
                if (d->tpm_secret)
                        return nkpctl_error("The vTPM of VM '%s' is already encrypted with the "
                                            "libvirt secret '%s', which nkp does not manage; "
                                            "nothing was changed.",
                                            name, d->tpm_secret);
                enum vtpm_state st = vtpm_state(d);
                if (st == VTPM_ENCRYPTED || st == VTPM_UNKNOWN) {
                        g_autofree char *f = vtpm_state_file(d);
                        return nkpctl_error(
                                "The vTPM state of VM '%s' ('%s') is %s, but the VM names no key "
                                "for it; nkp cannot take it over. Nothing was changed.",
                                name, f, st == VTPM_ENCRYPTED ? "encrypted" : "unreadable");
                }
                convert_vtpm = st == VTPM_CLEAR;
                do_vtpm = true;
        }
        g_autoptr(GPtrArray) jobs = g_ptr_array_new_with_free_func(disk_job_free);
        if (parse_disks(d, disks, jobs) < 0)
                return nkpctl_lib_error();
        if (!do_vtpm && jobs->len == 0)
                return nkpctl_error("VM '%s' has neither an emulated vTPM nor a qcow2 disk to "
                                    "encrypt; nothing was changed.",
                                    name);

        /* Keys, keysafe and the new definition (enrol.c, shared with nkpd),
         * built before anything on disk changes. */
        g_autoptr(GPtrArray) targets = g_ptr_array_new();
        for (guint i = 0; i < jobs->len; i++)
                g_ptr_array_add(targets, ((DiskJob *) jobs->pdata[i])->target);
        g_autoptr(NkpEnrolment) en = NULL;
        if (nkp_enrol_build(g->ctx, d, xml, p, do_vtpm, targets, &en) < 0)
                return nkpctl_lib_error();
        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                j->new_value = g_steal_pointer(&((NkpEnrolDisk *) en->disks->pdata[i])->value);
        }
        const Conversion c = { .op = "encrypt", .d = d, .newxml = en->xml, .jobs = jobs,
                               .vtpm = convert_vtpm, .vtpm_new = en->vtpm_value };
        if (convert_and_switch(g, v, &c) < 0)
                return nkpctl_lib_error();

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
        int r = open_virt(g, &v);
        if (r < 0)
                return nkpctl_lib_error();
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        int lock = -1;
        r = begin_command(g, v, name, "decrypt", &lock, &xml, &d);
        if (r < 0)
                return nkpctl_lib_error();
        if (r == 1)
                return 0;
        if (!d->keysafe)
                return nkpctl_error("VM '%s' is not encrypted by nkp; nothing to do.", name);

        g_autoptr(GPtrArray) secrets = NULL;
        if (nkp_vm_unlock(g->ctx, d, true, &secrets) < 0)
                return nkpctl_lib_error();

        bool has_vtpm_entry = false;
        g_autoptr(nkp_secret) vtpm_value = NULL;
        g_autoptr(GPtrArray) jobs = g_ptr_array_new_with_free_func(disk_job_free);
        for (guint i = 0; i < secrets->len; i++) {
                NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_VTPM) == 0) {
                        has_vtpm_entry = true;
                        vtpm_value = g_steal_pointer(&s->value);
                        continue;
                }
                const NkpDomainDisk *disk = nkp_domain_find_disk(d, s->object_id);
                if (!disk || !disk->encryption_format)
                        continue; /* detached, or never converted: nothing to undo */
                if (!disk->source_file)
                        return nkpctl_error("Disk '%s' of VM '%s' has no file path.",
                                            s->object_id, name);
                DiskJob *j = disk_job_new(s->object_id, disk->source_file);
                j->old_value = g_steal_pointer(&s->value);
                g_ptr_array_add(jobs, j);
        }
        bool convert_vtpm = false;
        if (has_vtpm_entry && d->has_vtpm) {
                enum vtpm_state st = vtpm_state(d);
                if (st == VTPM_CLEAR || st == VTPM_UNKNOWN) {
                        g_autofree char *f = vtpm_state_file(d);
                        return nkpctl_error("The vTPM state of VM '%s' ('%s') is %s, not "
                                            "encrypted as its keysafe says; nothing was changed.",
                                            name, f, st == VTPM_CLEAR ? "clear" : "unreadable");
                }
                convert_vtpm = st == VTPM_ENCRYPTED;
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

        const Conversion c = { .op = "decrypt", .d = d, .newxml = newxml, .jobs = jobs,
                               .vtpm = convert_vtpm, .vtpm_old = vtpm_value };
        if (convert_and_switch(g, v, &c) < 0)
                return nkpctl_lib_error();
        /* Its secrets, if a start left any behind. */
        for (guint i = 0; i < secrets->len; i++)
                (void) nkp_virt_secret_undefine(v, ((NkpVmSecret *) secrets->pdata[i])->secret_uuid);
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

/* ---- deep rekey ------------------------------------------------------------ */
/* New DEKs for every object, under a new keysafe (fresh KEK salt) and new
 * secret UUIDs: a libvirt secret left over from an earlier start (old UUID,
 * old value) can then never be mistaken for a new one.  The vTPM state and
 * every disk are re-encrypted through the conversion protocol above.  A key
 * in the keysafe for an object the VM no longer has would be lost: refused. */

/* The provider to rekey to: named, else the VM's own (by key id). */
static int rekey_provider(NkpctlGlobals *g, const NkpDomain *d, const char *name,
                          nkp_provider **ret)
{
        if (name)
                return nkp_provider_pick(g->ctx, name, ret);
        const char *key_id = nkp_keysafe_provider_key_id(d->keysafe);
        nkp_provider **list = NULL;
        size_t n = 0;
        int r = nkp_provider_list(g->ctx, &list, &n);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++)
                if (g_ascii_strcasecmp(nkp_provider_key_id(list[i]), key_id) == 0) {
                        *ret = list[i];
                        list[i] = NULL;
                        break;
                }
        nkp_provider_list_free(list, n);
        if (!*ret)
                return nkp_fail(-ENOKEY, "The provider '%s' (key id %s) that protects VM '%s' is "
                                         "not in this host's store; restore it (nkpctl provider "
                                         "restore FILE.p12) or name another with --provider. "
                                         "Nothing was changed.",
                                nkp_keysafe_provider_name(d->keysafe), key_id, d->name);
        return 0;
}

int nkpctl_vm_rekey_deep(NkpctlGlobals *g, const char *name, const char *provider_name)
{
        g_autoptr(NkpVirt) v = NULL;
        int r = open_virt(g, &v);
        if (r < 0)
                return nkpctl_lib_error();
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        int lock = -1;
        r = begin_command(g, v, name, "rekey-deep", &lock, &xml, &d);
        if (r < 0)
                return nkpctl_lib_error();
        if (r == 1)
                return 0;
        if (!d->keysafe)
                return nkpctl_error("VM '%s' is not encrypted by nkp, so it has no keys to "
                                    "renew; encrypt it with: nkpctl vm encrypt '%s'.",
                                    name, name);
        g_autoptr(nkp_provider) p = NULL;
        if (rekey_provider(g, d, provider_name, &p) < 0)
                return nkpctl_lib_error();
        if (!nkp_provider_is_active(p))
                return nkpctl_error("Provider '%s' was never backed up, so it cannot protect VMs "
                                    "yet: nkpctl provider backup '%s' --out FILE.p12. Nothing "
                                    "was changed.",
                                    nkp_provider_name(p), nkp_provider_name(p));

        /* The old keys. */
        g_autoptr(GPtrArray) secrets = NULL;
        if (nkp_vm_unlock(g->ctx, d, true, &secrets) < 0)
                return nkpctl_lib_error();
        bool vtpm = false;
        g_autoptr(nkp_secret) vtpm_old = NULL;
        g_autoptr(GPtrArray) jobs = g_ptr_array_new_with_free_func(disk_job_free);
        g_autoptr(GPtrArray) targets = g_ptr_array_new();
        for (guint i = 0; i < secrets->len; i++) {
                NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_VTPM) == 0) {
                        if (!d->has_vtpm)
                                return nkpctl_error("VM '%s' has a vTPM key in its keysafe but "
                                                    "no emulated vTPM; a deep rekey would lose "
                                                    "that key. Nothing was changed.",
                                                    name);
                        vtpm = true;
                        vtpm_old = g_steal_pointer(&s->value);
                        continue;
                }
                const NkpDomainDisk *disk = nkp_domain_find_disk(d, s->object_id);
                if (!disk || !disk->encryption_format || !disk->source_file ||
                    g_strcmp0(disk->type, "file") != 0)
                        return nkpctl_error("VM '%s' has a key in its keysafe for disk '%s', "
                                            "which is not an encrypted file disk of the VM any "
                                            "more; a deep rekey would lose that key. Attach the "
                                            "disk again first. Nothing was changed.",
                                            name, s->object_id);
                DiskJob *j = disk_job_new(s->object_id, disk->source_file);
                j->old_value = g_steal_pointer(&s->value);
                g_ptr_array_add(jobs, j);
                g_ptr_array_add(targets, j->target);
        }
        bool convert_vtpm = false;
        if (vtpm) {
                enum vtpm_state st = vtpm_state(d);
                if (st == VTPM_CLEAR || st == VTPM_UNKNOWN) {
                        g_autofree char *f = vtpm_state_file(d);
                        return nkpctl_error("The vTPM state of VM '%s' ('%s') is %s, not "
                                            "encrypted as its keysafe says; nothing was changed.",
                                            name, f, st == VTPM_CLEAR ? "clear" : "unreadable");
                }
                convert_vtpm = st == VTPM_ENCRYPTED;
        }

        /* A new keysafe: nkp_enrol_build makes one when the domain has none. */
        NkpDomain fresh = *d;
        fresh.keysafe = NULL;
        g_autoptr(NkpEnrolment) en = NULL;
        if (nkp_enrol_build(g->ctx, &fresh, xml, p, vtpm, targets, &en) < 0)
                return nkpctl_lib_error();
        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                j->new_value = g_steal_pointer(&((NkpEnrolDisk *) en->disks->pdata[i])->value);
        }
        const Conversion c = { .op = "rekey-deep", .d = d, .newxml = en->xml, .jobs = jobs,
                               .vtpm = convert_vtpm, .vtpm_old = vtpm_old,
                               .vtpm_new = en->vtpm_value };
        if (convert_and_switch(g, v, &c) < 0)
                return nkpctl_lib_error();
        /* The old secrets, if a start left any behind. */
        for (guint i = 0; i < secrets->len; i++)
                (void) nkp_virt_secret_undefine(v, ((NkpVmSecret *) secrets->pdata[i])->secret_uuid);

        GString *what = g_string_new(vtpm ? "vTPM" : "");
        for (guint i = 0; i < jobs->len; i++)
                g_string_append_printf(what, "%s%s", what->len ? ", " : "",
                                       ((DiskJob *) jobs->pdata[i])->target);
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, name);
                json_builder_set_member_name(b, "provider");
                json_builder_add_string_value(b, nkp_provider_name(p));
                json_builder_set_member_name(b, "vtpm");
                json_builder_add_boolean_value(b, vtpm);
                json_builder_set_member_name(b, "disks");
                json_builder_begin_array(b);
                for (guint i = 0; i < jobs->len; i++)
                        json_builder_add_string_value(b, ((DiskJob *) jobs->pdata[i])->target);
                json_builder_end_array(b);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("VM '%s' has new keys from provider '%s'; its data was re-encrypted "
                       "(%s).\n",
                       name, nkp_provider_name(p), what->str);
        }
        g_string_free(what, TRUE);
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
        char *pending_op;   /* an interrupted (or running) vm encrypt/decrypt/rekey --deep */
        const char *pending_phase;
        bool pending_in_progress; /* its nkpctl still holds the VM's lock */
} VmStatus;

static void vm_status_clear(VmStatus *s)
{
        g_free(s->name);
        g_free(s->uuid);
        g_free(s->provider);
        g_free(s->key_id);
        g_free(s->reason);
        g_free(s->pending_op);
        if (s->objects)
                g_ptr_array_unref(s->objects);
}

/* A journal left for the VM: an operation in progress (its lock is held)
 * or interrupted (to be finished or rolled back). */
static void pending_of(NkpctlGlobals *g, const NkpDomain *d, VmStatus *s)
{
        g_autoptr(NkpJournal) j = NULL;
        if (nkp_journal_load(g->ctx, d->uuid, &j) < 0) {
                nkp_error_clear();
                return;
        }
        s->pending_op = g_strdup(op_words(j->op));
        s->pending_phase = j->phase == NKP_JOURNAL_READY ? "ready" : "converting";
        int fd = -1;
        int r = nkp_journal_lock(g->ctx, d->uuid, false, &fd);
        s->pending_in_progress = r == -EBUSY;
        if (r == 0)
                nkp_journal_unlock(fd);
        nkp_error_clear();
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
        pending_of(g, d, s);
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
        json_builder_set_member_name(b, "pending");
        if (s->pending_op) {
                json_builder_begin_object(b);
                add_str(b, "op", s->pending_op);
                add_str(b, "phase", s->pending_phase);
                json_builder_set_member_name(b, "in_progress");
                json_builder_add_boolean_value(b, s->pending_in_progress);
                json_builder_end_object(b);
        } else {
                json_builder_add_null_value(b);
        }
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
        if (s->pending_op && s->pending_in_progress)
                printf("%s: '%s' in progress\n", s->name, s->pending_op);
        else if (s->pending_op)
                printf("%s: interrupted '%s' pending (phase %s): run it again to finish or roll "
                       "it back, or start the VM (the hook does it)\n",
                       s->name, s->pending_op, s->pending_phase);
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
        "       nkpctl vm rekey DOMAIN [--provider NAME] [--deep] | --all [--provider NAME]\n"
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
                return nkpctl_vm_rekey(g, argc, argv);
        fputs(vm_usage, stderr);
        return nkpctl_error("unknown vm command '%s'.", cmd);
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

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Running qemu-img and swtpm with keys on pipes: the converters of the VM
 * operations (vm-convert.c).
 *
 *  - nkp_tool_run: one program, its keys readable on fds 3, 4 … (pipes
 *    filled before it starts: never argv, the environment or a file);
 *    replaceable by a fake runner in unit tests (nkp_tools_set_runner);
 *  - nkp_disk_convert: a qcow2 file into P.nkp-new under another key (or
 *    none), compared with the original;
 *  - nkp_vtpm_convert / nkp_vtpm_stage: the vTPM state under another key
 *    (or none), through swtpm's state-blob interface, put beside the state
 *    file as <file>.nkp-new.
 *
 * Decrypted vTPM state never reaches persistent disk: the blobs that
 * swtpm_ioctl saves and loads live in memfds (tmpfs, no name, gone with
 * the last fd), handed to swtpm_ioctl as /proc/self/fd/N. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>


#include "nkp-private.h"

/* ---- the runner ------------------------------------------------------------ */

/* A tool must not outlive its caller: killed, the caller leaves a journal
 * that the next run (or the hook) reconciles, and a qemu-img still writing
 * the unlinked copy would only waste the disk. */
static void die_with_parent(gpointer data)
{
        (void) data;
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
}

static void close_all(int *fds, size_t n)
{
        for (size_t i = 0; i < n; i++)
                if (fds[i] >= 0)
                        close(fds[i]);
}

/* All of stderr (the tool's complaint), until it closes it. */
static char *read_all(int fd)
{
        GString *out = g_string_new(NULL);
        char buf[4096];
        for (;;) {
                ssize_t n = read(fd, buf, sizeof buf);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                if (out->len < 64 * 1024)
                        g_string_append_len(out, buf, n);
        }
        return g_string_free(out, FALSE);
}

static int wait_exit(pid_t pid)
{
        int status;
        while (waitpid(pid, &status, 0) < 0)
                if (errno != EINTR)
                        return -errno;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

static int real_runner(const NkpToolRun *run, char **ret_err, void *userdata)
{
        (void) userdata;
        const char *prog = run->argv[0];
        int source[8], target[8];
        size_t n = 0;
        g_return_val_if_fail(run->n_secrets + 1 <= G_N_ELEMENTS(source), -EINVAL);
        for (size_t i = 0; i < run->n_secrets; i++, n++) {
                int p[2];
                if (pipe2(p, O_CLOEXEC) < 0) {
                        int e = errno;
                        close_all(source, n);
                        return nkp_fail(-e, "Cannot create a pipe: %s.", g_strerror(e));
                }
                size_t len = nkp_secret_len(run->secrets[i]);
                ssize_t w = write(p[1], nkp_secret_data(run->secrets[i]), len);
                close(p[1]);
                source[n] = p[0];
                target[n] = 3 + (int) n;
                if (w != (ssize_t) len) {
                        close_all(source, n + 1);
                        return nkp_fail(-EIO, "Cannot hand the key to %s.", prog);
                }
        }
        if (run->blob_fd >= 0) {
                source[n] = run->blob_fd;
                target[n] = 3 + (int) n;
        }
        size_t n_fds = n + (run->blob_fd >= 0 ? 1 : 0);
        GSpawnFlags flags = G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD |
                            G_SPAWN_STDOUT_TO_DEV_NULL | G_SPAWN_CLOEXEC_PIPES |
                            (ret_err ? 0 : G_SPAWN_STDERR_TO_DEV_NULL);
        g_autoptr(GError) error = NULL;
        GPid pid = 0;
        int err_fd = -1;
        gboolean ok = g_spawn_async_with_pipes_and_fds(
                NULL, run->argv, NULL, flags, die_with_parent, NULL, -1, -1, -1, source, target,
                n_fds, &pid, NULL, NULL, ret_err ? &err_fd : NULL, &error);
        close_all(source, n); /* the key pipes; the blob stays the caller's */
        if (!ok)
                return nkp_fail(-ENOENT, "Cannot run '%s': %s.", prog, error->message);
        /* A daemonizing swtpm keeps a silenced stderr: wait, do not read. */
        if (ret_err) {
                *ret_err = read_all(err_fd);
                close(err_fd);
        }
        int r = wait_exit(pid);
        if (r < 0)
                return nkp_fail(r, "Running '%s' failed: %s.", prog, g_strerror(-r));
        return r;
}

static NkpToolRunner runner = real_runner;
static void *runner_data;

void nkp_tools_set_runner(NkpToolRunner fn, void *userdata)
{
        runner = fn ? fn : real_runner;
        runner_data = fn ? userdata : NULL;
}

int nkp_tool_run(const NkpToolRun *run, char **ret_err)
{
        g_autofree char *err = NULL;
        int r = runner(run, ret_err ? &err : NULL, runner_data);
        if (ret_err) {
                /* The first line of stderr: what the tool says went wrong. */
                char *e = g_strstrip(g_strdup(err ? err : ""));
                char *nl = strchr(e, '\n');
                if (nl)
                        *nl = '\0';
                *ret_err = e;
        }
        return r;
}

static int run_argv(const char *const *argv, nkp_secret *const *secrets, size_t n, char **ret_err)
{
        const NkpToolRun run = { .argv = argv, .secrets = secrets, .n_secrets = n, .blob_fd = -1 };
        return nkp_tool_run(&run, ret_err);
}

/* ---- disks: qemu-img ----------------------------------------------------- */

/* QEMU 7.2 sizes LUKS PBKDF2 iterations by timing 2^15 of them with the
 * thread's CPU time (getrusage), and fails with "Unable to get accurate CPU
 * usage" when that reads 0 ms.  Where CPU time is accounted in ticks (4 ms
 * here) and 2^15 HMAC-SHA256 rounds take less, that was most creations
 * (21 of 30 in one measurement).  SHA-512 rounds are slower: 0 of 30 in the
 * same minute.  The hash only derives the key slot from a full-entropy
 * passphrase, so SHA-512 costs nothing in strength.  Left-over failures are
 * retried with a growing pause (the tick may be busy for a while).
 * encrypt.iter-time=10: the key has full entropy, stretching it buys
 * nothing and would cost ~2 s at every start. */
#define LUKS_CREATE_OPTIONS \
        "encrypt.format=luks,encrypt.key-secret=snew,encrypt.iter-time=10,encrypt.hash-alg=sha512"
#define LUKS_CREATE_ATTEMPTS 6

/* Same owner and mode as `like`, and on disk before the swap. */
static int finish_copy(const char *copy, const char *like)
{
        struct stat st;
        int fd = open(copy, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0 || stat(like, &st) < 0 || fchmod(fd, st.st_mode & 07777) < 0 ||
            fchown(fd, st.st_uid, st.st_gid) < 0 || fsync(fd) < 0) {
                int e = errno;
                if (fd >= 0)
                        close(fd);
                return -e;
        }
        close(fd);
        return 0;
}

int nkp_disk_convert(const char *path, const nkp_secret *old_value, const nkp_secret *new_value)
{
        g_autofree char *tmp = g_strconcat(path, ".nkp-new", NULL);
        g_autofree char *err = NULL;
        (void) nkp_unlink_nofollow(tmp); /* a leftover of an interrupted run */

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
                (void) nkp_unlink_nofollow(tmp);
                r = run_argv(argv, secrets, n, &err);
                if (r == 0 || !new_value || !err || !strstr(err, "accurate CPU usage"))
                        break;
        }
        if (r != 0) {
                (void) nkp_unlink_nofollow(tmp);
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
        r = run_argv(cmp, secrets, n, &err);
        if (r != 0) {
                (void) nkp_unlink_nofollow(tmp);
                if (r < 0)
                        return r;
                return nkp_fail(-EIO, "The converted copy of '%s' differs from it (qemu-img "
                                      "compare: %s); it was removed and nothing was changed.",
                                path, err && err[0] ? err : "differs");
        }
        if ((r = finish_copy(tmp, path)) < 0) {
                (void) nkp_unlink_nofollow(tmp);
                return nkp_fail(r, "Cannot finish the converted copy of '%s': %s.", path,
                                g_strerror(-r));
        }
        return 0;
}

/* ---- one layer of a snapshot chain ---------------------------------------- */
/* A layer is copied without its backing data: the copy is a qcow2 over the
 * same backing name (-u: not opened while creating), and `qemu-img convert
 * -n -B BACKING` writes only what the layer itself allocates, taking the
 * block status of the top layer alone: data stays data, a zero cluster (or
 * one that reads as zeros) is written as a zero cluster, an unallocated one
 * stays unallocated and goes on reading from the backing.  A plain convert
 * of the layer opened with backing=null would turn a range the overlay
 * zeroed into unallocated clusters and reveal the backing data there. */

static guint64 be(const uint8_t *p, int n)
{
        guint64 v = 0;
        for (int i = 0; i < n; i++)
                v = v << 8 | p[i];
        return v;
}

/* From the qcow2 header of `path` (qcow2 spec): the virtual size (offset
 * 24), the cluster size (1 << the u32 at 20) and the backing file name as
 * written (offsets 8 and 16), NULL when none.  -EMEDIUMTYPE for a file
 * that is not qcow2. */
int nkp_qcow2_geometry(const char *path, guint64 *ret_size, guint64 *ret_cluster,
                          char **ret_backing)
{
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
                return -errno;
        uint8_t h[32];
        int r = 0;
        *ret_backing = NULL;
        if (pread(fd, h, sizeof h, 0) != (ssize_t) sizeof h || memcmp(h, "QFI\xfb", 4) != 0) {
                r = -EMEDIUMTYPE;
                goto out;
        }
        guint64 off = be(h + 8, 8), len = be(h + 16, 4), bits = be(h + 20, 4);
        *ret_size = be(h + 24, 8);
        if (bits < 9 || bits > 21 || len >= 1024) {
                r = -EMEDIUMTYPE;
                goto out;
        }
        *ret_cluster = (guint64) 1 << bits;
        if (off && len) {
                char *name = g_malloc0(len + 1);
                if (pread(fd, name, len, (off_t) off) != (ssize_t) len) {
                        g_free(name);
                        r = -EMEDIUMTYPE;
                        goto out;
                }
                *ret_backing = name;
        }
out:
        close(fd);
        return r;
}

/* --image-opts of `file` over `below` backing layers: `top_key` (a secret
 * id, NULL: plain) on the top, `below_key` on each layer below. */
static char *chain_opts(const char *file, const char *top_key, unsigned below,
                        const char *below_key)
{
        GString *s = g_string_new(NULL);
        g_string_append_printf(s, "driver=qcow2,file.filename=%s", file);
        if (top_key)
                g_string_append_printf(s, ",encrypt.key-secret=%s", top_key);
        GString *prefix = g_string_new("");
        for (unsigned k = 0; k < below; k++) {
                g_string_append(prefix, "backing.");
                g_string_append_printf(s, ",%sencrypt.key-secret=%s", prefix->str, below_key);
        }
        g_string_free(prefix, TRUE);
        return g_string_free(s, FALSE);
}

/* argv (NULL-terminated, strings borrowed) of `head`, the key objects
 * (sold on fd 3, snew on fd 4 when `with_new`), then `tail`. */
static GPtrArray *tool_argv(const char *const *head, bool with_new, const char *const *tail)
{
        GPtrArray *a = g_ptr_array_new();
        for (; *head; head++)
                g_ptr_array_add(a, (gpointer) *head);
        g_ptr_array_add(a, "--object");
        g_ptr_array_add(a, "secret,id=sold,file=/dev/fd/3,format=raw");
        if (with_new) {
                g_ptr_array_add(a, "--object");
                g_ptr_array_add(a, "secret,id=snew,file=/dev/fd/4,format=raw");
        }
        for (; *tail; tail++)
                g_ptr_array_add(a, (gpointer) *tail);
        g_ptr_array_add(a, NULL);
        return a;
}

static int run_tool_argv(GPtrArray *argv, nkp_secret *const *secrets, size_t n, char **ret_err)
{
        return run_argv((const char *const *) argv->pdata, secrets, n, ret_err);
}

int nkp_layer_convert(const char *path, unsigned below, const nkp_secret *old_value,
                      const nkp_secret *new_value)
{
        g_autofree char *tmp = g_strconcat(path, ".nkp-new", NULL);
        g_autofree char *backing = NULL, *err = NULL;
        guint64 size = 0, cluster = 0;
        int r = nkp_qcow2_geometry(path, &size, &cluster, &backing);
        if (r < 0 || !backing)
                return nkp_fail(r < 0 ? r : -EINVAL, "Cannot read the qcow2 header of the "
                                                     "snapshot layer '%s'%s. Nothing was changed.",
                                path, r < 0 ? "" : " (it names no backing file)");
        (void) nkp_unlink_nofollow(tmp);
        /* Every layer of an nkp chain is under the disk's key (sold). */
        nkp_secret *secrets[2] = { (nkp_secret *) old_value, (nkp_secret *) new_value };
        bool enc = new_value != NULL;
        size_t n = enc ? 2 : 1;
        g_autofree char *opts = g_strdup_printf("%s%scluster_size=%" G_GUINT64_FORMAT,
                                                enc ? LUKS_CREATE_OPTIONS : "", enc ? "," : "",
                                                cluster);
        g_autofree char *sz = g_strdup_printf("%" G_GUINT64_FORMAT, size);
        g_autofree char *src = chain_opts(path, "sold", below, "sold");
        g_autofree char *dst = chain_opts(tmp, enc ? "snew" : NULL, below, "sold");
        const char *create_head[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                                      backing, "-F", "qcow2", NULL };
        const char *create_tail[] = { "-o", opts, tmp, sz, NULL };
        const char *convert_head[] = { "qemu-img", "convert", "-q", "-n", "-B", backing, NULL };
        const char *convert_tail[] = { "--image-opts", src, "--target-image-opts", dst, NULL };
        const char *compare_head[] = { "qemu-img", "compare", "-q", NULL };
        const char *compare_tail[] = { "--image-opts", src, dst, NULL };
        g_autoptr(GPtrArray) create = tool_argv(create_head, enc, create_tail);
        g_autoptr(GPtrArray) convert = tool_argv(convert_head, enc, convert_tail);
        g_autoptr(GPtrArray) compare = tool_argv(compare_head, enc, compare_tail);
        for (int attempt = 0; attempt < LUKS_CREATE_ATTEMPTS; attempt++) {
                if (attempt > 0)
                        g_usleep((gulong) (100000 << attempt)); /* as nkp_disk_convert */
                g_clear_pointer(&err, g_free);
                (void) nkp_unlink_nofollow(tmp);
                r = run_tool_argv(create, secrets, n, &err);
                if (r == 0 || !enc || !err || !strstr(err, "accurate CPU usage"))
                        break;
        }
        if (r == 0) {
                g_clear_pointer(&err, g_free);
                r = run_tool_argv(convert, secrets, n, &err);
        }
        if (r == 0) {
                nkp_test_crash_point("disk-copied");
                g_clear_pointer(&err, g_free);
                r = run_tool_argv(compare, secrets, n, &err);
                if (r > 0)
                        r = nkp_fail(-EIO, "The converted copy of the snapshot layer '%s' "
                                           "differs from it (qemu-img compare: %s); it was "
                                           "removed and nothing was changed.",
                                     path, err && err[0] ? err : "differs");
        } else if (r > 0) {
                r = nkp_fail(-EIO, "qemu-img could not convert the snapshot layer '%s': %s. "
                                   "Nothing was changed.",
                             path, err && err[0] ? err : "no detail");
        }
        if (r == 0 && (r = finish_copy(tmp, path)) < 0)
                r = nkp_fail(r, "Cannot finish the converted copy of '%s': %s.", path,
                             g_strerror(-r));
        if (r < 0)
                (void) nkp_unlink_nofollow(tmp);
        return r;
}

/* ---- the vTPM: swtpm ------------------------------------------------------- */
/* swtpm assumes every state file is encrypted once it is given a key, so a
 * clear state cannot simply be opened with one.  The state is moved through
 * swtpm's own state-blob interface instead (swtpm's sockets, pid and log
 * files and the state copies in a 0700 work directory beside the state,
 * <swtpm>/<uuid>/.nkp-work; the decrypted blobs in memfds only):
 *   A: swtpm on a copy of the current state (old key or none),
 *      not-need-init; swtpm_ioctl --save permanent → the decrypted blob
 *   B: swtpm on an empty dir with the new key (or none);
 *      swtpm_ioctl --load permanent, --init, --shutdown → B writes the state
 *      under the new key
 *   C: swtpm on B's dir with the new key, not-need-init; --save must work
 *      (proves that the new state opens under the new key)
 * The work directory is removed at the end.  The current state is only
 * replaced (journal.c) once the new one is complete and verified. */

static char *vtpm_work_dir(const nkp_context *ctx, const NkpDomain *d)
{
        g_autofree char *file = nkp_vtpm_state_file(ctx, d);
        g_autofree char *dir = g_path_get_dirname(file);
        g_autofree char *parent = g_path_get_dirname(dir);
        return g_build_filename(parent, NKP_JOURNAL_SCRATCH_NAME, NULL);
}

char *nkp_vtpm_scratch_dir(const nkp_context *ctx, const NkpDomain *d)
{
        return vtpm_work_dir(ctx, d);
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
        nkp_secret *keys[1] = { (nkp_secret *) key };
        int r = run_argv(argv, keys, key ? 1 : 0, NULL);
        if (r < 0)
                return r;
        if (r != 0 || !wait_for_path(ctrl_path, 5000))
                return nkp_fail(-EIO, "swtpm could not open the vTPM state '%s' (see '%s/%s.log').",
                                state, work, tag);
        return 0;
}

static int swtpm_ioctl(const char *work, const char *tag, const char *what, int blob_fd)
{
        g_autofree char *ctrl = g_strdup_printf("%s/%s.ctrl", work, tag);
        /* The blob is the child's fd 3 (no keys on pipes here). */
        const char *argv[7] = { "swtpm_ioctl", "--unix", ctrl, what, NULL };
        if (blob_fd >= 0) {
                argv[4] = "permanent";
                argv[5] = "/proc/self/fd/3";
        }
        const NkpToolRun run = { .argv = argv, .blob_fd = blob_fd };
        return nkp_tool_run(&run, NULL);
}

static void swtpm_down(const char *work, const char *tag)
{
        g_autofree char *pidf = g_strdup_printf("%s/%s.pid", work, tag);
        (void) swtpm_ioctl(work, tag, "-s", -1);
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

/* A state blob's home: anonymous memory (tmpfs), never a file on disk. */
static int blob_new(void)
{
        int fd = memfd_create("nkp-vtpm-blob", MFD_CLOEXEC);
        if (fd < 0)
                return nkp_fail(-errno, "Cannot make room in memory for the vTPM state: %s.",
                                g_strerror(errno));
        return fd;
}

/* Zeroes the blob's pages before they go back to the kernel. */
static void blob_free(int fd)
{
        if (fd < 0)
                return;
        struct stat st;
        if (fstat(fd, &st) == 0 && st.st_size > 0) {
                void *p = mmap(NULL, (size_t) st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                               fd, 0);
                if (p != MAP_FAILED) {
                        nkp_wipe(p, (size_t) st.st_size);
                        munmap(p, (size_t) st.st_size);
                }
                (void) ftruncate(fd, 0);
        }
        close(fd);
}

static int swtpm_blob(const char *work, const char *tag, const char *what, int blob_fd)
{
        int r = swtpm_ioctl(work, tag, what, blob_fd);
        if (r < 0)
                return r;
        return r == 0 ? 0 : nkp_fail(-EIO, "swtpm_ioctl %s failed on the vTPM state.", what);
}

/* The work directory, never following a symlink planted in it or at it. */
static void rm_rf(const char *path)
{
        nkp_remove_tree(path);
}

/* B: a new state under `new_key` from the blob. */
static int vtpm_write_new(const char *work, const char *newdir, const nkp_secret *new_key,
                          int blob)
{
        int r = swtpm_up(work, "b", newdir, new_key, true);
        if (r < 0)
                return r;
        r = swtpm_blob(work, "b", "--load", blob);
        if (r == 0 && swtpm_ioctl(work, "b", "-i", -1) != 0)
                r = nkp_fail(-EIO, "swtpm could not start on the converted vTPM state.");
        swtpm_down(work, "b");
        return r;
}

/* C: the new state must open under the new key, and be (not) encrypted. */
static int vtpm_verify(const NkpDomain *d, const char *work, const char *newdir,
                       const char *new_file, const nkp_secret *new_key)
{
        int check = blob_new();
        if (check < 0)
                return check;
        int r = swtpm_up(work, "c", newdir, new_key, false);
        if (r == 0) {
                r = swtpm_blob(work, "c", "--save", check);
                swtpm_down(work, "c");
        }
        blob_free(check);
        if (r < 0)
                return r;
        int fd = open(new_file, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        uint8_t h[6] = { 0 };
        bool ok = fd >= 0 && read(fd, h, sizeof h) == (ssize_t) sizeof h;
        if (fd >= 0)
                close(fd);
        bool enc = ok && (h[5] & 1);
        if (!ok || enc != (new_key != NULL))
                return nkp_fail(-EIO, "The converted vTPM state of VM '%s' is not %s as "
                                      "expected; nothing was changed.",
                                d->name, new_key ? "encrypted" : "clear");
        return 0;
}

static int vtpm_refuse_volatile(const NkpDomain *d, const char *state)
{
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
        return 0;
}

int nkp_vtpm_convert(const nkp_context *ctx, const NkpDomain *d, const nkp_secret *old_key,
                     const nkp_secret *new_key)
{
        g_autofree char *src_file = nkp_vtpm_state_file(ctx, d);
        g_autofree char *state = g_path_get_dirname(src_file);
        g_autofree char *work = vtpm_work_dir(ctx, d);
        int r = vtpm_refuse_volatile(d, state);
        if (r < 0)
                return r;
        rm_rf(work);
        g_autofree char *newdir = g_build_filename(work, "new", NULL);
        g_autofree char *cur = g_build_filename(work, "cur", NULL);
        g_autofree char *base = g_path_get_basename(src_file);
        g_autofree char *cur_file = g_build_filename(cur, base, NULL);
        g_autofree char *new_file = g_build_filename(newdir, base, NULL);
        if (nkp_mkdir_private(newdir) < 0 || nkp_mkdir_private(cur) < 0)
                return nkp_fail_prefix(-EIO, "Cannot make the work directory '%s'", work);
        /* A copy of the state as it is on disk (old key or clear, never
         * clearer): swtpm may rewrite what it opens. */
        g_autofree char *data = NULL;
        gsize len = 0;
        if (!g_file_get_contents(src_file, &data, &len, NULL) ||
            nkp_write_file_atomic(cur_file, data, len, 0600, true) < 0) {
                rm_rf(work);
                return nkp_fail(-EIO, "Cannot copy the vTPM state '%s'.", src_file);
        }
        int blob = blob_new();
        r = blob < 0 ? blob : swtpm_up(work, "a", cur, old_key, false);
        if (r == 0) {
                r = swtpm_blob(work, "a", "--save", blob);
                swtpm_down(work, "a");
        }
        if (r == 0)
                r = vtpm_write_new(work, newdir, new_key, blob);
        blob_free(blob);
        if (r == 0)
                r = vtpm_verify(d, work, newdir, new_file, new_key);
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

int nkp_vtpm_stage(const nkp_context *ctx, const NkpDomain *d)
{
        g_autofree char *src = nkp_vtpm_state_file(ctx, d);
        g_autofree char *work = vtpm_work_dir(ctx, d);
        g_autofree char *base = g_path_get_basename(src);
        g_autofree char *made = g_build_filename(work, "new", base, NULL);
        g_autofree char *dst = g_strconcat(src, ".nkp-new", NULL);
        int fd = open(made, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        int r = fd < 0 || fsync(fd) < 0 ? -errno : nkp_rename_nofollow(made, dst);
        if (r < 0) {
                int e = -r;
                if (fd >= 0)
                        close(fd);
                return nkp_fail(-e, "Cannot put the new vTPM state of VM '%s' beside '%s': %s.",
                                d->name, src, g_strerror(e));
        }
        close(fd);
        (void) nkp_fsync_dir_of(dst);
        rm_rf(work);
        return 0;
}

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* `nkpctl vm clone` killed at each crash point (plugin/lib/vm-clone.c,
 * docs/crash-safety.md "vm clone"), in both modes (new keys, --same-keys),
 * with the REAL qemu-img and qemu-io and libvirt's test driver
 * (test:///FILE, a shut-off domain vm1 with one 1 MiB disk encrypted by
 * nkp_vm_encrypt, 'A' written in its first 64 KiB).
 *
 * Each clone is killed in a child (NKP_TEST_CRASH_AT), then run again
 * in-process: it completes (defined, the record gone), its disk is a LUKS
 * qcow2 that reads 'A' under the clone's key (new keys: not under the
 * original's; --same-keys: under the original's too), the source file is
 * byte for byte what it was, and the images directory holds no .nkp-new
 * and no file but the source and the finished clones' disks.
 *
 * The test driver keeps its state in the memory of the process that opened
 * it: the child's define is lost when it dies.  So a kill at
 * clone-defined is checked in two halves: the rerun after the real kill
 * (no clone defined: redone from the start), then the record put back as
 * the killed run leaves it with real libvirt (naming the now defined
 * clone's UUID): the rerun only removes the record, the disk untouched.
 *
 * Refusals, nothing removed: a foreign file at the clone's path; a killed
 * clone's record with the rerun naming another path where a foreign file
 * is; a recorded path that now holds a file the clone did not make (not
 * LUKS, or a symlink to the source).  Locks: a second clone to the same
 * name, or a clone while another command holds the source, refused at
 * once, nothing written.  Every LUKS creation costs seconds
 * of QEMU's PBKDF benchmark: one fixture per mode, one small disk. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

#define VM_UUID "5c1f0a3e-7b2d-4e8f-9a6c-3d4e5f6a7b8c"

typedef struct {
        char *root;
        char *images;
        char *base;    /* ROOT/images/vm1.qcow2 */
        char *keyfile; /* the test's copy of a hex DEK, for qemu-io */
        char *base_sum;
        GPtrArray *made; /* basenames of the finished clones' disks */
        nkp_context *ctx;
        NkpVirt *v;
} Fixture;

static const char *const points[] = { "clone-recorded", "clone-disk-written",
                                      "clone-disk-renamed", "clone-defined" };


static char *file_sum(const char *path)
{
        g_autofree char *data = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(path, &data, &len, NULL));
        return g_compute_checksum_for_data(G_CHECKSUM_SHA256, (const guchar *) data, len);
}

/* `file` reads 'A' in its first 64 KiB under the key `value`. */
static bool reads_marker(Fixture *f, const char *file, const nkp_secret *value)
{
        g_assert_true(g_file_set_contents(f->keyfile, (const char *) nkp_secret_data(value),
                                          (gssize) nkp_secret_len(value), NULL));
        g_autofree char *obj = g_strdup_printf("secret,id=k,file=%s,format=raw", f->keyfile);
        g_autofree char *o =
                g_strdup_printf("driver=qcow2,file.filename=%s,encrypt.key-secret=k", file);
        const char *argv[] = { "qemu-io", "--object", obj, "--image-opts", o,
                               "-c",      "read -P 0x41 0 64k", NULL };
        g_autofree char *out = NULL;
        int r = testutil_run_tool(argv, &out);
        (void) unlink(f->keyfile);
        return r == 0 && !strstr(out, "failed");
}

/* The key of `name`'s disk vda, unwrapped from its keysafe. */
static nkp_secret *disk_key(Fixture *f, const char *name)
{
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        g_autoptr(GPtrArray) secrets = NULL;
        g_assert_cmpint(nkp_vm_definition(f->v, name, &xml, &d), ==, 0);
        g_assert_cmpint(nkp_vm_unlock(f->ctx, d, true, &secrets), ==, 0);
        for (guint i = 0; i < secrets->len; i++) {
                NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->object_id, "vda") == 0)
                        return g_steal_pointer(&s->value);
        }
        g_assert_not_reached();
}

static char *record_of(Fixture *f, const char *name)
{
        g_autofree char *base = g_strconcat(name, ".ini", NULL);
        return g_build_filename(f->root, "var/lib/nkp/clones", base, NULL);
}

static char *clone_disk(Fixture *f, const char *name)
{
        g_autofree char *base = g_strconcat(name, "-vda.qcow2", NULL);
        return g_build_filename(f->images, base, NULL);
}

/* ---- the fixture ------------------------------------------------------------ */

static void fixture_set_up(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!testutil_have_qemu_tools()) {
                g_test_skip("qemu-img/qemu-io not installed");
                return;
        }
        f->root = testutil_mkdtemp();
        f->ctx = testutil_context_with_conf(f->root, NULL);
        testutil_default_provider(f->ctx, "p1");
        f->images = g_build_filename(f->root, "images", NULL);
        g_assert_cmpint(g_mkdir_with_parents(f->images, 0700), ==, 0);
        f->base = g_build_filename(f->images, "vm1.qcow2", NULL);
        f->keyfile = g_build_filename(f->root, "key", NULL);
        f->made = g_ptr_array_new_with_free_func(g_free);
        const char *create[] = { "qemu-img", "create", "-q", "-f", "qcow2", f->base, "1M", NULL };
        g_assert_cmpint(testutil_run_tool(create, NULL), ==, 0);
        g_autofree char *o = g_strdup_printf("driver=qcow2,file.filename=%s", f->base);
        const char *io[] = { "qemu-io", "--image-opts", o, "-c", "write -P 0x41 0 64k", NULL };
        g_assert_cmpint(testutil_run_tool(io, NULL), ==, 0);

        f->v = testutil_test_driver_vm1(f->root, VM_UUID, f->base);
        g_autoptr(nkp_vm_result) res = NULL;
        if (nkp_vm_encrypt(f->ctx, f->v, "vm1", NULL, NULL, &res) < 0)
                g_error("encrypt: %s", nkp_error_message());
        g_assert_cmpint(nkp_qcow2_is_luks(f->base), ==, 1);
        f->base_sum = file_sum(f->base);
}

static void fixture_tear_down(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!f->root)
                return;
        nkp_virt_close(f->v);
        nkp_context_free(f->ctx);
        testutil_rmtree(f->root);
        g_free(f->root);
        g_free(f->images);
        g_free(f->base);
        g_free(f->keyfile);
        g_free(f->base_sum);
        g_ptr_array_unref(f->made);
}

/* ---- checks ------------------------------------------------------------------- */

/* The images directory holds the source, the finished clones' disks and
 * `extra` (NULL or a basename), nothing else. */
static void assert_images(Fixture *f, const char *extra)
{
        g_autoptr(GDir) dir = g_dir_open(f->images, 0, NULL);
        g_assert_nonnull(dir);
        guint n = 0;
        for (const char *e; (e = g_dir_read_name(dir)); n++) {
                bool known = strcmp(e, "vm1.qcow2") == 0 || g_strcmp0(e, extra) == 0;
                for (guint i = 0; !known && i < f->made->len; i++)
                        known = strcmp(e, f->made->pdata[i]) == 0;
                if (!known)
                        g_error("a stray file in the images directory: %s", e);
        }
        g_assert_cmpuint(n, ==, 1 + f->made->len + (extra ? 1 : 0));
        g_autofree char *sum = file_sum(f->base);
        g_assert_cmpstr(sum, ==, f->base_sum);
}

/* `name` is a complete clone of vm1: defined on its own disk, LUKS under
 * its own key (the original's with same_keys), no record left. */
static void assert_clone(Fixture *f, const char *name, bool same_keys)
{
        g_autofree char *disk = clone_disk(f, name);
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        g_assert_cmpint(nkp_vm_definition(f->v, name, &xml, &d), ==, 0);
        g_assert_nonnull(d->keysafe);
        g_assert_cmpstr(d->uuid, !=, VM_UUID);
        g_autofree char *src = g_strdup_printf("file='%s'", disk);
        g_assert_nonnull(strstr(xml, src));
        g_assert_cmpint(nkp_qcow2_is_luks(disk), ==, 1);
        g_autoptr(nkp_secret) mine = disk_key(f, name);
        g_autoptr(nkp_secret) orig = disk_key(f, "vm1");
        g_assert_true(reads_marker(f, disk, mine));
        g_assert_true(reads_marker(f, disk, orig) == same_keys);
        g_assert_true(reads_marker(f, f->base, orig));
        g_autofree char *rec = record_of(f, name);
        g_assert_false(g_file_test(rec, G_FILE_TEST_EXISTS));
        g_ptr_array_add(f->made, g_path_get_basename(disk));
        assert_images(f, NULL);
}

/* The clone of vm1 as `name`, killed at `point` in a child. */
static void clone_killed(Fixture *f, const char *name, unsigned flags, const char *point)
{
        pid_t pid = fork();
        g_assert_cmpint(pid, >=, 0);
        if (pid == 0) {
                g_setenv("NKP_TEST_CRASH_AT", point, TRUE);
                (void) nkp_vm_clone(f->ctx, f->v, "vm1", name, NULL, flags);
                _exit(3); /* the crash point was not reached */
        }
        int status = 0;
        g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
        g_assert_true(WIFSIGNALED(status));
        g_assert_cmpint(WTERMSIG(status), ==, SIGKILL);
        g_autofree char *rec = record_of(f, name);
        g_assert_true(g_file_test(rec, G_FILE_TEST_IS_REGULAR));
        struct stat st;
        g_assert_cmpint(stat(rec, &st), ==, 0);
        g_assert_cmpint(st.st_mode & 0777, ==, 0600);
}

static void clone_ok(Fixture *f, const char *name, unsigned flags)
{
        if (nkp_vm_clone(f->ctx, f->v, "vm1", name, NULL, flags) < 0)
                g_error("clone %s: %s", name, nkp_error_message());
}

/* The record as a kill right after the define leaves it (real libvirt
 * keeps the define): the clone `name` is defined, its record names it. */
static void put_record_back(Fixture *f, const char *name)
{
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        g_assert_cmpint(nkp_vm_definition(f->v, name, &xml, &d), ==, 0);
        g_autofree char *disk = clone_disk(f, name);
        g_autofree char *text = g_strdup_printf("[clone]\nversion=1\nsource=vm1\nuuid=%s\n"
                                                "files=%s;\n",
                                                d->uuid, disk);
        g_autofree char *rec = record_of(f, name);
        g_assert_cmpint(nkp_write_file_atomic(rec, text, strlen(text), 0600, false), ==, 0);
}

/* ---- the tests ------------------------------------------------------------------ */

static void test_clone_crash(Fixture *f, gconstpointer data)
{
        unsigned flags = GPOINTER_TO_UINT(data);
        bool same_keys = flags & NKP_VM_CLONE_SAME_KEYS;
        if (!f->root)
                return;
        for (size_t i = 0; i < G_N_ELEMENTS(points); i++) {
                g_autofree char *name = g_strdup_printf("c%zu", i);
                g_autofree char *disk = clone_disk(f, name);
                g_autofree char *tmp = g_strconcat(disk, ".nkp-new", NULL);
                g_test_message("killed at %s", points[i]);
                clone_killed(f, name, flags, points[i]);
                /* What the kill left: the copy, or the renamed disk. */
                if (strcmp(points[i], "clone-disk-written") == 0)
                        g_assert_true(g_file_test(tmp, G_FILE_TEST_IS_REGULAR));
                if (strcmp(points[i], "clone-disk-renamed") == 0 ||
                    strcmp(points[i], "clone-defined") == 0)
                        g_assert_cmpint(nkp_qcow2_is_luks(disk), ==, 1);
                clone_ok(f, name, flags);
                assert_clone(f, name, same_keys);
                if (strcmp(points[i], "clone-defined") != 0)
                        continue;
                /* The other half: killed after a define that libvirt kept. */
                put_record_back(f, name);
                g_autofree char *before = file_sum(disk);
                clone_ok(f, name, flags);
                g_autofree char *after = file_sum(disk);
                g_assert_cmpstr(after, ==, before);
                g_autofree char *rec = record_of(f, name);
                g_assert_false(g_file_test(rec, G_FILE_TEST_EXISTS));
                assert_images(f, NULL);
        }
}

/* A file the clone did not make stops it, untouched, nothing else changed. */
static void assert_refused(Fixture *f, const char *name, const char *const *files,
                           const char *foreign, const char *content)
{
        g_assert_cmpint(nkp_vm_clone(f->ctx, f->v, "vm1", name, files, NKP_VM_CLONE_SAME_KEYS),
                        ==, -EEXIST);
        g_assert_nonnull(strstr(nkp_error_message(), foreign));
        g_assert_nonnull(strstr(nkp_error_message(), "exists already"));
        nkp_error_clear();
        g_autofree char *got = NULL;
        g_assert_true(g_file_get_contents(foreign, &got, NULL, NULL));
        g_assert_cmpstr(got, ==, content);
        g_autofree char *xml = NULL;
        g_assert_cmpint(nkp_virt_domain_xml(f->v, name, true, &xml), ==, -ENOENT);
        nkp_error_clear();
}

static void test_foreign_refused(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!f->root)
                return;
        /* No record: a file at the clone's path. */
        g_autofree char *d1 = clone_disk(f, "f1");
        g_assert_true(g_file_set_contents(d1, "mine", -1, NULL));
        assert_refused(f, "f1", NULL, d1, "mine");
        g_autofree char *rec1 = record_of(f, "f1");
        g_assert_false(g_file_test(rec1, G_FILE_TEST_EXISTS));
        g_autofree char *b1 = g_path_get_basename(d1);
        assert_images(f, b1);
        g_assert_cmpint(unlink(d1), ==, 0);

        /* A killed clone's record; the rerun names another path, where a
         * foreign .nkp-new is: refused, the record and the foreign file kept. */
        clone_killed(f, "f2", NKP_VM_CLONE_SAME_KEYS, "clone-recorded");
        g_autofree char *other = g_build_filename(f->images, "other.qcow2", NULL);
        g_autofree char *other_tmp = g_strconcat(other, ".nkp-new", NULL);
        g_assert_true(g_file_set_contents(other_tmp, "theirs", -1, NULL));
        g_autofree char *arg = g_strdup_printf("vda=%s", other);
        const char *files[] = { arg, NULL };
        assert_refused(f, "f2", files, other_tmp, "theirs");
        g_autofree char *rec2 = record_of(f, "f2");
        g_assert_true(g_file_test(rec2, G_FILE_TEST_IS_REGULAR));
        g_assert_cmpint(unlink(other_tmp), ==, 0);

        /* The recorded path now holds a file the clone did not make (the
         * kill came before it): refused, kept. */
        g_autofree char *d2 = clone_disk(f, "f2");
        g_assert_true(g_file_set_contents(d2, "admin's", -1, NULL));
        assert_refused(f, "f2", NULL, d2, "admin's");
        g_assert_true(g_file_test(rec2, G_FILE_TEST_IS_REGULAR));
        g_assert_cmpint(unlink(d2), ==, 0);

        /* ... or a symlink to a LUKS qcow2 (the source itself): refused,
         * the link and the source kept. */
        g_assert_cmpint(symlink(f->base, d2), ==, 0);
        g_assert_cmpint(nkp_vm_clone(f->ctx, f->v, "vm1", "f2", NULL, NKP_VM_CLONE_SAME_KEYS),
                        ==, -EEXIST);
        nkp_error_clear();
        g_assert_true(g_file_test(d2, G_FILE_TEST_IS_SYMLINK));
        g_autofree char *b2 = g_path_get_basename(d2);
        assert_images(f, b2);
        g_assert_cmpint(unlink(d2), ==, 0);

        /* Gone: the rerun finishes the clone. */
        clone_ok(f, "f2", NKP_VM_CLONE_SAME_KEYS);
        assert_clone(f, "f2", true);
}

/* The clone of vm1 as `name` refused with -EBUSY and `why`: no record, no
 * file, nothing defined. */
static void assert_busy(Fixture *f, const char *name, const char *why)
{
        g_assert_cmpint(nkp_vm_clone(f->ctx, f->v, "vm1", name, NULL, 0), ==, -EBUSY);
        g_assert_nonnull(strstr(nkp_error_message(), why));
        nkp_error_clear();
        g_autofree char *rec = record_of(f, name);
        g_assert_false(g_file_test(rec, G_FILE_TEST_EXISTS));
        g_autofree char *xml = NULL;
        g_assert_cmpint(nkp_virt_domain_xml(f->v, name, true, &xml), ==, -ENOENT);
        nkp_error_clear();
        assert_images(f, NULL);
}

/* A second clone to the same NEW while one runs (NEW's lock held), or a
 * clone while another command changes the source (the source VM's lock
 * held): refused at once with the reason, nothing written; once the
 * lock is free the clone runs. */
static void test_locked(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!f->root)
                return;
        g_autofree char *lock_path = g_build_filename(f->root, "var/lib/nkp/clones/l1.lock", NULL);
        g_autofree char *dir = g_path_get_dirname(lock_path);
        g_assert_cmpint(g_mkdir_with_parents(dir, 0700), ==, 0);
        int fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        g_assert_cmpint(fd, >=, 0);
        g_assert_cmpint(flock(fd, LOCK_EX | LOCK_NB), ==, 0);
        assert_busy(f, "l1", "Another nkpctl vm clone to 'l1' is running");
        close(fd);

        int vm_lock = -1;
        g_assert_cmpint(nkp_vm_lock(f->ctx, VM_UUID, true, 0, &vm_lock), ==, 0);
        assert_busy(f, "l1", "VM 'vm1' is being changed by another nkpctl command");
        nkp_journal_unlock(vm_lock);

        clone_ok(f, "l1", 0);
        assert_clone(f, "l1", false);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
#define ADD(name, data, fn) \
        g_test_add(name, Fixture, data, fixture_set_up, fn, fixture_tear_down)
        ADD("/clone/crash/new-keys", GUINT_TO_POINTER(0), test_clone_crash);
        ADD("/clone/crash/same-keys", GUINT_TO_POINTER(NKP_VM_CLONE_SAME_KEYS),
            test_clone_crash);
        ADD("/clone/foreign-refused", NULL, test_foreign_refused);
        ADD("/clone/locked", NULL, test_locked);
        return g_test_run();
}

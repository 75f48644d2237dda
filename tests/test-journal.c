/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* journal.c: the conversion journal, its lock, and reconciling the files
 * {P, P.nkp-new, P.nkp-old} with the old or the new definition. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

#define OLD_SIG "none"
#define NEW_SIG "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

typedef struct {
        char *root;
        nkp_context *ctx;
        char *dir; /* where the VM's files are */
} Fixture;

static void fixture_set_up(Fixture *f, gconstpointer data)
{
        (void) data;
        f->root = testutil_mkdtemp();
        g_assert_cmpint(nkp_context_new(f->root, &f->ctx), ==, 0);
        f->dir = g_build_filename(f->root, "images", NULL);
        g_assert_cmpint(g_mkdir_with_parents(f->dir, 0700), ==, 0);
}

static void fixture_tear_down(Fixture *f, gconstpointer data)
{
        (void) data;
        nkp_context_free(f->ctx);
        testutil_rmtree(f->root);
        g_free(f->root);
        g_free(f->dir);
}

static const char *vm_uuid = "6f1c1a8e-1d0e-4b57-9b44-0d9a3c1f2e77";

static NkpJournal *journal_for(Fixture *f, const char **files, NkpJournalPhase phase)
{
        NkpJournal *j = nkp_journal_new("encrypt", "vm1", vm_uuid, OLD_SIG, NEW_SIG);
        for (const char **p = files; *p; p++)
                g_ptr_array_add(j->files, g_build_filename(f->dir, *p, NULL));
        j->phase = phase;
        return j;
}

static void put(const char *path, const char *text)
{
        g_assert_true(g_file_set_contents(path, text, -1, NULL));
}

/* "" for absent. */
static char *get(const char *path)
{
        char *text = NULL;
        if (!g_file_get_contents(path, &text, NULL, NULL))
                return g_strdup("");
        return text;
}

static bool journal_exists(Fixture *f)
{
        g_autofree char *p = nkp_journal_path(f->ctx, vm_uuid);
        return access(p, F_OK) == 0;
}

/* ---- round trip, no keys ----------------------------------------------------- */

static void test_round_trip(Fixture *f, gconstpointer data)
{
        (void) data;
        const char *files[] = { "a.qcow2", "tpm2-00.permall", NULL };
        g_autoptr(NkpJournal) j = journal_for(f, files, NKP_JOURNAL_READY);
        g_ptr_array_add(j->scratch, g_build_filename(f->dir, ".nkp-work", NULL));
        g_assert_cmpint(nkp_journal_save(f->ctx, j), ==, 0);

        g_autoptr(NkpJournal) back = NULL;
        g_assert_cmpint(nkp_journal_load(f->ctx, vm_uuid, &back), ==, 0);
        g_assert_cmpstr(back->op, ==, "encrypt");
        g_assert_cmpstr(back->vm_name, ==, "vm1");
        g_assert_cmpstr(back->vm_uuid, ==, vm_uuid);
        g_assert_cmpint(back->phase, ==, NKP_JOURNAL_READY);
        g_assert_cmpstr(back->old_sig, ==, OLD_SIG);
        g_assert_cmpstr(back->new_sig, ==, NEW_SIG);
        g_assert_cmpuint(back->files->len, ==, 2);
        g_assert_cmpstr(back->files->pdata[1], ==, j->files->pdata[1]);
        g_assert_cmpuint(back->scratch->len, ==, 1);

        g_autofree char *path = nkp_journal_path(f->ctx, vm_uuid);
        struct stat st;
        g_assert_cmpint(stat(path, &st), ==, 0);
        g_assert_cmpint(st.st_mode & 07777, ==, 0600);

        /* Uppercase UUIDs name the same journal. */
        g_autoptr(NkpJournal) upper = NULL;
        g_autofree char *uu = g_ascii_strup(vm_uuid, -1);
        g_assert_cmpint(nkp_journal_load(f->ctx, uu, &upper), ==, 0);

        g_assert_cmpint(nkp_journal_remove(f->ctx, vm_uuid), ==, 0);
        g_autoptr(NkpJournal) none = NULL;
        g_assert_cmpint(nkp_journal_load(f->ctx, vm_uuid, &none), ==, -ENOENT);
}

static void test_damaged(Fixture *f, gconstpointer data)
{
        (void) data;
        const char *files[] = { "a.qcow2", NULL };
        g_autoptr(NkpJournal) j = journal_for(f, files, NKP_JOURNAL_CONVERTING);
        g_assert_cmpint(nkp_journal_save(f->ctx, j), ==, 0);
        g_autofree char *path = nkp_journal_path(f->ctx, vm_uuid);
        g_autofree char *text = get(path);
        char *phase = strstr(text, "phase=converting");
        g_assert_nonnull(phase);
        memcpy(phase, "phase=convertinX", strlen("phase=convertinX"));
        g_assert_cmpint(nkp_write_file_atomic(path, text, strlen(text), 0600, false), ==, 0);
        g_autoptr(NkpJournal) back = NULL;
        g_assert_cmpint(nkp_journal_load(f->ctx, vm_uuid, &back), ==, -EBADMSG);
        g_assert_cmpint(nkp_journal_load(f->ctx, "not-a-uuid", &back), ==, -EINVAL);
}

static char *hand_made(const char *uuid, const char *files, const char *scratch)
{
        return g_strdup_printf("[journal]\nversion=1\nop=encrypt\nname=vm1\nuuid=%s\n"
                               "phase=converting\nold=none\nnew=" NEW_SIG "\nfiles=%s\n"
                               "scratch=%s\n",
                               uuid, files, scratch);
}

/* Recovery renames the files a journal names and deletes its scratch
 * directories: paths nkp would never write are refused on save (nothing
 * written) and on load (a damaged journal names nothing it can harm). */
static void test_paths_confined(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *path = nkp_journal_path(f->ctx, vm_uuid);
        const char *bad_files[] = { "images/a.qcow2", "/var/lib/../../etc/shadow", "/a/./b",
                                    "/var//a.qcow2" };
        for (size_t i = 0; i < G_N_ELEMENTS(bad_files); i++) {
                g_autoptr(NkpJournal) j = nkp_journal_new("encrypt", "vm1", vm_uuid, OLD_SIG, NEW_SIG);
                g_ptr_array_add(j->files, g_strdup(bad_files[i]));
                g_assert_cmpint(nkp_journal_save(f->ctx, j), ==, -EINVAL);
                g_assert_nonnull(strstr(nkp_error_message(), "Nothing was changed"));
                g_assert_false(g_file_test(path, G_FILE_TEST_EXISTS));
        }

        /* Hand-made journals: a scratch entry must be an nkp work directory. */
        struct {
                const char *files, *scratch;
                int expect;
        } cases[] = {
                { "/img/a.qcow2", "/var/lib/libvirt/swtpm/.nkp-work", 0 },
                { "/img/a.qcow2", "/", -EBADMSG },
                { "/img/a.qcow2", "/var/lib/libvirt", -EBADMSG },
                { "/img/a.qcow2", "/x/../.nkp-work", -EBADMSG },
                { "img/a.qcow2", "", -EBADMSG },
                { "/img/../a.qcow2", "", -EBADMSG },
                { "/img//a.qcow2", "", -EBADMSG },
                { "/img/a.qcow2", "/var/lib/libvirt/swtpm/.nkp-work/", -EBADMSG },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                g_autofree char *text = hand_made(vm_uuid, cases[i].files, cases[i].scratch);
                g_autoptr(NkpJournal) j = NULL;
                int r = nkp_journal_parse(text, strlen(text), vm_uuid, "test", &j);
                g_assert_cmpint(r, ==, cases[i].expect);
                if (r == 0) {
                        g_assert_cmpuint(j->scratch->len, ==, 1);
                        g_assert_cmpstr(j->files->pdata[0], ==, "/img/a.qcow2");
                } else {
                        g_assert_null(j);
                        g_assert_nonnull(strstr(nkp_error_message(), "damaged"));
                }
        }
        /* Another VM's journal, and a journal whose uuid is no UUID. */
        g_autofree char *other = hand_made("0d9a3c1f-1d0e-4b57-9b44-6f1c1a8e2e77",
                                                 "/img/a.qcow2", "");
        g_autofree char *nouuid = hand_made("x", "/img/a.qcow2", "");
        g_autoptr(NkpJournal) j = NULL;
        g_assert_cmpint(nkp_journal_parse(other, strlen(other), vm_uuid, "test", &j), ==, -EBADMSG);
        g_assert_cmpint(nkp_journal_parse(nouuid, strlen(nouuid), NULL, "test", &j), ==, -EBADMSG);
        g_assert_cmpint(nkp_journal_parse(other, strlen(other), NULL, "test", &j), ==, 0);
}

static bool contains(const char *hay, gsize len, const void *needle, gsize nlen)
{
        return memmem(hay, len, needle, nlen) != NULL;
}

static void test_no_key_bytes(Fixture *f, gconstpointer data)
{
        (void) data;
        /* A real keysafe with a DEK: the journal of a conversion to it holds
         * its (public) KEK salt as the signature, and no key byte. */
        g_autoptr(nkp_secret) kdk = NULL, kek = NULL, dek = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(NKP_DEK_SIZE, &dek), ==, 0);
        g_autofree char *fp = NULL;
        g_assert_cmpint(nkp_kdk_fingerprint(kdk, &fp), ==, 0);
        const char *key_id = "0f0e0d0c-0b0a-4908-8706-050403020100";
        g_autoptr(nkp_keysafe) ks = NULL;
        g_assert_cmpint(nkp_keysafe_new_for(vm_uuid, "p1", key_id, fp, &ks), ==, 0);
        g_assert_cmpint(nkp_kek_derive(kdk, nkp_keysafe_kek_salt(ks), key_id, vm_uuid, &kek), ==, 0);
        g_assert_cmpint(nkp_keysafe_put_dek(ks, kek, NKP_OBJECT_DISK, "vda",
                                            "11111111-2222-4333-8444-555555555555", dek),
                        ==, 0);
        NkpDomain plain = { 0 }, enc = { 0 };
        enc.keysafe = ks;
        g_autofree char *old_sig = nkp_domain_signature(&plain);
        g_autofree char *new_sig = nkp_domain_signature(&enc);
        g_assert_cmpstr(old_sig, ==, "none");
        g_assert_cmpuint(strlen(new_sig), ==, 2 * NKP_KEK_SALT_SIZE);

        g_autoptr(NkpJournal) j = nkp_journal_new("encrypt", "vm1", vm_uuid, old_sig, new_sig);
        g_ptr_array_add(j->files, g_build_filename(f->dir, "a.qcow2", NULL));
        g_assert_cmpint(nkp_journal_save(f->ctx, j), ==, 0);
        g_autofree char *path = nkp_journal_path(f->ctx, vm_uuid);
        gsize len = 0;
        g_autofree char *text = NULL;
        g_assert_true(g_file_get_contents(path, &text, &len, NULL));
        g_assert_nonnull(strstr(text, new_sig));
        const nkp_secret *keys[] = { kdk, kek, dek };
        for (size_t i = 0; i < G_N_ELEMENTS(keys); i++) {
                size_t n = nkp_secret_len(keys[i]);
                g_autofree char *hex = g_malloc(2 * n + 1);
                nkp_hex_encode(nkp_secret_data(keys[i]), n, hex);
                g_assert_false(contains(text, len, nkp_secret_data(keys[i]), n));
                g_assert_false(contains(text, len, hex, 2 * n));
                g_autofree char *b64 = g_base64_encode(nkp_secret_data(keys[i]), n);
                g_assert_false(contains(text, len, b64, strlen(b64)));
        }
}

/* ---- the lock ------------------------------------------------------------------ */

static void test_lock(Fixture *f, gconstpointer data)
{
        (void) data;
        int fd = -1, fd2 = -1;
        g_assert_cmpint(nkp_journal_lock(f->ctx, vm_uuid, false, &fd), ==, -ENOENT);
        g_assert_cmpint(nkp_journal_lock(f->ctx, vm_uuid, true, &fd), ==, 0);
        /* flock belongs to the open file: a second open conflicts, even here. */
        g_assert_cmpint(nkp_journal_lock(f->ctx, vm_uuid, false, &fd2), ==, -EBUSY);
        g_assert_cmpint(nkp_journal_lock(f->ctx, vm_uuid, true, &fd2), ==, -EBUSY);
        nkp_journal_unlock(fd);
        g_assert_cmpint(nkp_journal_lock(f->ctx, vm_uuid, false, &fd2), ==, 0);
        nkp_journal_unlock(fd2);
        g_assert_cmpint(nkp_journal_lock(f->ctx, "../x", true, &fd), ==, -EINVAL);
}

/* ---- swapping ------------------------------------------------------------------- */

static void test_swap_idempotent(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *p = g_build_filename(f->dir, "a.qcow2", NULL);
        g_autofree char *pn = g_strconcat(p, ".nkp-new", NULL);
        g_autofree char *po = g_strconcat(p, ".nkp-old", NULL);
        put(p, "OLD");
        put(pn, "NEW");
        g_assert_cmpint(nkp_journal_swap_file(p), ==, 0);
        g_autofree char *a = get(p), *b = get(po), *c = get(pn);
        g_assert_cmpstr(a, ==, "NEW");
        g_assert_cmpstr(b, ==, "OLD");
        g_assert_cmpstr(c, ==, "");
        /* Again (a rerun after a crash right after the swap): no change. */
        g_assert_cmpint(nkp_journal_swap_file(p), ==, 0);
        g_autofree char *a2 = get(p), *b2 = get(po);
        g_assert_cmpstr(a2, ==, "NEW");
        g_assert_cmpstr(b2, ==, "OLD");
        /* The half-done swap (P already renamed away) is finished. */
        g_assert_cmpint(rename(p, pn), ==, 0);
        g_assert_cmpint(nkp_journal_swap_file(p), ==, 0);
        g_autofree char *a3 = get(p), *b3 = get(po);
        g_assert_cmpstr(a3, ==, "NEW");
        g_assert_cmpstr(b3, ==, "OLD");
}

/* ---- reconcile: every {P, new, old} presence x side x phase ----------------------- */

typedef struct {
        bool p, n, o;
} Presence;

/* What each name holds, as the protocol would have left it: P.nkp-old is
 * always the original; P is the new copy once P.nkp-old exists, else the
 * original while P.nkp-new exists; alone, P is whatever it was. */
static void lay_out(const char *p, Presence pr, const char *alone)
{
        g_autofree char *pn = g_strconcat(p, ".nkp-new", NULL);
        g_autofree char *po = g_strconcat(p, ".nkp-old", NULL);
        (void) unlink(p);
        (void) unlink(pn);
        (void) unlink(po);
        if (pr.p)
                put(p, pr.o ? "NEW" : pr.n ? "OLD" : alone);
        if (pr.n)
                put(pn, "NEW");
        if (pr.o)
                put(po, "OLD");
}

static char *describe(const char *p)
{
        g_autofree char *pn = g_strconcat(p, ".nkp-new", NULL);
        g_autofree char *po = g_strconcat(p, ".nkp-old", NULL);
        g_autofree char *a = get(p), *b = get(pn), *c = get(po);
        return g_strdup_printf("P=%s new=%s old=%s", a, b, c);
}

static void test_reconcile_matrix(Fixture *f, gconstpointer data)
{
        (void) data;
        const char *files[] = { "a.qcow2", NULL };
        g_autofree char *scratch = g_build_filename(f->dir, ".nkp-work", NULL);
        for (int bits = 0; bits < 8; bits++) {
                Presence pr = { bits & 1, bits & 2, bits & 4 };
                for (int forward = 0; forward < 2; forward++) {
                        for (int ph = 0; ph < 2; ph++) {
                                NkpJournalPhase phase = ph ? NKP_JOURNAL_READY
                                                           : NKP_JOURNAL_CONVERTING;
                                g_autoptr(NkpJournal) j = journal_for(f, files, phase);
                                g_ptr_array_add(j->scratch, g_strdup(scratch));
                                const char *p = j->files->pdata[0];
                                /* P alone is the original before the define
                                 * and the new copy after it. */
                                const char *alone = forward ? "NEW" : "OLD";
                                lay_out(p, pr, alone);
                                g_assert_cmpint(g_mkdir_with_parents(scratch, 0700), ==, 0);
                                g_autofree char *blob = g_build_filename(scratch, "blob", NULL);
                                put(blob, "decrypted vTPM state");
                                g_assert_cmpint(nkp_journal_save(f->ctx, j), ==, 0);
                                g_autofree char *before = describe(p);

                                bool ok;
                                if (!forward)
                                        ok = pr.o || pr.p;
                                else
                                        ok = phase == NKP_JOURNAL_READY &&
                                             !(pr.p && pr.n && pr.o) && (pr.n || pr.p);
                                NkpReconcile out = -1;
                                int r = nkp_journal_reconcile(f->ctx, j,
                                                              forward ? NEW_SIG : OLD_SIG, &out);
                                g_autofree char *after = describe(p);
                                g_test_message("P=%d new=%d old=%d %s %s: %s -> %s (r=%d)", pr.p,
                                               pr.n, pr.o, forward ? "forward" : "back",
                                               nkp_journal_phase_name(phase), before, after, r);
                                if (!ok) {
                                        g_assert_cmpint(r, <, 0);
                                        g_assert_cmpstr(after, ==, before);
                                        g_assert_true(journal_exists(f));
                                        g_assert_true(g_file_test(blob, G_FILE_TEST_EXISTS));
                                        nkp_journal_remove(f->ctx, vm_uuid);
                                        continue;
                                }
                                g_assert_cmpint(r, ==, 0);
                                g_assert_cmpint(out, ==,
                                                forward ? NKP_RECONCILE_FORWARD : NKP_RECONCILE_BACK);
                                g_autofree char *want = g_strdup_printf(
                                        "P=%s new= old=", forward ? "NEW" : "OLD");
                                g_assert_cmpstr(after, ==, want);
                                g_assert_false(journal_exists(f));
                                g_assert_false(g_file_test(scratch, G_FILE_TEST_EXISTS));
                        }
                }
        }
}

static void test_reconcile_unknown_side(Fixture *f, gconstpointer data)
{
        (void) data;
        const char *files[] = { "a.qcow2", NULL };
        g_autoptr(NkpJournal) j = journal_for(f, files, NKP_JOURNAL_READY);
        const char *p = j->files->pdata[0];
        lay_out(p, (Presence) { true, false, true }, "X");
        g_assert_cmpint(nkp_journal_save(f->ctx, j), ==, 0);
        g_autofree char *before = describe(p);
        g_assert_cmpint(nkp_journal_reconcile(f->ctx, j, "ffff", NULL), ==, -ESTALE);
        g_assert_nonnull(strstr(nkp_error_message(), "VM 'vm1'"));
        g_assert_nonnull(strstr(nkp_error_message(), "virsh define"));
        g_assert_cmpint(nkp_journal_reconcile(f->ctx, j, NULL, NULL), ==, -ESTALE);
        g_autofree char *after = describe(p);
        g_assert_cmpstr(after, ==, before);
        g_assert_true(journal_exists(f));
}

/* A file that cannot be reconciled stops everything before any file moves. */
static void test_reconcile_all_or_nothing(Fixture *f, gconstpointer data)
{
        (void) data;
        const char *files[] = { "a.qcow2", "b.qcow2", NULL };
        g_autoptr(NkpJournal) j = journal_for(f, files, NKP_JOURNAL_READY);
        lay_out(j->files->pdata[0], (Presence) { true, false, true }, "X");
        lay_out(j->files->pdata[1], (Presence) { false, true, false }, "X"); /* original lost */
        g_assert_cmpint(nkp_journal_save(f->ctx, j), ==, 0);
        g_autofree char *a = describe(j->files->pdata[0]);
        g_assert_cmpint(nkp_journal_reconcile(f->ctx, j, OLD_SIG, NULL), ==, -EUCLEAN);
        g_autofree char *a2 = describe(j->files->pdata[0]);
        g_assert_cmpstr(a2, ==, a);
        /* The other side works: b's new copy goes in, a's original goes. */
        g_assert_cmpint(nkp_journal_reconcile(f->ctx, j, NEW_SIG, NULL), ==, 0);
        g_autofree char *a3 = describe(j->files->pdata[0]);
        g_autofree char *b3 = describe(j->files->pdata[1]);
        g_assert_cmpstr(a3, ==, "P=NEW new= old=");
        g_assert_cmpstr(b3, ==, "P=NEW new= old=");
}

static void test_crash_point_off(Fixture *f, gconstpointer data)
{
        (void) f;
        (void) data;
        /* Another step than the one asked for: nothing happens. */
        g_setenv("NKP_TEST_CRASH_AT", "ready", TRUE);
        nkp_test_crash_point("journal");
        nkp_test_crash_point("swapped");
        g_setenv("NKP_TEST_CRASH_AT", "swapped#3", TRUE);
        nkp_test_crash_point("swapped");
        nkp_test_crash_point("swapped");
        g_unsetenv("NKP_TEST_CRASH_AT");
        nkp_test_crash_point("swapped");
}

static void test_crash_point_fires(Fixture *f, gconstpointer data)
{
        (void) f;
        (void) data;
        if (g_test_subprocess()) {
                g_setenv("NKP_TEST_CRASH_AT", "swapped#2", TRUE);
                nkp_test_crash_point("swapped");
                nkp_test_crash_point("swapped");
                return; /* not reached */
        }
        g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
        g_test_trap_assert_failed();
        g_test_trap_assert_stderr("*test crash at step 'swapped#2'*");
}

/* A .nkp-work that is a symlink (planted, or a directory swapped for one)
 * is removed itself: what it points at survives, by every remover. */
static void test_scratch_symlink(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *victim = g_build_filename(f->root, "victim", NULL);
        g_autofree char *keep = g_build_filename(victim, "keep", NULL);
        g_autofree char *sub = g_build_filename(victim, "sub", NULL);
        g_autofree char *keep2 = g_build_filename(sub, "keep2", NULL);
        g_autofree char *scratch = g_build_filename(f->dir, ".nkp-work", NULL);
        g_assert_cmpint(g_mkdir_with_parents(sub, 0700), ==, 0);
        put(keep, "precious");
        put(keep2, "precious too");
        g_autoptr(GHashTable) before = testutil_snapshot_tree(victim);

        /* 1. .nkp-work itself a symlink: reconcile (back) and remove_scratch. */
        const char *files[] = { "a.qcow2", NULL };
        g_autoptr(NkpJournal) j = journal_for(f, files, NKP_JOURNAL_READY);
        g_ptr_array_add(j->scratch, g_strdup(scratch));
        put(j->files->pdata[0], "OLD");
        g_assert_cmpint(symlink(victim, scratch), ==, 0);
        g_assert_cmpint(nkp_journal_save(f->ctx, j), ==, 0);
        g_assert_cmpint(nkp_journal_reconcile(f->ctx, j, OLD_SIG, NULL), ==, 0);
        testutil_assert_same_tree(before, victim);
        g_assert_false(g_file_test(scratch, G_FILE_TEST_EXISTS | G_FILE_TEST_IS_SYMLINK));
        g_assert_cmpint(symlink(victim, scratch), ==, 0);
        nkp_journal_remove_scratch(j);
        testutil_assert_same_tree(before, victim);
        g_assert_cmpint(symlink(victim, scratch), ==, 0);
        nkp_remove_tree(scratch);
        testutil_assert_same_tree(before, victim);

        /* 2. A symlink inside a real .nkp-work: unlinked, not entered. */
        g_assert_cmpint(g_mkdir_with_parents(scratch, 0700), ==, 0);
        g_autofree char *link = g_build_filename(scratch, "cur", NULL);
        g_assert_cmpint(symlink(victim, link), ==, 0);
        g_autofree char *blob = g_build_filename(scratch, "blob", NULL);
        put(blob, "decrypted vTPM state");
        nkp_journal_remove_scratch(j);
        testutil_assert_same_tree(before, victim);
        g_assert_false(g_file_test(scratch, G_FILE_TEST_EXISTS));
}

/* Recovery touches only the directories recorded when the operation began:
 * a journal naming anything else (crafted, or a later edit) is refused with
 * one line and nothing anywhere changes. */
static void test_reconcile_outside_dirs(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *etc = g_build_filename(f->root, "etc", NULL);
        g_autofree char *shadow = g_build_filename(etc, "shadow", NULL);
        g_autofree char *planted = g_build_filename(etc, "shadow.nkp-old", NULL);
        g_assert_cmpint(g_mkdir_with_parents(etc, 0700), ==, 0);
        const char *files[] = { "a.qcow2", NULL };
        g_autoptr(NkpJournal) good = journal_for(f, files, NKP_JOURNAL_READY);
        put(good->files->pdata[0], "OLD");
        g_assert_cmpint(nkp_journal_save(f->ctx, good), ==, 0);
        g_assert_cmpuint(good->dirs->len, ==, 1);
        struct {
                const char *what;
                const char *file;      /* NULL: images/a.qcow2 */
                bool keep_dirs;        /* the recorded dirs, else none */
                bool scratch_outside;  /* an extra scratch dir in etc */
        } rows[] = {
                { "a file in another directory", shadow, true, false },
                { "a journal that recorded no directory", NULL, false, false },
                { "a scratch directory elsewhere", NULL, true, true },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(rows); i++) {
                put(shadow, "root:x:0:");
                put(planted, "PLANTED");
                g_autofree char *scratch = g_build_filename(etc, ".nkp-work", NULL);
                g_autofree char *inside = g_build_filename(scratch, "keep", NULL);
                g_assert_cmpint(g_mkdir_with_parents(scratch, 0700), ==, 0);
                put(inside, "kept");
                g_autoptr(NkpJournal) j = nkp_journal_new("encrypt", "vm1", vm_uuid, OLD_SIG,
                                                          NEW_SIG);
                j->phase = NKP_JOURNAL_READY;
                g_ptr_array_add(j->files, g_strdup(rows[i].file ? rows[i].file
                                                                : good->files->pdata[0]));
                if (rows[i].scratch_outside)
                        g_ptr_array_add(j->scratch, g_strdup(scratch));
                if (rows[i].keep_dirs)
                        g_ptr_array_add(j->dirs, g_strdup(good->dirs->pdata[0]));
                /* Written as text, the way a crafted journal would be. */
                gsize len = 0;
                g_autofree char *text = nkp_journal_format(j, &len);
                g_autofree char *path = nkp_journal_path(f->ctx, vm_uuid);
                g_assert_cmpint(nkp_write_file_atomic(path, text, len, 0600, false), ==, 0);
                g_autoptr(NkpJournal) back = NULL;
                g_assert_cmpint(nkp_journal_load(f->ctx, vm_uuid, &back), ==, 0);
                g_autoptr(GHashTable) before = testutil_snapshot_tree(f->root);
                g_test_message("row: %s", rows[i].what);
                g_assert_cmpint(nkp_journal_reconcile(f->ctx, back, OLD_SIG, NULL), ==, -EPERM);
                g_assert_null(strchr(nkp_error_message(), '\n'));
                g_assert_nonnull(strstr(nkp_error_message(), "outside the directories"));
                g_assert_nonnull(strstr(nkp_error_message(), "nothing was changed"));
                testutil_assert_same_tree(before, f->root);
        }
        /* A file whose directory is gone: refused, nothing changed. */
        {
                g_autoptr(NkpJournal) j = nkp_journal_new("encrypt", "vm1", vm_uuid, OLD_SIG, NEW_SIG);
                g_autofree char *gone = g_build_filename(f->root, "gone", "a.qcow2", NULL);
                g_ptr_array_add(j->files, g_strdup(gone));
                g_ptr_array_add(j->dirs, g_strdup(good->dirs->pdata[0]));
                g_autoptr(GHashTable) before = testutil_snapshot_tree(f->root);
                g_assert_cmpint(nkp_journal_reconcile(f->ctx, j, OLD_SIG, NULL), ==, -ENOENT);
                g_assert_nonnull(strstr(nkp_error_message(), "cannot be opened"));
                testutil_assert_same_tree(before, f->root);
        }
        /* A damaged dirs entry does not load. */
        g_autofree char *text = g_strdup_printf("[journal]\nversion=1\nop=encrypt\nname=vm1\n"
                                                "uuid=%s\nphase=ready\nold=none\nnew=none\n"
                                                "files=/img/a\nscratch=\ndirs=12:x\n",
                                                vm_uuid);
        g_autoptr(NkpJournal) j = NULL;
        g_assert_cmpint(nkp_journal_parse(text, strlen(text), vm_uuid, "t", &j), ==, -EBADMSG);
}

#define ADD(path, fn) g_test_add(path, Fixture, NULL, fixture_set_up, fn, fixture_tear_down)

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        ADD("/journal/round-trip", test_round_trip);
        ADD("/journal/damaged", test_damaged);
        ADD("/journal/paths-confined", test_paths_confined);
        ADD("/journal/no-key-bytes", test_no_key_bytes);
        ADD("/journal/lock", test_lock);
        ADD("/journal/swap-idempotent", test_swap_idempotent);
        ADD("/journal/reconcile-matrix", test_reconcile_matrix);
        ADD("/journal/reconcile-unknown-side", test_reconcile_unknown_side);
        ADD("/journal/reconcile-all-or-nothing", test_reconcile_all_or_nothing);
        ADD("/journal/scratch-symlink", test_scratch_symlink);
        ADD("/journal/reconcile-outside-dirs", test_reconcile_outside_dirs);
        ADD("/journal/crash-point-off", test_crash_point_off);
        ADD("/journal/crash-point-fires", test_crash_point_fires);
        return g_test_run();
}

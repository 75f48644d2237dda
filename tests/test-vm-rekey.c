/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Shallow rekey and provider users (plugin/lib/vm-rekey.c) against
 * libvirt's test driver: a node file (test:///ROOT/libvirt.xml) whose
 * domains carry keysafes of providers made in a throwaway root.  The test
 * driver's domains start running, so each has a live and a persistent
 * definition, as a running VM on a real host does.  Each connection reads
 * the file again: every test starts from the same domains.
 *
 * Covers: a rekey to another provider and to the default (DEKs and secret
 * UUIDs unchanged, both definitions rewritten), a rerun after a kill
 * between the live and the persistent write, the refusals (tampered
 * keysafe, the VM's provider missing, no such target, target never backed
 * up, plain VM, live and persistent DEKs differ, a managed save, the VM's
 * lock held, a damaged journal) each with both definitions unchanged, an
 * interrupted deep rekey rolled back before the rekey, --all with a locked
 * VM, the dependents of a provider over the
 * persistent and the live definition, and delete refused while used. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include <libvirt/libvirt.h>

#include "testutil.h"

#define WEB_UUID "6695eb01-f6a4-8304-79aa-97f2502e193f"
#define LOST_UUID "0b7e3c1d-5a4f-4e2b-9c8d-7f6e5d4c3b2a"
#define SEC_VTPM "11111111-2222-4333-8444-555555555555"
#define SEC_DISK "66666666-7777-4888-9999-aaaaaaaaaaaa"

typedef struct {
        char *root;
        char *uri;
        nkp_context *ctx;
        char *web_keysafe; /* web01's keysafe under p1, as the node file has it */
} Fixture;

/* Marks provider `name` backed up (active) without the cost of a backup. */
static void make_active(nkp_context *ctx, const char *name)
{
        int fd = -1;
        g_autoptr(NkpStore) store = NULL;
        g_assert_cmpint(nkp_store_lock(ctx, &fd), ==, 0);
        g_assert_cmpint(nkp_store_load(ctx, &store), ==, 0);
        NkpStoreEntry *e = nkp_store_find(store, name);
        g_assert_nonnull(e);
        e->flags |= NKP_PROVIDER_BACKED_UP;
        g_assert_cmpint(nkp_store_save(ctx, store), ==, 0);
        nkp_store_unlock(fd);
}

/* A keysafe for VM `uuid` under provider `name` with a random DEK for the
 * vTPM and one for disk vda. */
static char *keysafe_for(nkp_context *ctx, const char *uuid, const char *name)
{
        g_autoptr(nkp_provider) p = NULL;
        g_autoptr(nkp_secret) kdk = NULL, kek = NULL, d1 = NULL, d2 = NULL;
        g_autoptr(nkp_keysafe) ks = NULL;
        g_assert_cmpint(nkp_provider_get(ctx, name, &p), ==, 0);
        g_assert_cmpint(nkp_provider_get_kdk(ctx, nkp_provider_key_id(p), &kdk), ==, 0);
        g_assert_cmpint(nkp_keysafe_new(uuid, p, &ks), ==, 0);
        g_assert_cmpint(nkp_kek_derive(kdk, nkp_keysafe_kek_salt(ks), nkp_provider_key_id(p), uuid,
                                       &kek),
                        ==, 0);
        g_assert_cmpint(nkp_secret_new_random(NKP_DEK_SIZE, &d1), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(NKP_DEK_SIZE, &d2), ==, 0);
        g_assert_cmpint(nkp_keysafe_put_dek(ks, kek, NKP_OBJECT_VTPM, "vtpm", SEC_VTPM, d1), ==, 0);
        g_assert_cmpint(nkp_keysafe_put_dek(ks, kek, NKP_OBJECT_DISK, "vda", SEC_DISK, d2), ==, 0);
        char *text = NULL;
        g_assert_cmpint(nkp_keysafe_format(ks, &text), ==, 0);
        return text;
}

static char *domain_xml(const char *name, const char *uuid, const char *keysafe)
{
        return g_strdup_printf("  <domain type='test'>\n"
                               "    <name>%s</name>\n"
                               "    <uuid>%s</uuid>\n"
                               "    <memory>65536</memory>\n"
                               "    <os><type>hvm</type></os>\n"
                               "    %s%s%s\n"
                               "  </domain>\n",
                               name, uuid, keysafe ? "<metadata>" : "", keysafe ? keysafe : "",
                               keysafe ? "</metadata>" : "");
}

/* Writes the node file: web01 (keysafe `web_keysafe`), plain, and `extra`. */
static void write_node(const Fixture *f, const char *web_keysafe, const char *extra)
{
        g_autofree char *web = domain_xml("web01", WEB_UUID, web_keysafe);
        g_autofree char *plain = domain_xml("plain", "3c4d5e6f-1a2b-4c3d-8e9f-0a1b2c3d4e5f", NULL);
        g_autofree char *node = g_strconcat("<node>\n", web, plain, extra ? extra : "", "</node>\n",
                                            NULL);
        g_autofree char *path = g_build_filename(f->root, "libvirt.xml", NULL);
        g_assert_true(g_file_set_contents(path, node, -1, NULL));
}

static void fixture_set_up(Fixture *f, gconstpointer data)
{
        (void) data;
        f->root = testutil_mkdtemp();
        g_autofree char *conf_dir = g_build_filename(f->root, "etc", "nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(conf_dir, 0700), ==, 0);
        g_autofree char *conf = g_build_filename(conf_dir, "nkp.conf", NULL);
        g_assert_true(g_file_set_contents(conf, "[tpm]\ntcti=none\n", -1, NULL));
        g_assert_cmpint(nkp_context_new(f->root, &f->ctx), ==, 0);
        const char *names[] = { "p1", "p2", "idle" };
        for (size_t i = 0; i < G_N_ELEMENTS(names); i++) {
                g_autoptr(nkp_provider) p = NULL;
                g_assert_cmpint(nkp_provider_create(f->ctx, names[i], 0, &p), ==, 0);
        }
        make_active(f->ctx, "p1");
        make_active(f->ctx, "p2");
        f->web_keysafe = keysafe_for(f->ctx, WEB_UUID, "p1");
        write_node(f, f->web_keysafe, NULL);
        f->uri = g_strdup_printf("test://%s/libvirt.xml", f->root);
}

static void fixture_tear_down(Fixture *f, gconstpointer data)
{
        (void) data;
        (void) nkp_cache_flush(f->ctx);
        nkp_context_free(f->ctx);
        testutil_rmtree(f->root);
        g_free(f->root);
        g_free(f->uri);
        free(f->web_keysafe);
}

static nkp_virt *connect(const Fixture *f)
{
        nkp_virt *v = NULL;
        g_assert_cmpint(nkp_virt_open(f->uri, 0, &v), ==, 0);
        return v;
}

static NkpDomain *definition(nkp_virt *v, const char *name, bool live)
{
        g_autofree char *xml = NULL;
        NkpDomain *d = NULL;
        g_assert_cmpint(nkp_virt_domain_xml(v, name, !live, &xml), ==, 0);
        g_assert_cmpint(nkp_domain_parse(xml, strlen(xml), &d), ==, 0);
        return d;
}

/* Both definitions' XML, to prove a refusal changed nothing. */
static char *both_definitions(nkp_virt *v, const char *name)
{
        g_autofree char *persistent = NULL, *live = NULL;
        g_assert_cmpint(nkp_virt_domain_xml(v, name, true, &persistent), ==, 0);
        if (nkp_virt_domain_is_active(v, name) > 0)
                g_assert_cmpint(nkp_virt_domain_xml(v, name, false, &live), ==, 0);
        return g_strconcat(persistent, "\n----\n", live ? live : "", NULL);
}

/* Every (secret UUID, DEK value) the definition's keysafe opens to. */
static GPtrArray *unwrap_all(nkp_context *ctx, const NkpDomain *d)
{
        GPtrArray *secrets = NULL;
        g_assert_cmpint(nkp_vm_unlock(ctx, d, true, &secrets), ==, 0);
        return secrets;
}

static void assert_same_deks(GPtrArray *a, GPtrArray *b)
{
        g_assert_cmpuint(a->len, ==, b->len);
        g_assert_cmpuint(a->len, ==, 2);
        for (guint i = 0; i < a->len; i++) {
                const NkpVmSecret *x = a->pdata[i], *y = b->pdata[i];
                g_assert_cmpstr(x->kind, ==, y->kind);
                g_assert_cmpstr(x->object_id, ==, y->object_id);
                g_assert_cmpstr(x->secret_uuid, ==, y->secret_uuid);
                g_assert_true(nkp_secret_equal(x->value, y->value));
        }
}

static void test_rekey_to_other_provider(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpVirt) v = connect(f);
        g_autoptr(NkpDomain) before = definition(v, "web01", false);
        g_autoptr(GPtrArray) deks_before = unwrap_all(f->ctx, before);

        g_autoptr(nkp_rekey_result) res = NULL;
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", "p2", &res), ==, 0);
        g_assert_cmpstr(nkp_rekey_result_domain(res), ==, "web01");
        g_assert_cmpstr(nkp_rekey_result_from(res), ==, "p1");
        g_assert_cmpstr(nkp_rekey_result_provider(res), ==, "p2");
        g_assert_true(nkp_rekey_result_running(res));
        g_assert_cmpint(nkp_rekey_result_error(res), ==, 0);
        g_assert_null(nkp_rekey_result_message(res));

        /* Both definitions name p2, with a new salt, and open to the same
         * DEKs under the same secret UUIDs. */
        for (int live = 0; live <= 1; live++) {
                g_autoptr(NkpDomain) after = definition(v, "web01", live);
                g_assert_nonnull(after->keysafe);
                g_assert_cmpstr(nkp_keysafe_provider_name(after->keysafe), ==, "p2");
                g_assert_true(memcmp(nkp_keysafe_kek_salt(after->keysafe),
                                     nkp_keysafe_kek_salt(before->keysafe), NKP_KEK_SALT_SIZE) != 0);
                g_autoptr(GPtrArray) deks_after = unwrap_all(f->ctx, after);
                assert_same_deks(deks_before, deks_after);
        }

        /* Shut off: only the persistent definition is rewritten. */
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(v), "web01");
        g_assert_nonnull(dom);
        g_assert_cmpint(virDomainDestroy(dom), ==, 0);
        virDomainFree(dom);
        g_clear_pointer(&res, nkp_rekey_result_free);
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", "p1", &res), ==, 0);
        g_assert_cmpstr(nkp_rekey_result_from(res), ==, "p2");
        g_assert_false(nkp_rekey_result_running(res));
        g_autoptr(NkpDomain) off = definition(v, "web01", false);
        g_assert_cmpstr(nkp_keysafe_provider_name(off->keysafe), ==, "p1");
        g_autoptr(GPtrArray) deks_off = unwrap_all(f->ctx, off);
        assert_same_deks(deks_before, deks_off);
}

static void test_rekey_to_default(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpVirt) v = connect(f);
        g_autofree char *unchanged = both_definitions(v, "web01");
        nkp_rekey_result *res = NULL;
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", NULL, &res), ==, -ENOENT);
        g_assert_nonnull(strstr(nkp_error_message(), "No default provider"));
        g_assert_null(res);
        g_autofree char *now = both_definitions(v, "web01");
        g_assert_cmpstr(now, ==, unchanged);

        g_assert_cmpint(nkp_provider_set_default(f->ctx, "p2"), ==, 0);
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", NULL, &res), ==, 0);
        g_assert_cmpstr(nkp_rekey_result_provider(res), ==, "p2");
        nkp_rekey_result_free(res);
        g_autoptr(NkpDomain) d = definition(v, "web01", false);
        g_assert_cmpstr(nkp_keysafe_provider_name(d->keysafe), ==, "p2");
}

/* Expects nkp_vm_rekey(domain, provider) to fail with `err` and a message
 * holding `needle`, both definitions of `domain` unchanged. */
static void assert_refused(Fixture *f, nkp_virt *v, const char *domain, const char *provider,
                           int err, const char *needle)
{
        g_autofree char *unchanged = both_definitions(v, domain);
        nkp_rekey_result *res = NULL;
        int r = nkp_vm_rekey(f->ctx, v, domain, provider, &res);
        if (r != err || !strstr(nkp_error_message(), needle))
                g_error("rekey of %s: %d '%s', expected %d '%s'", domain, r, nkp_error_message(),
                        err, needle);
        g_assert_null(res);
        g_autofree char *now = both_definitions(v, domain);
        g_assert_cmpstr(now, ==, unchanged);
}

/* The keysafe text with one character of the first wrapped DEK changed. */
static char *tampered(const char *keysafe)
{
        char *t = g_strdup(keysafe);
        char *w = strstr(t, "wrapped=\"");
        g_assert_nonnull(w);
        w += strlen("wrapped=\"") + 4;
        *w = *w == 'A' ? 'B' : 'A';
        return t;
}

static void test_refusals(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpVirt) v = connect(f);
        assert_refused(f, v, "web01", "nope", -ENOENT, "no provider 'nope'");
        assert_refused(f, v, "web01", "idle", -EPERM, "never backed up");
        assert_refused(f, v, "plain", "p2", -ENODATA, "is not encrypted by nkp");
        G_GNUC_UNUSED g_autofree char *none = both_definitions(v, "web01");
        nkp_rekey_result *res = NULL;
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "nosuch", "p2", &res), ==, -ENOENT);
        g_assert_nonnull(strstr(nkp_error_message(), "nosuch"));

        /* A tampered wrapped DEK, in both definitions: nothing opens it. */
        g_autofree char *bad = tampered(f->web_keysafe);
        g_assert_cmpint(nkp_virt_keysafe_put(v, "web01", bad, true), ==, 0);
        g_assert_cmpint(nkp_virt_keysafe_put(v, "web01", bad, false), ==, 0);
        assert_refused(f, v, "web01", "p2", -EBADMSG, "cannot be rekeyed");

        /* Live and persistent hold different DEKs (the persistent one was
         * replaced behind nkp's back). */
        g_autofree char *other = keysafe_for(f->ctx, WEB_UUID, "p1");
        g_assert_cmpint(nkp_virt_keysafe_put(v, "web01", f->web_keysafe, true), ==, 0);
        g_assert_cmpint(nkp_virt_keysafe_put(v, "web01", other, false), ==, 0);
        assert_refused(f, v, "web01", "p2", -ESTALE, "hold different keys");
}

static void test_provider_missing(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpVirt) v = connect(f);
        g_assert_cmpint(nkp_provider_delete(f->ctx, "p1", 0, true), ==, 0);
        /* Deleted but still cached: the rekey away from it works. */
        g_autoptr(nkp_rekey_result) res = NULL;
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", "p1", &res), ==, -ENOENT);
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", "p2", &res), ==, 0);
        g_assert_cmpstr(nkp_rekey_result_from(res), ==, "p1");

        /* The cache flushed and the VM back on a keysafe of p1: locked. */
        g_autoptr(NkpVirt) fresh = connect(f);
        g_assert_cmpint(nkp_cache_flush(f->ctx), ==, 0);
        assert_refused(f, fresh, "web01", "p2", -ENOKEY, "provider 'p1'");
        g_assert_nonnull(strstr(nkp_error_message(), "nkpctl provider restore"));
        g_assert_nonnull(strstr(nkp_error_message(), "persistent definition"));
}

static void test_busy(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpVirt) v = connect(f);
        /* A managed save would restore with the old keysafe. */
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(v), "web01");
        g_assert_nonnull(dom);
        g_assert_cmpint(virDomainManagedSave(dom, 0), ==, 0);
        assert_refused(f, v, "web01", "p2", -EBUSY, "saved state");
        g_assert_cmpint(virDomainManagedSaveRemove(dom, 0), ==, 0);
        g_assert_cmpint(virDomainCreate(dom), ==, 0);
        virDomainFree(dom);

        /* The VM's lock held by another command (flock: another open file
         * description conflicts even within this process). */
        int fd = -1;
        g_assert_cmpint(nkp_journal_lock(f->ctx, WEB_UUID, true, &fd), ==, 0);
        assert_refused(f, v, "web01", "p2", -EBUSY, "being changed by another nkpctl command");
        nkp_journal_unlock(fd);

        /* A damaged journal: the recovery cannot tell what was
         * interrupted, so nothing is rekeyed. */
        g_autofree char *journal = nkp_journal_path(f->ctx, WEB_UUID);
        g_assert_true(g_file_set_contents(journal, "", 0, NULL));
        g_assert_cmpint(chmod(journal, 0600), ==, 0);
        assert_refused(f, v, "web01", "p2", -EBADMSG, "damaged");
        g_assert_cmpint(unlink(journal), ==, 0);
        g_autoptr(nkp_rekey_result) res = NULL;
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", "p2", &res), ==, 0);
}

/* A deep rekey of web01 that a crash interrupted before its new
 * definition: the rekey rolls it back (the new copy of its file removed,
 * the journal gone), then rekeys the VM as it is. */
static void test_interrupted_conversion_reconciled(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpVirt) v = connect(f);
        g_autoptr(NkpDomain) d = NULL;
        g_assert_cmpint(nkp_vm_definition(v, "web01", NULL, &d), ==, 0);
        g_autofree char *old_sig = nkp_domain_signature(d);
        g_autofree char *file = g_build_filename(f->root, "vda.qcow2", NULL);
        g_autofree char *copy = g_strconcat(file, ".nkp-new", NULL);
        g_assert_true(g_file_set_contents(file, "OLD", -1, NULL));
        g_assert_true(g_file_set_contents(copy, "NEW", -1, NULL));
        g_autoptr(NkpJournal) j = nkp_journal_new("rekey-deep", "web01", WEB_UUID, old_sig,
                                                  "00112233445566778899aabbccddeeff00112233445566"
                                                  "778899aabbccddeeff");
        g_ptr_array_add(j->files, g_strdup(file));
        g_assert_cmpint(nkp_journal_save(f->ctx, j), ==, 0);

        g_autoptr(nkp_rekey_result) res = NULL;
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", "p2", &res), ==, 0);
        g_assert_cmpstr(nkp_rekey_result_provider(res), ==, "p2");
        g_autofree char *journal = nkp_journal_path(f->ctx, WEB_UUID);
        g_assert_false(g_file_test(journal, G_FILE_TEST_EXISTS));
        g_assert_false(g_file_test(copy, G_FILE_TEST_EXISTS));
        g_autofree char *kept = NULL;
        g_assert_true(g_file_get_contents(file, &kept, NULL, NULL));
        g_assert_cmpstr(kept, ==, "OLD");
}

/* A kill between the live write and the persistent one leaves the live
 * definition on p2 and the persistent one on p1: both open, both providers
 * count the VM as a user, and a rerun finishes. */
static void test_rerun_after_kill_between_writes(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpVirt) v = connect(f);
        g_autoptr(NkpDomain) before = definition(v, "web01", false);
        g_autoptr(GPtrArray) deks_before = unwrap_all(f->ctx, before);
        g_autoptr(nkp_rekey_result) res = NULL;
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", "p2", &res), ==, 0);
        g_autofree char *p2_keysafe = NULL;
        g_assert_cmpint(nkp_virt_keysafe_get(v, "web01", true, &p2_keysafe), ==, 0);
        g_assert_cmpint(nkp_virt_keysafe_put(v, "web01", f->web_keysafe, false), ==, 0);

        g_autoptr(nkp_provider) p1 = NULL, p2 = NULL;
        g_assert_cmpint(nkp_provider_get(f->ctx, "p1", &p1), ==, 0);
        g_assert_cmpint(nkp_provider_get(f->ctx, "p2", &p2), ==, 0);
        char **users = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_provider_dependents(f->ctx, v, nkp_provider_key_id(p1), &users, &n),
                        ==, 0);
        g_assert_cmpuint(n, ==, 1);
        g_assert_cmpstr(users[0], ==, "web01");
        g_assert_null(users[1]);
        g_strfreev(users);
        g_assert_cmpint(nkp_provider_dependents(f->ctx, v, nkp_provider_key_id(p2), &users, &n),
                        ==, 0);
        g_assert_cmpuint(n, ==, 1);
        g_strfreev(users);

        g_clear_pointer(&res, nkp_rekey_result_free);
        g_assert_cmpint(nkp_vm_rekey(f->ctx, v, "web01", "p2", &res), ==, 0);
        g_assert_cmpstr(nkp_rekey_result_from(res), ==, "p1");
        for (int live = 0; live <= 1; live++) {
                g_autoptr(NkpDomain) d = definition(v, "web01", live);
                g_assert_cmpstr(nkp_keysafe_provider_name(d->keysafe), ==, "p2");
                g_autoptr(GPtrArray) deks = unwrap_all(f->ctx, d);
                assert_same_deks(deks_before, deks);
        }
        g_assert_cmpint(nkp_provider_dependents(f->ctx, v, nkp_provider_key_id(p1), &users, &n),
                        ==, 0);
        g_assert_cmpuint(n, ==, 0);
        g_assert_null(users[0]);
        g_strfreev(users);
}

static void collect(const nkp_rekey_result *res, void *userdata)
{
        GPtrArray *lines = userdata;
        g_ptr_array_add(lines, g_strdup_printf("%s %d %s %s %s", nkp_rekey_result_domain(res),
                                               nkp_rekey_result_error(res),
                                               nkp_rekey_result_from(res),
                                               nkp_rekey_result_provider(res),
                                               nkp_rekey_result_running(res) ? "running" : "off"));
        if (nkp_rekey_result_error(res))
                g_assert_nonnull(strstr(nkp_rekey_result_message(res), "is not on this host"));
        else
                g_assert_null(nkp_rekey_result_message(res));
}

/* nkp_context_set_progress's function: "VM done/total;" (VM "-" when NULL). */
static void record_progress(const char *op, const char *vm, const char *step, unsigned done,
                            unsigned total, void *userdata)
{
        g_assert_cmpstr(op, ==, "rekey");
        if (vm)
                g_string_append_printf(userdata, "%s %u/%u;", vm, done, total);
        else
                g_string_append_printf(userdata, "- %s %u/%u;", step, done, total);
}

static void test_rekey_all(Fixture *f, gconstpointer data)
{
        (void) data;
        /* lost01: its provider (made in another root) is not on this host. */
        g_autofree char *other_root = testutil_mkdtemp();
        g_autoptr(nkp_context) other = NULL;
        g_autoptr(nkp_provider) gone = NULL;
        g_assert_cmpint(nkp_context_new(other_root, &other), ==, 0);
        g_assert_cmpint(nkp_provider_create(other, "gone", 0, &gone), ==, 0);
        g_autofree char *lost_keysafe = keysafe_for(other, LOST_UUID, "gone");
        g_assert_cmpint(nkp_cache_flush(other), ==, 0);
        testutil_rmtree(other_root);
        g_autofree char *lost = domain_xml("lost01", LOST_UUID, lost_keysafe);
        write_node(f, f->web_keysafe, lost);

        g_autoptr(NkpVirt) v = connect(f);
        g_autoptr(GPtrArray) lines = g_ptr_array_new_with_free_func(g_free);
        g_assert_cmpint(nkp_vm_rekey_all(f->ctx, v, "idle", collect, lines), ==, -EPERM);
        g_assert_cmpuint(lines->len, ==, 0);
        g_autoptr(GString) steps = g_string_new(NULL);
        nkp_context_set_progress(f->ctx, record_progress, steps);
        g_assert_cmpint(nkp_vm_rekey_all(f->ctx, v, "p2", collect, lines), ==, 0);
        nkp_context_set_progress(f->ctx, NULL, NULL);
        g_assert_cmpuint(lines->len, ==, 2);
        g_autofree char *want_lost = g_strdup_printf("lost01 %d gone p2 running", -ENOKEY);
        g_assert_cmpstr(lines->pdata[0], ==, want_lost);
        g_assert_cmpstr(lines->pdata[1], ==, "web01 0 p1 p2 running");
        /* One progress step per domain (nkp's or not), then done. */
        g_assert_cmpstr(steps->str, ==, "lost01 0/3;plain 1/3;web01 2/3;- done 3/3;");
}

static void test_delete_checked(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpVirt) v = connect(f);
        g_autoptr(nkp_provider) p = NULL;
        char **users = NULL;
        size_t n = 7;
        g_assert_cmpint(nkp_provider_delete_checked(f->ctx, v, "p1", false, &users, &n), ==,
                        -EBUSY);
        g_assert_nonnull(strstr(nkp_error_message(), "protects the defined VM 'web01'"));
        g_assert_null(users);
        g_assert_cmpint(nkp_provider_get(f->ctx, "p1", &p), ==, 0);
        g_clear_pointer(&p, nkp_provider_free);
        /* Without libvirt the users cannot be counted: refused too. */
        g_assert_cmpint(nkp_provider_delete_checked(f->ctx, NULL, "p1", false, &users, &n), ==,
                        -ENOTCONN);
        g_assert_cmpint(nkp_provider_get(f->ctx, "p1", &p), ==, 0);
        g_clear_pointer(&p, nkp_provider_free);
        g_assert_cmpint(nkp_provider_delete_checked(f->ctx, v, "nope", false, &users, &n), ==,
                        -ENOENT);

        /* Unused: deleted, no users. */
        g_assert_cmpint(nkp_provider_delete_checked(f->ctx, v, "idle", false, &users, &n), ==, 0);
        g_assert_cmpuint(n, ==, 0);
        g_assert_null(users[0]);
        g_strfreev(users);
        g_assert_cmpint(nkp_provider_get(f->ctx, "idle", &p), ==, -ENOENT);

        /* --force: deleted, and the VMs left without it are named. */
        g_assert_cmpint(nkp_provider_delete_checked(f->ctx, v, "p1", true, &users, &n), ==, 0);
        g_assert_cmpuint(n, ==, 1);
        g_assert_cmpstr(users[0], ==, "web01");
        g_strfreev(users);
        g_assert_cmpint(nkp_provider_get(f->ctx, "p1", &p), ==, -ENOENT);
}

/* The live definition counts only while the VM runs. */
static void test_dependents_live_only_while_running(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpVirt) v = connect(f);
        g_autofree char *p2_keysafe = keysafe_for(f->ctx, WEB_UUID, "p2");
        g_assert_cmpint(nkp_virt_keysafe_put(v, "web01", p2_keysafe, false), ==, 0);
        g_autoptr(nkp_provider) p1 = NULL;
        g_assert_cmpint(nkp_provider_get(f->ctx, "p1", &p1), ==, 0);
        char **users = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_provider_dependents(f->ctx, v, nkp_provider_key_id(p1), &users, &n),
                        ==, 0);
        g_assert_cmpuint(n, ==, 1); /* live */
        g_strfreev(users);
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(v), "web01");
        g_assert_cmpint(virDomainDestroy(dom), ==, 0);
        virDomainFree(dom);
        g_assert_cmpint(nkp_provider_dependents(f->ctx, v, nkp_provider_key_id(p1), &users, &n),
                        ==, 0);
        g_assert_cmpuint(n, ==, 0);
        g_strfreev(users);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
#define ADD(path, fn) g_test_add(path, Fixture, NULL, fixture_set_up, fn, fixture_tear_down)
        ADD("/vm-rekey/to-other-provider", test_rekey_to_other_provider);
        ADD("/vm-rekey/to-default", test_rekey_to_default);
        ADD("/vm-rekey/refusals", test_refusals);
        ADD("/vm-rekey/provider-missing", test_provider_missing);
        ADD("/vm-rekey/busy", test_busy);
        ADD("/vm-rekey/interrupted-conversion-reconciled", test_interrupted_conversion_reconciled);
        ADD("/vm-rekey/rerun-after-kill-between-writes", test_rerun_after_kill_between_writes);
        ADD("/vm-rekey/all", test_rekey_all);
        ADD("/provider-users/delete-checked", test_delete_checked);
        ADD("/provider-users/live-only-while-running", test_dependents_live_only_while_running);
        return g_test_run();
}

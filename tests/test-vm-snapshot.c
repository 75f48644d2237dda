/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The decisions of plugin/lib/vm-snapshot.c that need no libvirt: the disk
 * chains read from the domain XML as libvirt 9.0 writes it after a
 * snapshot (the shapes below are copied from the lab), which layers of nkp
 * disks are plain, the vm-plain-layer alarm nkpd and vm status raise from
 * the persistent and the running definitions, and the qcow2 header's
 * encryption method. */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include <libvirt/libvirt.h>

#include "testutil.h"

#define VM_UUID "6695eb01-f6a4-8304-79aa-97f2502e193f"
#define SEC "c74e92a6-7161-457a-beca-ec4560c127c5"

/* After `nkpctl vm snapshot` (s1) then `virsh snapshot-create-as` (s2):
 * plain s2 over LUKS s1 (encryption inside <source>) over the LUKS base. */
static const char chain_xml[] =
        "<domain type='qemu'><name>g1</name><uuid>" VM_UUID "</uuid><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/v/g1.s2'/>"
        "<backingStore type='file'><format type='qcow2'/>"
        "<source file='/v/g1.s1'><encryption format='luks' engine='qemu'>"
        "<secret type='passphrase' uuid='" SEC "'/></encryption></source>"
        "<backingStore type='file'><format type='qcow2'/>"
        "<source file='/v/g1.qcow2'><encryption format='luks'>"
        "<secret type='passphrase' uuid='" SEC "'/></encryption></source>"
        "<backingStore/></backingStore></backingStore>"
        "<target dev='vda' bus='virtio'/></disk>"
        "<disk type='file' device='disk'><driver type='raw'/><source file='/v/other.img'/>"
        "<target dev='vdb'/></disk>"
        "</devices></domain>";

/* A single LUKS layer, the encryption at disk level (as vm encrypt writes it). */
static const char single_xml[] =
        "<domain type='qemu'><name>g1</name><uuid>" VM_UUID "</uuid><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/v/g1.qcow2'/><target dev='vda'/>"
        "<encryption format='luks'><secret type='passphrase' uuid='" SEC "'/></encryption>"
        "</disk></devices></domain>";

static void test_layers(void)
{
        g_autoptr(GPtrArray) l = NULL;
        g_assert_cmpint(nkp_domain_disk_layers(chain_xml, strlen(chain_xml), "vda", &l), ==, 0);
        g_assert_cmpuint(l->len, ==, 3);
        const char *paths[] = { "/v/g1.s2", "/v/g1.s1", "/v/g1.qcow2" };
        const bool enc[] = { false, true, true };
        for (guint i = 0; i < 3; i++) {
                const NkpDiskLayer *x = l->pdata[i];
                g_assert_cmpstr(x->path, ==, paths[i]);
                g_assert_cmpuint(x->depth, ==, i);
                g_assert_true(x->encrypted == enc[i]);
                g_assert_cmpstr(x->format, ==, "qcow2");
                g_assert_cmpstr(x->secret_uuid, ==, enc[i] ? SEC : NULL);
        }
        g_autoptr(GPtrArray) one = NULL;
        g_assert_cmpint(nkp_domain_disk_layers(single_xml, strlen(single_xml), "vda", &one), ==, 0);
        g_assert_cmpuint(one->len, ==, 1);
        g_assert_true(((NkpDiskLayer *) one->pdata[0])->encrypted);
        g_autoptr(GPtrArray) none = NULL;
        g_assert_cmpint(nkp_domain_disk_layers(single_xml, strlen(single_xml), "vdz", &none), ==, 0);
        g_assert_cmpuint(none->len, ==, 0);
        g_autoptr(GPtrArray) bad = NULL;
        g_assert_cmpint(nkp_domain_disk_layers("<domain", 7, "vda", &bad), ==, -EBADMSG);
}

/* A domain whose keysafe holds a key for `target` only. */
static NkpDomain *domain_with_key_for(const char *target)
{
        NkpDomain *d = g_new0(NkpDomain, 1);
        d->name = g_strdup("g1");
        d->uuid = g_strdup(VM_UUID);
        d->disks = g_ptr_array_new();
        g_assert_cmpint(nkp_keysafe_new_for(VM_UUID, "p1", "0b7e3c1d-5a4f-4e2b-9c8d-7f6e5d4c3b2a",
                                            "00000000000000000000000000000000"
                                            "00000000000000000000000000000000",
                                            &d->keysafe),
                        ==, 0);
        g_autoptr(nkp_secret) kek = NULL, dek = NULL;
        g_assert_cmpint(nkp_secret_new_random(32, &kek), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(32, &dek), ==, 0);
        g_assert_cmpint(nkp_keysafe_put_dek(d->keysafe, kek, NKP_OBJECT_DISK, target, SEC, dek),
                        ==, 0);
        return d;
}

static void test_plain_layers(void)
{
        g_autoptr(NkpDomain) d = domain_with_key_for("vda");
        g_autoptr(GPtrArray) plain = NULL;
        g_assert_cmpint(nkp_vm_disk_chain_plain_layers(d, chain_xml, strlen(chain_xml), &plain),
                        ==, 0);
        g_assert_cmpuint(plain->len, ==, 1); /* s2 only; vdb is not nkp's */
        g_assert_cmpstr(((NkpDiskLayer *) plain->pdata[0])->path, ==, "/v/g1.s2");
        g_assert_cmpstr(((NkpDiskLayer *) plain->pdata[0])->target, ==, "vda");
        g_autoptr(GPtrArray) clean = NULL;
        g_assert_cmpint(nkp_vm_disk_chain_plain_layers(d, single_xml, strlen(single_xml), &clean),
                        ==, 0);
        g_assert_cmpuint(clean->len, ==, 0);

        /* A key for vdb (a raw plain disk) makes it a plain layer too. */
        g_autoptr(NkpDomain) d2 = domain_with_key_for("vdb");
        g_autoptr(GPtrArray) p2 = NULL;
        g_assert_cmpint(nkp_vm_disk_chain_plain_layers(d2, chain_xml, strlen(chain_xml), &p2),
                        ==, 0);
        g_assert_cmpuint(p2->len, ==, 1);
        g_assert_cmpstr(((NkpDiskLayer *) p2->pdata[0])->path, ==, "/v/other.img");
}

/* The message of the open vm-plain-layer alarm of g1, NULL when none. */
static char *plain_layer_alarm(nkp_context *ctx)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_alarm_list(ctx, &list, &n), ==, 0);
        char *msg = NULL;
        for (size_t i = 0; i < n; i++)
                if (strcmp(nkp_alarm_kind(list[i]), "vm-plain-layer") == 0 &&
                    strcmp(nkp_alarm_subject(list[i]), "g1") == 0)
                        msg = g_strdup(nkp_alarm_message(list[i]));
        nkp_alarm_list_free(list, n);
        return msg;
}

/* nkpd's decision after libvirt rewrote a definition: a plain layer in the
 * persistent or only in the running XML (a transient VM) raises the alarm
 * with both fixes, each layer named once; allow_plain_layers still raises
 * it (the data is in clear) without announcing a refusal; clean chains
 * clear it; an unreadable XML changes nothing. */
static void test_plain_layer_alarm(TestutilRoot *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpDomain) d = domain_with_key_for("vda");
        g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(g_free);
        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, single_xml, NULL, out), ==, 0);
        g_assert_null(plain_layer_alarm(f->ctx));

        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, single_xml, chain_xml, out), ==, 1);
        g_assert_cmpuint(out->len, ==, 1);
        g_assert_cmpstr(out->pdata[0], ==, "vda /v/g1.s2");
        g_autofree char *msg = plain_layer_alarm(f->ctx);
        g_assert_nonnull(msg);
        g_assert_nonnull(strstr(msg, "plain (unencrypted) layer '/v/g1.s2'"));
        g_assert_nonnull(strstr(msg, "nkpctl vm encrypt-layer 'g1' '/v/g1.s2'"));
        g_assert_nonnull(strstr(msg, "virsh blockcommit 'g1' vda --active --pivot"));
        g_assert_nonnull(strstr(msg, "its next start is refused"));

        g_ptr_array_set_size(out, 0);
        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, chain_xml, chain_xml, out), ==, 1);
        g_assert_cmpuint(out->len, ==, 1);

        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, "<domain", chain_xml, NULL), ==,
                        -EBADMSG);
        g_autofree char *kept = plain_layer_alarm(f->ctx);
        g_assert_cmpstr(kept, ==, msg);

        f->ctx->disks_allow_plain_layers = true;
        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, chain_xml, NULL, NULL), ==, 1);
        g_autofree char *allowed = plain_layer_alarm(f->ctx);
        g_assert_nonnull(allowed);
        g_assert_null(strstr(allowed, "refused"));
        g_assert_nonnull(strstr(allowed, "nkpctl vm encrypt-layer 'g1' '/v/g1.s2'"));

        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, single_xml, single_xml, NULL), ==, 0);
        g_assert_null(plain_layer_alarm(f->ctx));
}

/* The running g1 after nkpd sealed s2 (chain_xml's plain top). */
static const char sealed_xml[] =
        "<domain type='qemu'><name>g1</name><uuid>" VM_UUID "</uuid><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/v/g1.s2.nkp-seal'><encryption format='luks' engine='qemu'>"
        "<secret type='passphrase' uuid='" SEC "'/></encryption></source>"
        "<backingStore type='file'><format type='qcow2'/><source file='/v/g1.s2'/>"
        "<backingStore type='file'><format type='qcow2'/>"
        "<source file='/v/g1.s1'><encryption format='luks' engine='qemu'>"
        "<secret type='passphrase' uuid='" SEC "'/></encryption></source>"
        "<backingStore/></backingStore></backingStore>"
        "<target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>";

/* The seal decision: only a plain ACTIVE layer of an nkp disk. */
static void test_plain_tops(void)
{
        g_autoptr(NkpDomain) d = domain_with_key_for("vda");
        g_autoptr(GPtrArray) tops = NULL;
        g_assert_cmpint(nkp_vm_plain_tops(d, chain_xml, strlen(chain_xml), &tops), ==, 0);
        g_assert_cmpuint(tops->len, ==, 1);
        g_assert_cmpstr(((NkpDiskLayer *) tops->pdata[0])->path, ==, "/v/g1.s2");
        g_assert_cmpuint(((NkpDiskLayer *) tops->pdata[0])->depth, ==, 0);
        g_autoptr(GPtrArray) sealed = NULL; /* s2 is plain, but below the seal */
        g_assert_cmpint(nkp_vm_plain_tops(d, sealed_xml, strlen(sealed_xml), &sealed), ==, 0);
        g_assert_cmpuint(sealed->len, ==, 0);
        g_autoptr(GPtrArray) clean = NULL;
        g_assert_cmpint(nkp_vm_plain_tops(d, single_xml, strlen(single_xml), &clean), ==, 0);
        g_assert_cmpuint(clean->len, ==, 0);
        g_autoptr(NkpDomain) other = domain_with_key_for("vdc"); /* vda is not its disk */
        g_autoptr(GPtrArray) none = NULL;
        g_assert_cmpint(nkp_vm_plain_tops(other, chain_xml, strlen(chain_xml), &none), ==, 0);
        g_assert_cmpuint(none->len, ==, 0);
        g_autoptr(GPtrArray) bad = NULL;
        g_assert_cmpint(nkp_vm_plain_tops(d, "<domain", 7, &bad), ==, -EBADMSG);
}

/* PLAIN.nkp-seal, then -2, -3…: never a name any file (even a dangling
 * link) has. */
static void test_seal_name(void)
{
        g_autofree char *dir = testutil_mkdtemp();
        g_autofree char *plain = g_build_filename(dir, "g1.p1", NULL);
        g_autofree char *first = nkp_seal_overlay_path(plain);
        g_autofree char *want1 = g_strconcat(plain, ".nkp-seal", NULL);
        g_assert_cmpstr(first, ==, want1);
        g_assert_true(g_file_set_contents(first, "x", 1, NULL));
        g_autofree char *second = nkp_seal_overlay_path(plain);
        g_autofree char *want2 = g_strconcat(plain, ".nkp-seal-2", NULL);
        g_assert_cmpstr(second, ==, want2);
        g_assert_cmpint(symlink("/nonexistent", second), ==, 0);
        g_autofree char *third = nkp_seal_overlay_path(plain);
        g_autofree char *want3 = g_strconcat(plain, ".nkp-seal-3", NULL);
        g_assert_cmpstr(third, ==, want3);
        testutil_rmtree(dir);
}

/* The alarm of a running VM: sealed (writes go to the seal, the plain
 * layer holds what was written before, encrypt-layer named), or a plain
 * active layer not sealed although sealing is on (said so), or sealing
 * off (today's message). */
static void test_sealed_alarm(TestutilRoot *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpDomain) d = domain_with_key_for("vda");
        g_assert_true(f->ctx->disks_seal_plain_layers); /* the default */
        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, chain_xml, sealed_xml, NULL), ==, 1);
        g_autofree char *sealed = plain_layer_alarm(f->ctx);
        g_assert_nonnull(sealed);
        g_assert_nonnull(strstr(sealed, "VM 'g1': its disk vda has a plain (unencrypted) layer "
                                        "'/v/g1.s2'"));
        g_assert_nonnull(strstr(sealed, "nkpd sealed it: the guest's writes since go to the "
                                        "encrypted '/v/g1.s2.nkp-seal', but what it wrote "
                                        "before is in clear in '/v/g1.s2'"));
        g_assert_nonnull(strstr(sealed, "nkpctl vm encrypt-layer 'g1' '/v/g1.s2'"));
        g_assert_nonnull(strstr(sealed, "its next start is refused"));
        g_assert_null(strstr(sealed, "NOT sealed"));

        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, chain_xml, chain_xml, NULL), ==, 1);
        g_autofree char *unsealed = plain_layer_alarm(f->ctx);
        g_assert_nonnull(strstr(unsealed, "the guest's writes land in it in clear; it is NOT "
                                          "sealed (nkpd could not"));
        g_assert_null(strstr(unsealed, "nkpd sealed it"));

        f->ctx->disks_seal_plain_layers = false;
        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, chain_xml, chain_xml, NULL), ==, 1);
        g_autofree char *off = plain_layer_alarm(f->ctx);
        g_assert_null(strstr(off, "sealed"));
        g_assert_nonnull(strstr(off, "virsh blockcommit 'g1' vda --active --pivot"));
        /* shut off after the seal: the persistent chain says it all */
        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, sealed_xml, NULL, NULL), ==, 1);
        g_autofree char *after = plain_layer_alarm(f->ctx);
        g_assert_cmpstr(after, ==, sealed);
        /* shut off: nothing runs, nothing to seal, not "NOT sealed" */
        f->ctx->disks_seal_plain_layers = true;
        g_assert_cmpint(nkp_vm_plain_layer_alarm(f->ctx, d, chain_xml, NULL, NULL), ==, 1);
        g_autofree char *stopped = plain_layer_alarm(f->ctx);
        g_assert_null(strstr(stopped, "sealed"));
}

/* ---- the seal against libvirt's test driver and the real qemu-img ---------- */

#define TD_UUID "5d0c3f7a-1b2e-4c8d-9a6f-3e2d1c0b9a87"

typedef struct {
        char *root;
        char *base;
        char *plain; /* vm1.p1, the plain active layer over the LUKS base */
        nkp_context *ctx;
        NkpVirt *v;
} SealFixture;

static void seal_set_up(SealFixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *img = g_find_program_in_path("qemu-img");
        if (!img) {
                g_test_skip("qemu-img not installed");
                return;
        }
        f->root = testutil_mkdtemp();
        f->ctx = testutil_context_with_conf(f->root, NULL);
        testutil_default_provider(f->ctx, "p1");
        g_autofree char *images = g_build_filename(f->root, "images", NULL);
        g_assert_cmpint(g_mkdir_with_parents(images, 0700), ==, 0);
        f->base = g_build_filename(images, "vm1.qcow2", NULL);
        f->plain = g_build_filename(images, "vm1.p1", NULL);
        const char *create[] = { "qemu-img", "create", "-q", "-f", "qcow2", f->base, "4M", NULL };
        g_assert_cmpint(testutil_run_tool(create, NULL), ==, 0);
        f->v = testutil_test_driver_vm1(f->root, TD_UUID, f->base);
        g_autoptr(nkp_vm_result) res = NULL;
        if (nkp_vm_encrypt(f->ctx, f->v, "vm1", NULL, NULL, &res) < 0)
                g_error("encrypt: %s", nkp_error_message());
        /* what virsh snapshot-create-as leaves: a plain qcow2 over the LUKS
         * base as the active layer, the base's <encryption> below */
        const char *overlay[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", f->base,
                                  "-F", "qcow2", f->plain, "4M", NULL };
        g_assert_cmpint(testutil_run_tool(overlay, NULL), ==, 0);
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        g_assert_cmpint(nkp_vm_definition(f->v, "vm1", &xml, &d), ==, 0);
        g_autoptr(GRegex) enc = g_regex_new("<encryption.*?</encryption>\\s*",
                                            G_REGEX_DOTALL, 0, NULL);
        g_autofree char *src = g_strdup_printf("<source file='%s'/>", f->base);
        g_assert_nonnull(strstr(xml, src));
        g_autofree char *secret = g_strdup(nkp_keysafe_entry_secret_uuid(d->keysafe, 0));
        g_autofree char *noenc = g_regex_replace(enc, xml, -1, 0, "", 0, NULL);
        g_autofree char *chain = g_strdup_printf(
                "<source file='%s'/><backingStore type='file'><format type='qcow2'/>"
                "<source file='%s'><encryption format='luks' engine='qemu'>"
                "<secret type='passphrase' uuid='%s'/></encryption></source>"
                "<backingStore/></backingStore>",
                f->plain, f->base, secret);
        g_auto(GStrv) parts = g_strsplit(noenc, src, 2);
        g_assert_cmpuint(g_strv_length(parts), ==, 2);
        g_autofree char *redone = g_strconcat(parts[0], chain, parts[1], NULL);
        g_assert_cmpint(nkp_virt_domain_define(f->v, redone), ==, 0);
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(f->v), "vm1");
        g_assert_nonnull(dom);
        g_assert_cmpint(virDomainCreate(dom), ==, 0);
        virDomainFree(dom);
        g_autofree char *live = NULL;
        g_assert_cmpint(nkp_virt_domain_xml(f->v, "vm1", false, &live), ==, 0);
        g_autoptr(GPtrArray) tops = NULL;
        g_assert_cmpint(nkp_vm_plain_tops(d, live, strlen(live), &tops), ==, 0);
        g_assert_cmpuint(tops->len, ==, 1); /* the premise: a plain active layer */
}

static void seal_tear_down(SealFixture *f, gconstpointer data)
{
        (void) data;
        if (!f->root)
                return;
        nkp_virt_close(f->v);
        nkp_context_free(f->ctx);
        testutil_rmtree(f->root);
        g_free(f->root);
        g_free(f->base);
        g_free(f->plain);
}

static bool exists(const char *plain, const char *suffix)
{
        g_autofree char *p = g_strconcat(plain, suffix, NULL);
        return access(p, F_OK) == 0;
}

/* Refused: sealing off (nothing done), the VM's lock held by an nkpctl
 * command (-EBUSY, NOT sealed, said why; no file of any name left). */
static void test_seal_refused(SealFixture *f, gconstpointer data)
{
        (void) data;
        if (!f->root)
                return;
        f->ctx->disks_seal_plain_layers = false;
        g_autofree char *note = NULL;
        g_assert_cmpint(nkp_vm_seal_plain_tops(f->ctx, f->v, "vm1", &note), ==, 0);
        g_assert_null(note);
        g_assert_false(exists(f->plain, ".nkp-seal"));
        f->ctx->disks_seal_plain_layers = true;
        int fd = -1;
        g_assert_cmpint(nkp_vm_lock(f->ctx, TD_UUID, true, 0, &fd), ==, 0);
        g_assert_cmpint(nkp_vm_seal_plain_tops(f->ctx, f->v, "vm1", &note), ==, -EBUSY);
        g_assert_nonnull(strstr(nkp_error_message(), "plain layer '"));
        g_assert_nonnull(strstr(nkp_error_message(), "is NOT sealed"));
        g_assert_nonnull(strstr(nkp_error_message(), "holds the VM's lock"));
        nkp_error_clear();
        nkp_journal_unlock(fd);
        g_assert_null(note);
        g_assert_false(exists(f->plain, ".nkp-seal"));
        g_assert_false(exists(f->plain, ".nkp-seal.nkp-new"));
        /* shut off: nothing runs, nothing to seal */
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(f->v), "vm1");
        g_assert_cmpint(virDomainDestroy(dom), ==, 0);
        virDomainFree(dom);
        g_assert_cmpint(nkp_vm_seal_plain_tops(f->ctx, f->v, "vm1", &note), ==, 0);
        g_assert_false(exists(f->plain, ".nkp-seal"));
}

/* libvirt refuses (the test driver takes no disk-only snapshot: "unsupported
 * flags") after qemu-img made the overlay under the next free name: the
 * overlay is removed, no temporary left, the file that held the first
 * name untouched, the error says NOT sealed and libvirt's reason.  (The
 * seal that libvirt takes: t-nkp-snapshot, on QEMU.) */
static void test_seal_libvirt_refused(SealFixture *f, gconstpointer data)
{
        (void) data;
        if (!f->root)
                return;
        g_autofree char *taken = g_strconcat(f->plain, ".nkp-seal", NULL);
        g_assert_true(g_file_set_contents(taken, "not ours", -1, NULL));
        g_autofree char *note = NULL;
        g_assert_cmpint(nkp_vm_seal_plain_tops(f->ctx, f->v, "vm1", &note), ==, -EIO);
        g_test_message("%s", nkp_error_message());
        g_autofree char *what = g_strdup_printf("VM 'vm1': disk vda: plain layer '%s' is NOT "
                                                "sealed",
                                                f->plain);
        g_assert_true(g_str_has_prefix(nkp_error_message(), what));
        g_assert_nonnull(strstr(nkp_error_message(), "libvirt refused the snapshot of VM 'vm1'"));
        nkp_error_clear();
        g_assert_null(note);
        g_autofree char *kept = NULL;
        g_assert_true(g_file_get_contents(taken, &kept, NULL, NULL));
        g_assert_cmpstr(kept, ==, "not ours"); /* never overwritten */
        g_assert_false(exists(f->plain, ".nkp-seal-2"));
        g_assert_false(exists(f->plain, ".nkp-seal-2.nkp-new"));
        g_assert_false(exists(f->plain, ".nkp-seal.nkp-new"));
}

static void write_header(const char *path, const char *magic, guint8 method)
{
        guint8 h[512] = { 0 };
        memcpy(h, magic, 4);
        h[35] = method;
        g_assert_true(g_file_set_contents(path, (const char *) h, sizeof h, NULL));
}

static void test_qcow2_header(void)
{
        g_autofree char *dir = testutil_mkdtemp();
        g_autofree char *p = g_build_filename(dir, "x.qcow2", NULL);
        write_header(p, "QFI\xfb", 2);
        g_assert_cmpint(nkp_qcow2_is_luks(p), ==, 1);
        write_header(p, "QFI\xfb", 0);
        g_assert_cmpint(nkp_qcow2_is_luks(p), ==, 0);
        write_header(p, "QFI\xfb", 1); /* the old AES method is not LUKS */
        g_assert_cmpint(nkp_qcow2_is_luks(p), ==, 0);
        write_header(p, "RAW!", 2);
        g_assert_cmpint(nkp_qcow2_is_luks(p), ==, -EMEDIUMTYPE);
        g_assert_true(g_file_set_contents(p, "QFI", 3, NULL));
        g_assert_cmpint(nkp_qcow2_is_luks(p), ==, -EMEDIUMTYPE);
        g_autofree char *missing = g_build_filename(dir, "none", NULL);
        g_assert_cmpint(nkp_qcow2_is_luks(missing), ==, -ENOENT);
        testutil_rmtree(dir);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/vm-snapshot/layers", test_layers);
        g_test_add_func("/vm-snapshot/plain-layers", test_plain_layers);
        g_test_add_func("/vm-snapshot/qcow2-header", test_qcow2_header);
        g_test_add("/vm-snapshot/plain-layer-alarm", TestutilRoot, NULL, testutil_root_setup,
                   test_plain_layer_alarm, testutil_root_teardown);
        g_test_add_func("/vm-snapshot/seal/plain-tops", test_plain_tops);
        g_test_add_func("/vm-snapshot/seal/name", test_seal_name);
        g_test_add("/vm-snapshot/seal/alarm", TestutilRoot, NULL, testutil_root_setup,
                   test_sealed_alarm, testutil_root_teardown);
        g_test_add("/vm-snapshot/seal/refused", SealFixture, NULL, seal_set_up, test_seal_refused,
                   seal_tear_down);
        g_test_add("/vm-snapshot/seal/libvirt-refused", SealFixture, NULL, seal_set_up,
                   test_seal_libvirt_refused, seal_tear_down);
        return g_test_run();
}

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The decisions of plugin/lib/vm-snapshot.c that need no libvirt: the disk
 * chains read from the domain XML as libvirt 9.0 writes it after a
 * snapshot (the shapes below are copied from the lab), which layers of nkp
 * disks are plain, the vm-plain-layer alarm nkpd and vm status raise from
 * the persistent and the running definitions, and the qcow2 header's
 * encryption method. */
#include <errno.h>
#include <string.h>

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
        return g_test_run();
}

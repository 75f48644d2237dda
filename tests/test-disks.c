/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* New disks follow the VM (issue 15; enrol.c, vm-status.c, the hook's
 * [disks] rule), against the real qemu-img and qemu-io (real qcow2 files,
 * real LUKS conversions through the real tool runner) and libvirt's test
 * driver (test:///FILE: one shut-off domain with a vTPM and every kind of
 * disk).
 *
 * Covers: what "empty" means (nkp_disk_content: a fresh qcow2, one qemu-io
 * wrote to, one with a backing file, a raw file, a missing file); `vm
 * status` lists every disk with its state (plain-empty, plain-data,
 * not-managed cdrom / raw file / network disk, encrypted by P); nkpd's
 * enrolment of a new vTPM takes the empty vda along in one conversion and
 * leaves the data disk plain with a vm-plain-disk alarm naming VM, disk and
 * fix; a new empty disk defined later is encrypted into the VM's own
 * keysafe (vTPM key unchanged); [disks] policy=require makes the hook
 * refuse the start with one line naming the disk (enrol lets it start);
 * `vm encrypt --disks` of the data disk clears the alarm; policy=off
 * converts nothing; a new empty disk of a running VM is left alone (vm
 * status and the note say when it happens) and converted once it stops. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libvirt/libvirt.h>

#include "testutil.h"

#define VM_UUID "0c8e4a52-7d1f-4b3a-9e2d-5f6a7b8c9d0e"

typedef struct {
        char *root;
        char *images;
        char *uri;
        nkp_context *ctx;
        NkpVirt *v;
} Fixture;

static void run_ok(const char *const *argv)
{
        g_autoptr(GError) error = NULL;
        g_autofree char *err = NULL;
        int status = 0;
        if (!g_spawn_sync(NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH |
                          G_SPAWN_STDOUT_TO_DEV_NULL, NULL, NULL, NULL, &err, &status, &error) ||
            !g_spawn_check_wait_status(status, NULL))
                g_error("%s %s failed: %s", argv[0], argv[1], error ? error->message : err);
}

static char *image(Fixture *f, const char *name)
{
        return g_build_filename(f->images, name, NULL);
}

static char *new_qcow2(Fixture *f, const char *name)
{
        char *p = image(f, name);
        const char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", p, "64M", NULL };
        run_ok(argv);
        return p;
}

static char *data_qcow2(Fixture *f, const char *name)
{
        char *p = new_qcow2(f, name);
        const char *argv[] = { "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", p, NULL };
        run_ok(argv);
        return p;
}

/* crypt_method of a qcow2 header (0 plain, 2 LUKS). */
static unsigned crypt_method(const char *path)
{
        g_autofree char *text = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(path, &text, &len, NULL));
        g_assert_cmpuint(len, >=, 36);
        const guint8 *h = (const guint8 *) text;
        return (unsigned) h[32] << 24 | (unsigned) h[33] << 16 | (unsigned) h[34] << 8 | h[35];
}

static char *file_sum(const char *path)
{
        g_autofree char *text = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(path, &text, &len, NULL));
        return g_compute_checksum_for_data(G_CHECKSUM_SHA256, (const guchar *) text, len);
}

static void fixture_set_up(Fixture *f, gconstpointer data)
{
        (void) data;
        f->root = testutil_mkdtemp();
        f->images = g_build_filename(f->root, "images", NULL);
        g_assert_cmpint(g_mkdir_with_parents(f->images, 0700), ==, 0);
        g_autofree char *conf = g_strdup_printf("[tpm]\ntcti=none\n[vtpm]\nstate_dir=%s/swtpm\n",
                                                f->root);
        f->ctx = testutil_context_with_conf(f->root, conf);
        g_assert_cmpint(f->ctx->disks_policy, ==, NKP_DISKS_POLICY_ENROL); /* the default */
        testutil_default_provider(f->ctx, "p1");

        g_autofree char *vda = new_qcow2(f, "vda.qcow2");
        g_autofree char *vdb = data_qcow2(f, "vdb.qcow2");
        g_autofree char *vdc = image(f, "vdc.img");
        g_assert_true(g_file_set_contents(vdc, "raw", -1, NULL));
        g_autofree char *node = g_strdup_printf(
                "<node>\n"
                "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\n"
                "  <name>vm1</name>\n"
                "  <uuid>" VM_UUID "</uuid>\n"
                "  <memory>262144</memory>\n"
                "  <os><type>hvm</type></os>\n"
                "  <devices>\n"
                "    <disk type='file' device='disk'>\n"
                "      <driver name='qemu' type='qcow2'/><source file='%s'/>\n"
                "      <target dev='vda' bus='virtio'/>\n"
                "    </disk>\n"
                "    <disk type='file' device='disk'>\n"
                "      <driver name='qemu' type='qcow2'/><source file='%s'/>\n"
                "      <target dev='vdb' bus='virtio'/>\n"
                "    </disk>\n"
                "    <disk type='file' device='disk'>\n"
                "      <driver name='qemu' type='raw'/><source file='%s'/>\n"
                "      <target dev='vdc' bus='virtio'/>\n"
                "    </disk>\n"
                "    <disk type='network' device='disk'>\n"
                "      <driver name='qemu' type='raw'/>\n"
                "      <source protocol='nbd' name='e'><host name='localhost' port='10809'/></source>\n"
                "      <target dev='vdd' bus='virtio'/>\n"
                "    </disk>\n"
                "    <disk type='file' device='cdrom'>\n"
                "      <driver name='qemu' type='raw'/>\n"
                "      <target dev='sda' bus='sata'/><readonly/>\n"
                "    </disk>\n"
                "    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\n"
                "  </devices>\n"
                "  <test:runstate>5</test:runstate>\n" /* shut off, as nkpd wants */
                "</domain>\n"
                "</node>\n",
                vda, vdb, vdc);
        g_autofree char *node_path = g_build_filename(f->root, "node.xml", NULL);
        g_assert_true(g_file_set_contents(node_path, node, -1, NULL));
        f->uri = g_strdup_printf("test://%s", node_path);
        g_assert_cmpint(nkp_virt_open(f->uri, 0, &f->v), ==, 0);
        g_assert_cmpint(nkp_virt_domain_is_active(f->v, "vm1"), ==, 0);
}

static void fixture_tear_down(Fixture *f, gconstpointer data)
{
        (void) data;
        nkp_virt_close(f->v);
        nkp_context_free(f->ctx);
        testutil_rmtree(f->root);
        g_free(f->root);
        g_free(f->images);
        g_free(f->uri);
}

static nkp_vm_status *status(Fixture *f)
{
        nkp_vm_status *s = NULL;
        g_assert_cmpint(nkp_vm_status_get(f->ctx, f->v, "vm1", &s), ==, 0);
        return s;
}

/* The state of disk `target` in `s`, its note in *ret_note. */
static const char *disk_state(const nkp_vm_status *s, const char *target, const char **ret_note)
{
        for (size_t i = 0; i < nkp_vm_status_n_disks(s); i++)
                if (strcmp(nkp_vm_status_disk_target(s, i), target) == 0) {
                        if (ret_note)
                                *ret_note = nkp_vm_status_disk_note(s, i);
                        return nkp_vm_status_disk_state(s, i);
                }
        g_error("no disk '%s' in the status", target);
}

static bool has_alarm(Fixture *f, const char *kind, const char *subject, const char *needle)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_alarm_list(f->ctx, &list, &n), ==, 0);
        bool found = false;
        for (size_t i = 0; i < n; i++)
                found = found || (strcmp(nkp_alarm_kind(list[i]), kind) == 0 &&
                                  strcmp(nkp_alarm_subject(list[i]), subject) == 0 &&
                                  (!needle || strstr(nkp_alarm_message(list[i]), needle)));
        nkp_alarm_list_free(list, n);
        return found;
}

static char *inactive_xml(Fixture *f)
{
        char *xml = NULL;
        g_assert_cmpint(nkp_virt_domain_xml(f->v, "vm1", true, &xml), ==, 0);
        return xml;
}

/* ---- tests ------------------------------------------------------------------ */

static void test_content(Fixture *f, gconstpointer data)
{
        (void) data;
        static const struct {
                const char *file;
                enum nkp_disk_content want;
                const char *why;
        } cases[] = {
                { "vda.qcow2", NKP_DISK_CONTENT_EMPTY, "is empty" },
                { "vdb.qcow2", NKP_DISK_CONTENT_DATA, "holds data" },
                { "vdc.img", NKP_DISK_CONTENT_UNKNOWN, "not a qcow2 file" },
                { "backed.qcow2", NKP_DISK_CONTENT_DATA, "backing file" },
                { "missing.qcow2", NKP_DISK_CONTENT_UNKNOWN, "cannot be opened" },
                { "fifo.qcow2", NKP_DISK_CONTENT_UNKNOWN, "not a regular file" },
        };
        g_autofree char *fifo = image(f, "fifo.qcow2");
        g_assert_cmpint(mkfifo(fifo, 0600), ==, 0); /* must not hang */
        g_autofree char *base = new_qcow2(f, "base.qcow2");
        g_autofree char *backed = image(f, "backed.qcow2");
        const char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                               base, backed, NULL };
        run_ok(argv);
        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                g_autofree char *p = image(f, cases[i].file);
                g_autofree char *why = NULL;
                g_test_message("%s", cases[i].file);
                g_assert_cmpint(nkp_disk_content(p, &why), ==, cases[i].want);
                g_assert_nonnull(strstr(why, cases[i].why));
        }
}

static void test_status_lists_every_disk(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_vm_status) s = status(f);
        g_assert_cmpint(nkp_vm_status_state(s), ==, NKP_VM_PLAIN);
        g_assert_cmpuint(nkp_vm_status_n_disks(s), ==, 5);
        const char *note = NULL;
        g_assert_cmpstr(disk_state(s, "vda", &note), ==, "plain-empty");
        g_assert_cmpstr(disk_state(s, "vdb", &note), ==, "plain-data");
        g_assert_cmpstr(disk_state(s, "vdc", &note), ==, "not-managed");
        g_assert_cmpstr(note, ==, "raw file");
        g_assert_cmpstr(disk_state(s, "vdd", &note), ==, "not-managed");
        g_assert_cmpstr(note, ==, "network disk");
        g_assert_null(nkp_vm_status_disk_path(s, 3));
        g_assert_cmpstr(disk_state(s, "sda", &note), ==, "not-managed");
        g_assert_cmpstr(note, ==, "cdrom");
        /* vm list reads no disk file. */
        nkp_vm_status **list = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_vm_list(f->ctx, f->v, &list, &n), ==, 0);
        g_assert_cmpuint(n, ==, 1);
        g_assert_cmpstr(disk_state(list[0], "vda", NULL), ==, "plain");
        nkp_vm_status_list_free(list, n);
        /* Not an nkp VM: nkpd's disk pass leaves it alone. */
        g_autofree char *vda = image(f, "vda.qcow2");
        g_assert_cmpint(nkp_vm_auto_enrol_disks(f->ctx, f->v, "vm1", NULL), ==, 0);
        g_assert_cmpuint(crypt_method(vda), ==, 0);
}

/* `xml` with one more qcow2 disk `target` at `path`. */
static char *with_disk(const char *xml, const char *target, const char *path)
{
        g_autofree char *disk = g_strdup_printf(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                "<source file='%s'/><target dev='%s' bus='virtio'/></disk></devices>",
                path, target);
        g_autofree char *head = g_strdup(xml);
        char *end = strstr(head, "</devices>");
        g_assert_nonnull(end);
        *end = '\0';
        return g_strconcat(head, disk, strstr(xml, "</devices>") + strlen("</devices>"), NULL);
}

static void test_new_disks_follow(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *vda = image(f, "vda.qcow2");
        g_autofree char *vdb = image(f, "vdb.qcow2");
        g_autofree char *vdb_sum = file_sum(vdb);

        /* nkpd's enrolment of the new vTPM takes the empty vda along. */
        g_autofree char *note = NULL;
        int r = nkp_vm_auto_enrol(f->ctx, f->v, "vm1", &note);
        if (r < 0)
                g_error("auto enrol: %s", nkp_error_message());
        g_assert_cmpint(r, ==, 1);
        g_assert_nonnull(strstr(note, "empty disk(s) vda are now encrypted by provider 'p1'"));
        g_assert_cmpuint(crypt_method(vda), ==, 2);
        g_assert_cmpuint(crypt_method(vdb), ==, 0);

        /* The data disk: left as it is, with an alarm naming the fix. */
        g_assert_cmpint(nkp_vm_auto_enrol_disks(f->ctx, f->v, "vm1", NULL), ==, 0);
        g_autofree char *vdb_after = file_sum(vdb);
        g_assert_cmpstr(vdb_after, ==, vdb_sum);
        g_assert_true(has_alarm(f, "vm-plain-disk", "vm1:vdb", "nkpctl vm encrypt 'vm1' --disks vdb"));
        g_assert_false(has_alarm(f, "vm-plain-disk", "vm1:vda", NULL));

        g_autoptr(nkp_vm_status) s = status(f);
        g_assert_cmpint(nkp_vm_status_state(s), ==, NKP_VM_ENCRYPTED);
        const char *dnote = NULL;
        g_assert_cmpstr(disk_state(s, "vda", &dnote), ==, "encrypted");
        g_assert_cmpstr(dnote, ==, "by p1 (luks)");
        g_assert_cmpstr(disk_state(s, "vdb", &dnote), ==, "plain-data");
        g_assert_nonnull(strstr(dnote, "alarm vm-plain-disk"));
        g_assert_nonnull(strstr(dnote, "nkpctl vm encrypt 'vm1' --disks vdb"));

        /* The hook: [disks] policy=require refuses with one line naming
         * vdb and the fix; enrol lets it start. */
        g_autofree char *xml = inactive_xml(f);
        f->ctx->disks_policy = NKP_DISKS_POLICY_REQUIRE;
        g_autoptr(NkpDomain) d = NULL;
        g_assert_cmpint(nkp_domain_parse(xml, strlen(xml), &d), ==, 0);
        g_assert_cmpint(nkp_disks_start_check(f->ctx, d), ==, -EPERM);
        const char *msg = nkp_error_message();
        g_assert_nonnull(strstr(msg, "VM 'vm1' cannot start: its disk 'vdb' is not encrypted"));
        g_assert_nonnull(strstr(msg, "[disks] policy=require"));
        g_assert_nonnull(strstr(msg, "nkpctl vm encrypt 'vm1' --disks vdb"));
        g_assert_null(strchr(msg, '\n'));
        g_autofree char *conf = g_build_filename(f->root, "etc/nkp/nkp.conf", NULL);
        g_autofree char *require = g_strdup_printf("[tpm]\ntcti=none\n[vtpm]\nstate_dir=%s/swtpm\n"
                                                   "[disks]\npolicy=require\n",
                                                   f->root);
        g_assert_true(g_file_set_contents(conf, require, -1, NULL));
        g_assert_cmpint(nkp_hook_run(f->root, "test:///default", NKP_HOOK_START, "vm1", xml,
                                     strlen(xml)),
                        ==, -EPERM);
        g_assert_nonnull(strstr(nkp_error_message(), "disk 'vdb'"));
        f->ctx->disks_policy = NKP_DISKS_POLICY_ENROL;
        g_assert_cmpint(nkp_disks_start_check(f->ctx, d), ==, 0);

        /* A new empty disk defined later: into the VM's own keysafe, the
         * vTPM's key unchanged. */
        g_autoptr(NkpDomain) before = NULL;
        g_assert_cmpint(nkp_domain_parse(xml, strlen(xml), &before), ==, 0);
        g_autofree char *vde = new_qcow2(f, "vde.qcow2");
        g_autofree char *newxml = with_disk(xml, "vde", vde);
        g_assert_cmpint(nkp_virt_domain_define(f->v, newxml), ==, 0);
        g_clear_pointer(&note, g_free);
        r = nkp_vm_auto_enrol_disks(f->ctx, f->v, "vm1", &note);
        if (r < 0)
                g_error("auto enrol disks: %s", nkp_error_message());
        g_assert_cmpint(r, ==, 1);
        g_assert_nonnull(strstr(note, "new empty disk(s) vde now encrypted by provider 'p1'"));
        g_assert_cmpuint(crypt_method(vde), ==, 2);
        g_autofree char *after_xml = inactive_xml(f);
        g_autoptr(NkpDomain) after = NULL;
        g_assert_cmpint(nkp_domain_parse(after_xml, strlen(after_xml), &after), ==, 0);
        g_assert_true(nkp_disk_in_keysafe(after, "vde"));
        g_assert_true(nkp_disk_in_keysafe(after, "vda"));
        g_assert_false(nkp_disk_in_keysafe(after, "vdb"));
        g_assert_cmpstr(after->tpm_secret, ==, before->tpm_secret);
        g_assert_true(has_alarm(f, "vm-plain-disk", "vm1:vdb", NULL));

        /* vm encrypt --disks vdb: converted (data kept by the compare), alarm cleared. */
        g_autoptr(nkp_vm_result) res = NULL;
        g_assert_cmpint(nkp_vm_encrypt(f->ctx, f->v, "vm1", NULL, "vdb", &res), ==, 0);
        g_assert_cmpuint(crypt_method(vdb), ==, 2);
        g_assert_false(has_alarm(f, "vm-plain-disk", "vm1:vdb", NULL));
        g_autofree char *xml2 = inactive_xml(f);
        g_autoptr(NkpDomain) d2 = NULL;
        g_assert_cmpint(nkp_domain_parse(xml2, strlen(xml2), &d2), ==, 0);
        f->ctx->disks_policy = NKP_DISKS_POLICY_REQUIRE;
        g_assert_cmpint(nkp_disks_start_check(f->ctx, d2), ==, 0);
}

static void test_running(Fixture *f, gconstpointer data)
{
        (void) data;
        g_assert_cmpint(nkp_vm_auto_enrol(f->ctx, f->v, "vm1", NULL), ==, 1);
        g_autofree char *xml = inactive_xml(f);
        g_autofree char *vde = new_qcow2(f, "vde.qcow2");
        g_autofree char *newxml = with_disk(xml, "vde", vde);
        /* Defined and started (the test driver runs no hook). */
        g_assert_cmpint(nkp_virt_domain_create(f->v, newxml, false), ==, 0);
        g_assert_cmpint(nkp_virt_domain_is_active(f->v, "vm1"), ==, 1);
        g_autofree char *note = NULL;
        g_assert_cmpint(nkp_vm_auto_enrol_disks(f->ctx, f->v, "vm1", &note), ==, 0);
        g_assert_nonnull(strstr(note, "new empty plain disk (vde) while it runs"));
        g_assert_cmpuint(crypt_method(vde), ==, 0);
        g_autoptr(nkp_vm_status) s = status(f);
        const char *dnote = NULL;
        g_assert_cmpstr(disk_state(s, "vde", &dnote), ==, "plain-empty");
        g_assert_nonnull(strstr(dnote, "nkpd encrypts it once the VM is shut off"));
        /* Stopped: the next pass (nkpd's "stopped" event) converts it. */
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(f->v), "vm1");
        g_assert_nonnull(dom);
        g_assert_cmpint(virDomainDestroy(dom), ==, 0);
        virDomainFree(dom);
        g_assert_cmpint(nkp_vm_auto_enrol_disks(f->ctx, f->v, "vm1", NULL), ==, 1);
        g_assert_cmpuint(crypt_method(vde), ==, 2);
}

static void test_policy_off(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *vda = image(f, "vda.qcow2");
        f->ctx->disks_policy = NKP_DISKS_POLICY_OFF;
        /* The vTPM alone is enrolled; the empty vda stays plain. */
        g_assert_cmpint(nkp_vm_auto_enrol(f->ctx, f->v, "vm1", NULL), ==, 1);
        g_assert_cmpint(nkp_vm_auto_enrol_disks(f->ctx, f->v, "vm1", NULL), ==, 0);
        g_assert_cmpuint(crypt_method(vda), ==, 0);
        g_assert_false(has_alarm(f, "vm-plain-disk", "vm1:vdb", NULL));
        g_autoptr(nkp_vm_status) s = status(f);
        const char *note = NULL;
        g_assert_cmpstr(disk_state(s, "vda", &note), ==, "plain-empty");
        g_assert_nonnull(strstr(note, "[disks] policy=off"));
        /* Back to enrol: the next pass converts it. */
        f->ctx->disks_policy = NKP_DISKS_POLICY_ENROL;
        g_assert_cmpint(nkp_vm_auto_enrol_disks(f->ctx, f->v, "vm1", NULL), ==, 1);
        g_assert_cmpuint(crypt_method(vda), ==, 2);
}

static unsigned count_of(const char *hay, const char *needle)
{
        unsigned n = 0;
        for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
                n++;
        return n;
}

/* snapshot='no' (docs/snapshots-clones.md "Internal snapshots"): the
 * enrolment writes it on the disk it encrypts only; nkpd puts it back on
 * an nkp definition that lacks it (one written before nkp set it), once,
 * and not while an nkpctl command holds the VM's lock. */
static void test_snapshot_no(Fixture *f, gconstpointer data)
{
        (void) data;
        g_assert_cmpint(nkp_vm_refuse_snapshots(f->ctx, f->v, "vm1", NULL), ==, 0); /* not nkp's */
        g_assert_cmpint(nkp_vm_auto_enrol(f->ctx, f->v, "vm1", NULL), ==, 1);
        g_autofree char *xml = inactive_xml(f);
        g_assert_nonnull(strstr(xml, "<disk type='file' device='disk' snapshot='no'>\n"
                                     "      <driver name='qemu' type='qcow2'/>\n"
                                     "      <source file='"));
        g_assert_cmpuint(count_of(xml, "snapshot='no'"), ==, 1); /* vda only: vdb is plain */

        g_autoptr(GString) old = g_string_new(xml);
        g_string_replace(old, " snapshot='no'", "", 0);
        g_assert_cmpint(nkp_virt_domain_define(f->v, old->str), ==, 0);
        /* while an nkpctl command holds the VM's lock: left alone */
        int fd = -1;
        g_assert_cmpint(nkp_vm_lock(f->ctx, VM_UUID, true, 0, &fd), ==, 0);
        g_assert_cmpint(nkp_vm_refuse_snapshots(f->ctx, f->v, "vm1", NULL), ==, 0);
        nkp_journal_unlock(fd);
        g_autofree char *held = inactive_xml(f);
        g_assert_cmpuint(count_of(held, "snapshot='no'"), ==, 0);
        g_autofree char *note = NULL;
        g_assert_cmpint(nkp_vm_refuse_snapshots(f->ctx, f->v, "vm1", &note), ==, 1);
        g_assert_nonnull(strstr(note, "VM 'vm1': snapshot='no' set on 1 encrypted disk(s)"));
        g_autofree char *fixed = inactive_xml(f);
        g_assert_cmpuint(count_of(fixed, "snapshot='no'"), ==, 1);
        g_assert_cmpint(nkp_vm_refuse_snapshots(f->ctx, f->v, "vm1", NULL), ==, 0);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_autofree char *qemu_img = g_find_program_in_path("qemu-img");
        g_autofree char *qemu_io = g_find_program_in_path("qemu-io");
        if (!qemu_img || !qemu_io) {
                g_test_skip("qemu-img or qemu-io is not installed");
                return 77;
        }
#define ADD(name, fn) \
        g_test_add(name, Fixture, NULL, fixture_set_up, fn, fixture_tear_down)
        ADD("/disks/content", test_content);
        ADD("/disks/status-lists-every-disk", test_status_lists_every_disk);
        ADD("/disks/new-disks-follow", test_new_disks_follow);
        ADD("/disks/running", test_running);
        ADD("/disks/policy-off", test_policy_off);
        ADD("/disks/snapshot-no", test_snapshot_no);
        return g_test_run();
}

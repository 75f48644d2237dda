/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* plugin/lib/vm-revert.c without libvirt, against the real qemu-img: a
 * LUKS base and the LUKS overlay `vm snapshot` made over it (real files),
 * the VM's definition and the snapshot's XML in the shapes libvirt 9.0
 * writes them.  The plan (the chain at the snapshot, the new overlay's
 * name, every refusal), the overlay (LUKS, over the layer at the
 * snapshot, its size, the snapshot's files untouched, twice), the new
 * definition, the layers left behind, and a kill at each crash point
 * (nothing half-made the definition could name). */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

#define VM_UUID "6695eb01-f6a4-8304-79aa-97f2502e193f"
#define SEC "c74e92a6-7161-457a-beca-ec4560c127c5"
#define DEK_HEX "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

typedef struct {
        char *dir;
        char *base;  /* DIR/g1.qcow2: LUKS, the active layer at s1 */
        char *s1;    /* DIR/g1.s1: LUKS over base, the active layer now */
        char *xml;   /* the definition now: s1 over base */
        nkp_secret *value;
        NkpDomain *d;
} Fixture;

static bool have_qemu_img(void)
{
        g_autofree char *p = g_find_program_in_path("qemu-img");
        return p != NULL;
}

static char *run(const char *const *argv, int *ret_status)
{
        char *out = NULL;
        int status = 0;
        g_assert_true(g_spawn_sync(NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                                   &out, NULL, &status, NULL));
        *ret_status = status;
        return out;
}

/* A domain whose keysafe holds a key for vda (secret SEC) and a vTPM. */
static NkpDomain *domain_with_key(void)
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
        g_assert_cmpint(nkp_keysafe_put_dek(d->keysafe, kek, NKP_OBJECT_DISK, "vda", SEC, dek),
                        ==, 0);
        return d;
}

/* A definition with disk vda on `top`, over `below` (NULL: none) as
 * libvirt 9.0 writes it after nkp's snapshot. */
static char *domain_xml(const char *top, const char *below)
{
        g_autofree char *chain =
                below ? g_strdup_printf("<backingStore type='file'><format type='qcow2'/>"
                                        "<source file='%s'><encryption format='luks' "
                                        "engine='qemu'><secret type='passphrase' uuid='" SEC
                                        "'/></encryption></source><backingStore/>"
                                        "</backingStore>",
                                        below)
                      : g_strdup("");
        return g_strdup_printf(
                "<domain type='kvm'><name>g1</name><uuid>" VM_UUID "</uuid>"
                "<os><type arch='x86_64' machine='pc'>hvm</type>"
                "<cmdline>console=ttyS0 nkp.marker=M2</cmdline></os><devices>"
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                "<source file='%s'/>%s<target dev='vda' bus='virtio'/>"
                "<encryption format='luks' engine='qemu'><secret type='passphrase' uuid='" SEC
                "'/></encryption></disk>"
                "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
                "</devices></domain>",
                top, chain);
}

/* The XML libvirt 9.0 keeps of an offline disk-only snapshot `name` whose
 * overlay is `overlay`, taken when vda's active layer was `at` (the
 * <domain> inside is the definition of that moment). */
static char *snapshot_xml(const char *name, const char *memory, const char *how,
                          const char *overlay, const char *at, const char *below)
{
        g_autofree char *dom = domain_xml(at, below);
        return g_strdup_printf(
                "<domainsnapshot>\n  <name>%s</name>\n  <state>shutoff</state>\n"
                "  <creationTime>1764600000</creationTime>\n  <memory snapshot='%s'/>\n"
                "  <disks>\n    <disk name='vda' snapshot='%s' type='file'>\n"
                "      <driver type='qcow2'/>\n      <source file='%s'>\n"
                "        <encryption format='luks' engine='qemu'>\n"
                "          <secret type='passphrase' uuid='" SEC "'/>\n"
                "        </encryption>\n      </source>\n    </disk>\n"
                "    <disk name='hdc' snapshot='no'/>\n  </disks>\n  %s\n"
                "</domainsnapshot>\n",
                name, memory, how, overlay, dom);
}

/* The LUKS base and s1 overlay, made once (each LUKS creation pays QEMU's
 * PBKDF benchmark) and copied into each test's directory. */
static char *template_dir;

static void make_template(void)
{
        template_dir = testutil_mkdtemp();
        g_autofree char *base = g_build_filename(template_dir, "g1.qcow2", NULL);
        g_autofree char *s1 = g_build_filename(template_dir, "g1.s1", NULL);
        const char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", "--object",
                               "secret,id=s0,data=" DEK_HEX, "-o",
                               "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,"
                               "encrypt.hash-alg=sha512",
                               base, "64M", NULL };
        g_assert_cmpint(testutil_run_luks_create(argv), ==, 0);
        g_autoptr(nkp_secret) value = NULL;
        g_assert_cmpint(nkp_secret_new_copy(DEK_HEX, strlen(DEK_HEX), &value), ==, 0);
        /* Relative backing name: the copies in each test's directory
         * back onto their own base. */
        g_assert_cmpint(nkp_luks_overlay_create(s1, "g1.qcow2", "qcow2", 64 << 20, value), ==,
                        0);
}

static void fixture_setup(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!have_qemu_img()) {
                g_test_skip("qemu-img is not installed");
                return;
        }
        if (!template_dir)
                make_template();
        f->dir = testutil_mkdtemp();
        f->base = g_build_filename(f->dir, "g1.qcow2", NULL);
        f->s1 = g_build_filename(f->dir, "g1.s1", NULL);
        g_assert_cmpint(nkp_secret_new_copy(DEK_HEX, strlen(DEK_HEX), &f->value), ==, 0);
        const char *names[] = { "g1.qcow2", "g1.s1" };
        for (guint i = 0; i < G_N_ELEMENTS(names); i++) {
                g_autofree char *from = g_build_filename(template_dir, names[i], NULL);
                g_autofree char *bytes = NULL;
                gsize len = 0;
                g_assert_true(g_file_get_contents(from, &bytes, &len, NULL));
                g_autofree char *to = g_build_filename(f->dir, names[i], NULL);
                g_assert_true(g_file_set_contents(to, bytes, (gssize) len, NULL));
        }
        f->xml = domain_xml(f->s1, f->base);
        f->d = domain_with_key();
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
        (void) data;
        if (f->dir)
                testutil_rmtree(f->dir);
        g_free(f->dir);
        g_free(f->base);
        g_free(f->s1);
        g_free(f->xml);
        nkp_secret_free(f->value);
        nkp_domain_free(f->d);
}

static NkpRevertSnapshot *parse(const char *name, const char *xml)
{
        NkpRevertSnapshot *s = NULL;
        g_assert_cmpint(nkp_revert_snapshot_parse(name, xml, &s), ==, 0);
        return s;
}

/* The plan of reverting f's VM to s1, which must succeed. */
static GPtrArray *plan_s1(Fixture *f, const char *xml)
{
        g_autofree char *sx = snapshot_xml("s1", "no", "external", f->s1, f->base, NULL);
        g_autoptr(NkpRevertSnapshot) s = parse("s1", sx);
        GPtrArray *plan = NULL;
        g_assert_cmpint(nkp_revert_plan(f->d, xml, s, &plan), ==, 0);
        return plan;
}

static void test_parse(void)
{
        g_autofree char *sx = snapshot_xml("s1", "no", "external", "/v/g1.s1", "/v/g1.qcow2",
                                           NULL);
        g_autoptr(NkpRevertSnapshot) s = parse("s1", sx);
        g_assert_cmpstr(s->state, ==, "shutoff");
        g_assert_false(s->has_memory);
        g_assert_cmpuint(s->n_internal, ==, 0);
        g_assert_cmpuint(g_strv_length(s->external), ==, 1); /* hdc: snapshot='no' */
        g_assert_cmpstr(s->external[0], ==, "vda");
        g_assert_nonnull(strstr(s->domain_xml, "<source file=\"/v/g1.qcow2\"/>"));
        g_autoptr(NkpRevertSnapshot) bad = NULL;
        g_assert_cmpint(nkp_revert_snapshot_parse("x", "<domain/>", &bad), ==, -EBADMSG);
        g_assert_cmpint(nkp_revert_snapshot_parse("x", "<domainsnapshot", &bad), ==, -EBADMSG);
        g_assert_null(bad);
}

static void test_plan(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!f->dir)
                return;
        g_autoptr(GPtrArray) plan = plan_s1(f, f->xml);
        g_assert_cmpuint(plan->len, ==, 1);
        const NkpRevertDisk *rd = plan->pdata[0];
        g_assert_cmpstr(rd->target, ==, "vda");
        g_assert_cmpstr(rd->secret_uuid, ==, SEC);
        g_assert_cmpuint(rd->at_snapshot->len, ==, 1);
        g_assert_cmpstr(((NkpDiskLayer *) rd->at_snapshot->pdata[0])->path, ==, f->base);
        g_assert_cmpuint(rd->now->len, ==, 2);
        g_autofree char *want = g_build_filename(f->dir, "g1.s1-r1", NULL);
        g_assert_cmpstr(rd->overlay, ==, want);
        g_assert_false(g_file_test(want, G_FILE_TEST_EXISTS)); /* a plan writes nothing */
}

static char *qemu_img_info(const char *path)
{
        const char *argv[] = { "qemu-img", "info", "-U", "--output=json", path, NULL };
        int status = 0;
        char *out = run(argv, &status);
        g_assert_cmpint(status, ==, 0);
        return out;
}

static char *file_digest(const char *path)
{
        g_autofree char *data = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(path, &data, &len, NULL));
        return g_compute_checksum_for_data(G_CHECKSUM_SHA256, (const guchar *) data, len);
}

/* Reverting twice: each time a new LUKS overlay over the base, its size,
 * the snapshot's files byte for byte as they were; the definition names
 * the new chain with engine='qemu'; the layers left behind. */
static void test_overlay_and_definition(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!f->dir)
                return;
        g_autofree char *base_before = file_digest(f->base);
        g_autofree char *s1_before = file_digest(f->s1);
        g_autofree char *xml = g_strdup(f->xml);
        g_autofree char *sx = snapshot_xml("s1", "no", "external", f->s1, f->base, NULL);
        g_autoptr(GPtrArray) snapshots = g_ptr_array_new_with_free_func(nkp_revert_snapshot_free);
        g_ptr_array_add(snapshots, parse("s1", sx));
        for (int round = 1; round <= 2; round++) {
                g_autoptr(GPtrArray) plan = plan_s1(f, xml);
                const NkpRevertDisk *rd = plan->pdata[0];
                g_autofree char *name = g_strdup_printf("g1.s1-r%d", round);
                g_autofree char *want = g_build_filename(f->dir, name, NULL);
                g_assert_cmpstr(rd->overlay, ==, want);
                g_assert_cmpint(nkp_revert_make_overlay(rd, f->value), ==, 0);
                g_assert_cmpint(nkp_qcow2_is_luks(want), ==, 1);
                g_autofree char *tmp = g_strconcat(want, ".nkp-new", NULL);
                g_assert_false(g_file_test(tmp, G_FILE_TEST_EXISTS));
                g_autofree char *info = qemu_img_info(want);
                g_autofree char *backing = g_strdup_printf("\"backing-filename\": \"%s\"",
                                                           f->base);
                g_assert_nonnull(strstr(info, backing));
                g_assert_nonnull(strstr(info, "\"virtual-size\": 67108864"));

                g_autofree char *next = NULL;
                g_assert_cmpint(nkp_revert_definition(xml, plan, &next), ==, 0);
                g_autoptr(GPtrArray) layers = NULL;
                g_assert_cmpint(nkp_domain_disk_layers(next, strlen(next), "vda", &layers), ==,
                                0);
                g_assert_cmpuint(layers->len, ==, 2);
                g_assert_cmpstr(((NkpDiskLayer *) layers->pdata[0])->path, ==, want);
                g_assert_cmpstr(((NkpDiskLayer *) layers->pdata[1])->path, ==, f->base);
                for (guint k = 0; k < 2; k++) {
                        g_assert_true(((NkpDiskLayer *) layers->pdata[k])->encrypted);
                        g_assert_cmpstr(((NkpDiskLayer *) layers->pdata[k])->secret_uuid, ==,
                                        SEC);
                }
                g_assert_null(strstr(next, "engine=\"\"")); /* every engine written */
                g_autofree char *old = g_strdup_printf("\"%s\"", f->s1);
                g_assert_null(strstr(next, old)); /* off the old branch */
                g_assert_nonnull(strstr(next, "nkp.marker=M2")); /* the rest kept */
                g_assert_nonnull(strstr(next, "<tpm model=\"tpm-crb\">"));

                /* Left behind: s1 (no snapshot's chain holds it) the first
                 * time, the first revert's overlay the second time. */
                g_autoptr(GPtrArray) unneeded = g_ptr_array_new_with_free_func(g_free);
                g_autoptr(GPtrArray) needed = g_ptr_array_new_with_free_func(g_free);
                nkp_revert_abandoned(plan, snapshots, unneeded, needed);
                g_assert_cmpuint(unneeded->len, ==, 1);
                g_assert_cmpuint(needed->len, ==, 0);
                g_autofree char *prev = round == 1 ? g_strdup(f->s1)
                                                   : g_build_filename(f->dir, "g1.s1-r1", NULL);
                g_autofree char *item = g_strdup_printf("vda %s", prev);
                g_assert_cmpstr(unneeded->pdata[0], ==, item);
                g_free(xml);
                xml = g_steal_pointer(&next);
        }
        g_autofree char *base_after = file_digest(f->base);
        g_autofree char *s1_after = file_digest(f->s1);
        g_assert_cmpstr(base_after, ==, base_before);
        g_assert_cmpstr(s1_after, ==, s1_before);
}

/* A later snapshot s2 taken over s1 needs s1: kept, not "abandoned". */
static void test_abandoned_needed(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!f->dir)
                return;
        g_autoptr(GPtrArray) plan = plan_s1(f, f->xml);
        g_autoptr(GPtrArray) snapshots = g_ptr_array_new_with_free_func(nkp_revert_snapshot_free);
        g_autofree char *sx1 = snapshot_xml("s1", "no", "external", f->s1, f->base, NULL);
        g_autofree char *s2 = g_build_filename(f->dir, "g1.s2", NULL);
        g_autofree char *sx2 = snapshot_xml("s2", "no", "external", s2, f->s1, f->base);
        g_ptr_array_add(snapshots, parse("s1", sx1));
        g_ptr_array_add(snapshots, parse("s2", sx2));
        g_autoptr(GPtrArray) unneeded = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) needed = g_ptr_array_new_with_free_func(g_free);
        nkp_revert_abandoned(plan, snapshots, unneeded, needed);
        g_assert_cmpuint(unneeded->len, ==, 0);
        g_assert_cmpuint(needed->len, ==, 1);
        g_autofree char *item = g_strdup_printf("vda %s", f->s1);
        g_assert_cmpstr(needed->pdata[0], ==, item);
}

/* Each refusal: its errno, one line naming what is wrong, nothing written. */
static void refused(Fixture *f, const char *xml, const char *sx, int err, const char *words)
{
        g_autoptr(NkpRevertSnapshot) s = parse("s1", sx);
        g_autoptr(GPtrArray) plan = NULL;
        g_autoptr(GHashTable) before = testutil_snapshot_tree(f->dir);
        g_assert_cmpint(nkp_revert_plan(f->d, xml, s, &plan), ==, err);
        g_assert_null(plan);
        g_assert_nonnull(strstr(nkp_error_message(), words));
        g_assert_null(strchr(nkp_error_message(), '\n'));
        testutil_assert_same_tree(before, f->dir);
        nkp_error_clear();
}

static void test_refusals(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!f->dir)
                return;
        g_autofree char *mem = snapshot_xml("s1", "internal", "internal", f->s1, f->base, NULL);
        refused(f, f->xml, mem, -EINVAL, "is not a disk-only external snapshot");
        g_autofree char *intl = snapshot_xml("s1", "no", "internal", f->s1, f->base, NULL);
        refused(f, f->xml, intl, -EINVAL, "it has internal disk snapshots");
        g_autofree char *missing = g_build_filename(f->dir, "gone.qcow2", NULL);
        g_autofree char *gone = snapshot_xml("s1", "no", "external", f->s1, missing, NULL);
        refused(f, f->xml, gone, -ENOENT, "which is missing");
        /* A plain qcow2 layer at the snapshot. */
        g_autofree char *plain = g_build_filename(f->dir, "plain.qcow2", NULL);
        const char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", plain, "1M", NULL };
        int status = 0;
        g_free(run(argv, &status));
        g_assert_cmpint(status, ==, 0);
        g_autofree char *pl = snapshot_xml("s1", "no", "external", f->s1, plain, NULL);
        refused(f, f->xml, pl, -EPERM, "is not encrypted");
        /* The layer at s1 is the active one again (blockcommit): written since. */
        g_autofree char *committed = domain_xml(f->base, NULL);
        g_autofree char *sx = snapshot_xml("s1", "no", "external", f->s1, f->base, NULL);
        refused(f, committed, sx, -ESTALE, "has been written since");
        /* A disk nkp holds no key for. */
        g_autofree char *other = snapshot_xml("s1", "no", "external", f->s1, f->base, NULL);
        char *p = strstr(other, "name='vda'");
        memcpy(p, "name='vdz'", 10);
        refused(f, f->xml, other, -EINVAL, "is not encrypted by nkp");
}

/* Killed at each crash point of making the overlay: no half-made file
 * under the overlay's name (a .nkp-new at most, which the rerun
 * overwrites); once renamed, the rerun picks the next name. */
static void test_crash(Fixture *f, gconstpointer data)
{
        (void) data;
        if (!f->dir)
                return;
        const char *points[] = { "revert-overlay-made", "revert-overlay-renamed" };
        for (size_t i = 0; i < G_N_ELEMENTS(points); i++) {
                g_autoptr(GPtrArray) plan = plan_s1(f, f->xml);
                const NkpRevertDisk *rd = plan->pdata[0];
                pid_t pid = fork();
                g_assert_cmpint(pid, >=, 0);
                if (pid == 0) {
                        g_setenv("NKP_TEST_CRASH_AT", points[i], TRUE);
                        (void) nkp_revert_make_overlay(rd, f->value);
                        _exit(3); /* the crash point was not reached */
                }
                int status = 0;
                g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
                g_assert_true(WIFSIGNALED(status));
                g_assert_cmpint(WTERMSIG(status), ==, SIGKILL);
                g_autofree char *tmp = g_strconcat(rd->overlay, ".nkp-new", NULL);
                g_autofree char *r1 = g_build_filename(f->dir, "g1.s1-r1", NULL);
                g_assert_cmpstr(rd->overlay, ==, r1);
                if (i == 0) {
                        g_assert_true(g_file_test(tmp, G_FILE_TEST_EXISTS));
                        g_assert_false(g_file_test(r1, G_FILE_TEST_EXISTS));
                } else {
                        g_assert_false(g_file_test(tmp, G_FILE_TEST_EXISTS));
                        g_assert_cmpint(nkp_qcow2_is_luks(r1), ==, 1);
                }
        }
        g_autoptr(GPtrArray) plan = plan_s1(f, f->xml);
        g_autofree char *r2 = g_build_filename(f->dir, "g1.s1-r2", NULL);
        g_assert_cmpstr(((NkpRevertDisk *) plan->pdata[0])->overlay, ==, r2);
        g_assert_cmpint(nkp_revert_make_overlay(plan->pdata[0], f->value), ==, 0);
        g_assert_cmpint(nkp_qcow2_is_luks(r2), ==, 1);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/vm-revert/parse", test_parse);
        g_test_add("/vm-revert/plan", Fixture, NULL, fixture_setup, test_plan, fixture_teardown);
        g_test_add("/vm-revert/overlay-and-definition", Fixture, NULL, fixture_setup,
                   test_overlay_and_definition, fixture_teardown);
        g_test_add("/vm-revert/abandoned-needed", Fixture, NULL, fixture_setup,
                   test_abandoned_needed, fixture_teardown);
        g_test_add("/vm-revert/refusals", Fixture, NULL, fixture_setup, test_refusals,
                   fixture_teardown);
        g_test_add("/vm-revert/crash", Fixture, NULL, fixture_setup, test_crash,
                   fixture_teardown);
        int r = g_test_run();
        if (template_dir)
                testutil_rmtree(template_dir);
        g_free(template_dir);
        return r;
}

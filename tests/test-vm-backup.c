/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* vm-backup.c: the backup manifest (outside input: a backup directory can
 * come from anywhere), nkp's own-job marks, and nkpd's alarm for a memory
 * snapshot whose job no look saw (libvirt's test driver).  Backups,
 * restores and the alarms against the real libvirt/QEMU:
 * integration/t-nkp-backup.sh, t-nkp-snapshot-internal.sh. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libvirt/libvirt.h>

#include "testutil.h"

#define GOOD                                                     \
        "nkp-backup 1\n"                                         \
        "vm=vm1\n"                                               \
        "uuid=6f1c1a8e-1d0e-4b57-9b44-0d9a3c1f2e77\n"            \
        "key_id=0b5f1a8e-1d0e-4b57-9b44-0d9a3c1f2e01\n"          \
        "disk=vda 1a2b3c4d-1d0e-4b57-9b44-0d9a3c1f2e02\n"        \
        "disk=vdb 1a2b3c4d-1d0e-4b57-9b44-0d9a3c1f2e03\n"        \
        "level=0 nkp-1796136166-0\n"                             \
        "level=1 nkp-1796136191-1\n"

static void test_round_trip(void)
{
        g_autoptr(NkpBackupManifest) m = NULL;
        g_assert_cmpint(nkp_backup_manifest_parse(GOOD, strlen(GOOD), &m), ==, 0);
        g_assert_cmpstr(m->vm, ==, "vm1");
        g_assert_cmpuint(m->n_disks, ==, 2);
        g_assert_cmpstr(m->targets[1], ==, "vdb");
        g_assert_cmpuint(m->n_levels, ==, 2);
        g_assert_cmpstr(m->checkpoints[1], ==, "nkp-1796136191-1");
        g_autofree char *text = nkp_backup_manifest_format(m);
        g_assert_cmpstr(text, ==, GOOD);
        g_assert_false(m->has_mac);
        /* with a MAC line: kept byte for byte */
        const char *mac = "mac=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGw==\n";
        g_autofree char *with = g_strconcat(GOOD, mac, NULL);
        g_autoptr(NkpBackupManifest) m2 = NULL;
        g_assert_cmpint(nkp_backup_manifest_parse(with, strlen(with), &m2), ==, 0);
        g_assert_true(m2->has_mac);
        g_assert_cmpuint(m2->mac[27], ==, 27);
        g_autofree char *text2 = nkp_backup_manifest_format(m2);
        g_assert_cmpstr(text2, ==, with);
}

/* Each a small change of GOOD: every one refused with -EBADMSG and a message. */
static const struct {
        const char *from, *to;
} hostile[] = {
        { "nkp-backup 1", "nkp-backup 2" },
        { "vm=vm1\n", "" },
        { "vm=vm1", "vm=" },
        { "uuid=6f1c", "uuid=../../" },
        { "key_id=0b5f1a8e", "key_id=0b5f1a8x" },
        { "disk=vda", "disk=../vda" },           /* a file name outside DIR */
        { "disk=vda", "disk=vda/x" },
        { "disk=vdb", "disk=vda" },              /* a disk twice */
        { "disk=vda 1a2b", "disk=vda  1a2b" },
        { "level=0", "level=1" },                /* levels out of order */
        { "level=1 nkp-1796136191-1", "level=2 nkp-1796136191-1" },
        { "nkp-1796136166-0", "-" },             /* incremental after an offline level */
        { "nkp-1796136191-1", "nkp-x" },
        { "nkp-1796136191-1", "nkp-1</name><x>" }, /* into libvirt's XML */
        { "level=1 nkp-1796136191-1\n", "level=1 nkp-1796136191-1\nextra=1\n" },
        { "level=1 nkp-1796136191-1\n", "level=1 nkp-1796136191-1" }, /* no final newline */
        { "level=0 nkp-1796136166-0\nlevel=1 nkp-1796136191-1\n", "" }, /* no level */
        { "vm=vm1\n", "vm=vm1\r\n" },
        { "level=1 nkp-1796136191-1\n", "level=1 nkp-1796136191-1\nmac=AAAA\n" }, /* short */
        { "level=1 nkp-1796136191-1\n", "level=1 nkp-1796136191-1\nmac=!!\n" },
        { "level=0 nkp", "mac=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\nlevel=0 nkp" }, /* not last */
};

static void test_hostile(void)
{
        for (size_t i = 0; i < G_N_ELEMENTS(hostile); i++) {
                g_autofree char *text = NULL;
                const char *at = strstr(GOOD, hostile[i].from);
                g_assert_nonnull(at);
                text = g_strdup_printf("%.*s%s%s", (int) (at - GOOD), GOOD, hostile[i].to,
                                       at + strlen(hostile[i].from));
                NkpBackupManifest *m = NULL;
                nkp_error_clear();
                int r = nkp_backup_manifest_parse(text, strlen(text), &m);
                if (r != -EBADMSG)
                        g_error("case %zu ('%s' -> '%s'): %d", i, hostile[i].from, hostile[i].to, r);
                g_assert_null(m);
                g_assert_nonnull(strstr(nkp_error_message(), "damaged"));
        }
        /* a NUL, and a manifest over the cap */
        const char nul[] = "nkp-backup 1\nvm=a\0b\n";
        NkpBackupManifest *m = NULL;
        g_assert_cmpint(nkp_backup_manifest_parse(nul, sizeof nul - 1, &m), ==, -EBADMSG);
        g_autofree char *big = g_strnfill(70000, 'x');
        g_assert_cmpint(nkp_backup_manifest_parse(big, strlen(big), &m), ==, -EFBIG);
        g_assert_null(m);
}

/* restore-backup of a directory with a hostile manifest: refused before
 * anything is looked up or written (no libvirt connection is even needed). */
static void test_restore_refused(void)
{
        g_autofree char *root = testutil_mkdtemp();
        nkp_context *ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        g_autofree char *dir = g_build_filename(root, "bk", NULL);
        g_autofree char *disks = g_build_filename(root, "disks", NULL);
        g_assert_cmpint(g_mkdir_with_parents(dir, 0700), ==, 0);
        g_assert_cmpint(g_mkdir_with_parents(disks, 0700), ==, 0);
        g_autofree char *mpath = g_build_filename(dir, "manifest", NULL);
        const char *evil = "nkp-backup 1\nvm=vm1\nuuid=6f1c1a8e-1d0e-4b57-9b44-0d9a3c1f2e77\n"
                           "key_id=0b5f1a8e-1d0e-4b57-9b44-0d9a3c1f2e01\n"
                           "disk=../../etc/x 1a2b3c4d-1d0e-4b57-9b44-0d9a3c1f2e02\nlevel=0 -\n";
        g_assert_true(g_file_set_contents(mpath, evil, -1, NULL));
        GHashTable *before = testutil_snapshot_tree(root);
        g_autofree char *name = NULL;
        g_assert_cmpint(nkp_vm_restore_backup(ctx, NULL, dir, "x", disks, &name), ==, -EBADMSG);
        g_assert_null(name);
        testutil_assert_same_tree(before, root);
        /* no manifest at all */
        g_assert_cmpint(unlink(mpath), ==, 0);
        g_assert_cmpint(nkp_vm_restore_backup(ctx, NULL, dir, NULL, NULL, NULL), ==, -ENOENT);
        g_assert_nonnull(strstr(nkp_error_message(), "holds no nkp backup"));
        nkp_context_free(ctx);
        testutil_rmtree(root);
}

/* nkp's own jobs: claimed from the start to 30 s after the end; a mark never
 * ended claims for 6 h; another VM or kind is not claimed; a claim uses the
 * mark up (a plain job right after nkp's own alarms). */
static void test_own_job(void)
{
        g_autofree char *root = testutil_mkdtemp();
        nkp_context *ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        const char *u = "6f1c1a8e-1d0e-4b57-9b44-0d9a3c1f2e77";
        int64_t now = g_get_real_time() / G_USEC_PER_SEC;
        g_assert_false(nkp_own_job_claims(ctx, u, "backup", now));
        g_assert_cmpint(nkp_own_job_mark(ctx, u, "backup", false), ==, 0);
        g_assert_false(nkp_own_job_claims(ctx, u, "backup", now + 7 * 3600)); /* too late */
        g_assert_false(nkp_own_job_claims(ctx, u, "copy", now));
        g_assert_false(nkp_own_job_claims(ctx, "7f1c1a8e-1d0e-4b57-9b44-0d9a3c1f2e77", "backup", now));
        g_assert_false(nkp_own_job_claims(ctx, u, "backup", now - 60)); /* before it */
        g_assert_true(nkp_own_job_claims(ctx, u, "backup", now + 3600));  /* never ended */
        g_assert_false(nkp_own_job_claims(ctx, u, "backup", now));        /* one job, one claim */
        g_assert_cmpint(nkp_own_job_mark(ctx, u, "backup", false), ==, 0);
        g_assert_cmpint(nkp_own_job_mark(ctx, u, "backup", true), ==, 0);
        g_assert_false(nkp_own_job_claims(ctx, u, "backup", now + 120));  /* 30 s after the end */
        g_assert_true(nkp_own_job_claims(ctx, u, "backup", now + 1));
        g_assert_false(nkp_own_job_claims(ctx, u, "backup", now + 1));
        /* claimed while the job ran: its end mark does not make it again */
        g_assert_cmpint(nkp_own_job_mark(ctx, u, "copy", false), ==, 0);
        g_assert_true(nkp_own_job_claims(ctx, u, "copy", now));
        g_assert_cmpint(nkp_own_job_mark(ctx, u, "copy", true), ==, 0);
        g_assert_false(nkp_own_job_claims(ctx, u, "copy", now + 1));
        nkp_context_free(ctx);
        testutil_rmtree(root);
}

/* The alarm naming `file` on VM "test", or NULL. */
static const char *memory_alarm(nkp_context *ctx, const char *file, char **ret_msg)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_alarm_list(ctx, &list, &n), ==, 0);
        *ret_msg = NULL;
        for (size_t i = 0; i < n; i++)
                if (strcmp(nkp_alarm_kind(list[i]), "vm-clear-save") == 0 &&
                    strcmp(nkp_alarm_subject(list[i]), "test") == 0 &&
                    strstr(nkp_alarm_message(list[i]), file))
                        *ret_msg = g_strdup(nkp_alarm_message(list[i]));
        nkp_alarm_list_free(list, n);
        return *ret_msg;
}

/* A memory snapshot of `dom` to `file`; the test driver writes no file:
 * made here, as QEMU would have written it (nkpd alarms only a file that
 * exists). */
static void memory_snapshot(virDomainPtr dom, const char *name, const char *file)
{
        g_assert_true(g_file_set_contents(file, "guest memory", -1, NULL));
        g_autofree char *xml = g_strdup_printf(
                "<domainsnapshot><name>%s</name><memory snapshot='external' file='%s'/>"
                "<disks><disk name='vda' snapshot='no'/></disks></domainsnapshot>",
                name, file);
        virDomainSnapshotPtr snap = virDomainSnapshotCreateXML(dom, xml, 0);
        g_assert_nonnull(snap);
        virDomainSnapshotFree(snap);
}

/* VM "test" (`uuid`) becomes an nkp VM: a keysafe in its definition. */
static void make_nkp_vm(nkp_virt *v, const char *uuid)
{
        g_autoptr(nkp_keysafe) ks = NULL;
        g_assert_cmpint(nkp_keysafe_new_for(uuid, "p1", "0b5f1a8e-1d0e-4b57-9b44-0d9a3c1f2e01",
                                            "00000000000000000000000000000000"
                                            "00000000000000000000000000000000",
                                            &ks),
                        ==, 0);
        g_autoptr(nkp_secret) kek = NULL, dek = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KEK_SIZE, &kek), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(NKP_DEK_SIZE, &dek), ==, 0);
        g_assert_cmpint(nkp_keysafe_put_dek(ks, kek, NKP_OBJECT_DISK, "vda",
                                            "1a2b3c4d-1d0e-4b57-9b44-0d9a3c1f2e02", dek),
                        ==, 0);
        g_autofree char *ks_xml = NULL;
        g_assert_cmpint(nkp_keysafe_format(ks, &ks_xml), ==, 0);
        g_assert_cmpint(nkp_virt_keysafe_set(v, "test", ks_xml), ==, 0);
}

/* ROOT/run/libvirt/qemu/test.xml, the status XML libvirt keeps of running VM "test". */
static void write_status_xml(const char *root, const char *uuid)
{
        g_autofree char *run = g_build_filename(root, "run/libvirt/qemu", NULL);
        g_assert_cmpint(g_mkdir_with_parents(run, 0700), ==, 0);
        g_autofree char *status = g_build_filename(run, "test.xml", NULL);
        g_autofree char *status_xml = g_strdup_printf(
                "<domstatus state='running'><domain type='test'><name>test</name>"
                "<uuid>%s</uuid></domain></domstatus>\n", uuid);
        g_assert_true(g_file_set_contents(status, status_xml, -1, NULL));
}

/* The test driver's domains live as long as the process: each test
 * deletes the snapshots it made. */
static void delete_snapshots(virDomainPtr dom)
{
        virDomainSnapshotPtr *snaps = NULL;
        int n = virDomainListAllSnapshots(dom, &snaps, 0);
        g_assert_cmpint(n, >=, 0);
        for (int i = 0; i < n; i++) {
                g_assert_cmpint(virDomainSnapshotDelete(snaps[i], 0), ==, 0);
                virDomainSnapshotFree(snaps[i]);
        }
        free(snaps);
}

/* libvirt's test driver's VM "test" under a fresh ROOT with its status
 * XML; closed with its snapshots deleted and its keysafe removed (the test
 * driver's domains live as long as the process). */
typedef struct {
        char *root;
        nkp_context *ctx;
        nkp_virt *v;
        virDomainPtr dom;
        char uuid[VIR_UUID_STRING_BUFLEN];
} MemFixture;

static void mem_fixture_open(MemFixture *m)
{
        m->root = testutil_mkdtemp();
        g_assert_cmpint(nkp_context_new(m->root, &m->ctx), ==, 0);
        g_assert_cmpint(nkp_virt_open("test:///default", 0, &m->v), ==, 0);
        m->dom = virDomainLookupByName(nkp_virt_connection(m->v), "test");
        g_assert_nonnull(m->dom);
        g_assert_cmpint(virDomainGetUUIDString(m->dom, m->uuid), ==, 0);
        write_status_xml(m->root, m->uuid);
}

static void mem_fixture_close(MemFixture *m)
{
        if (!m->root)
                return;
        delete_snapshots(m->dom);
        g_assert_cmpint(nkp_virt_keysafe_set(m->v, "test", NULL), ==, 0);
        virDomainFree(m->dom);
        nkp_virt_close(m->v);
        nkp_context_free(m->ctx);
        testutil_rmtree(m->root);
        g_free(m->root);
}
G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(MemFixture, mem_fixture_close)

/* A memory snapshot whose job was over before any look (a small guest's
 * memory, written in well under nkpd's 0.2-0.5 s look): the status XML
 * libvirt writes at the job's end makes nkpd read the current snapshot and
 * alarm its file, once per snapshot; a VM without a keysafe alarms
 * nothing. */
static void test_memory_snapshot_after_job(void)
{
        g_auto(MemFixture) m = { 0 };
        mem_fixture_open(&m);
        g_autofree char *mem = g_build_filename(m.root, "test.mem", NULL);
        g_autofree char *msg = NULL;
        NkpCopyWatch *w = nkp_copy_watch_new();

        /* not an nkp VM yet: its memory snapshot is libvirt's business */
        memory_snapshot(m.dom, "m0", mem);
        g_assert_false(nkp_copy_watch_status_written(m.ctx, w, "test"));
        nkp_copy_watch_process(m.ctx, m.v, w);
        g_assert_null(memory_alarm(m.ctx, mem, &msg));

        make_nkp_vm(m.v, m.uuid);

        /* the VM has a keysafe now: at the next status write its current
         * snapshot m0 (made since the watch began) is alarmed */
        nkp_copy_watch_status_written(m.ctx, w, "test");
        nkp_copy_watch_process(m.ctx, m.v, w);
        g_assert_nonnull(memory_alarm(m.ctx, mem, &msg));
        g_assert_nonnull(strstr(msg, "nkpctl vm snapshot test"));
        g_clear_pointer(&msg, g_free);

        /* once per snapshot: cleared, the next status write does not raise it again */
        g_assert_cmpint(nkp_alarm_clear(m.ctx, "vm-clear-save", "test"), ==, 0);
        nkp_copy_watch_status_written(m.ctx, w, "test");
        nkp_copy_watch_process(m.ctx, m.v, w);
        g_assert_null(memory_alarm(m.ctx, mem, &msg));

        /* the next memory snapshot, to another file, is */
        g_autofree char *mem2 = g_build_filename(m.root, "test2.mem", NULL);
        memory_snapshot(m.dom, "m1", mem2);
        nkp_copy_watch_status_written(m.ctx, w, "test");
        nkp_copy_watch_process(m.ctx, m.v, w);
        g_assert_nonnull(memory_alarm(m.ctx, mem2, &msg));
        g_clear_pointer(&msg, g_free);
        g_assert_cmpint(nkp_alarm_clear(m.ctx, "vm-clear-save", "test"), ==, 0);

        nkp_copy_watch_free(w);
}

/* The record's text (ROOT/var/lib/nkp/memory-snapshots), "" when none;
 * always mode 0600. */
static char *record_text(const char *root)
{
        g_autofree char *path = g_build_filename(root, "var/lib/nkp/memory-snapshots", NULL);
        struct stat sb;
        if (stat(path, &sb) < 0)
                return g_strdup("");
        g_assert_cmpuint(sb.st_mode & 07777, ==, 0600);
        char *text = NULL;
        g_assert_true(g_file_get_contents(path, &text, NULL, NULL));
        return text;
}

/* The line "UUID CREATED NAME" of snapshot `name` of `dom`. */
static char *record_line(virDomainPtr dom, const char *uuid, const char *name)
{
        virDomainSnapshotPtr snap = virDomainSnapshotLookupByName(dom, name, 0);
        g_assert_nonnull(snap);
        char *xml = virDomainSnapshotGetXMLDesc(snap, 0);
        g_autoptr(NkpRevertSnapshot) s = NULL;
        g_assert_cmpint(nkp_revert_snapshot_parse(name, xml, &s), ==, 0);
        free(xml);
        virDomainSnapshotFree(snap);
        g_assert_cmpint(s->created, >, 0);
        return g_strdup_printf("%s %" G_GINT64_FORMAT " %s\n", uuid, s->created, name);
}

/* A restart of nkpd: a new watch (same ROOT) and its start scan. */
static void restart_scan(nkp_context *ctx, nkp_virt *v)
{
        NkpCopyWatch *w = nkp_copy_watch_new();
        nkp_copy_watch_start_scan(ctx, v, w);
        nkp_copy_watch_free(w);
}

/* Memory snapshots made while nkpd was not running (stopped, or not yet
 * installed): the start scan alarms each one in clear once, by name and
 * file, and records it; a restart after the admin cleared the alarm raises
 * nothing, neither at its scan nor when the watch then reads the current
 * snapshot; a snapshot without a memory file, a memory file deleted since
 * and a VM that is not nkp's raise nothing; a damaged or unreadable record
 * is taken as empty (alarmed again, written anew); deleted snapshots leave
 * the record.  (A file in a protected directory needs real fscrypt:
 * integration/t-nkp-snapshot-internal.sh.) */
static void test_memory_snapshot_start_scan(void)
{
        g_auto(MemFixture) m = { 0 };
        mem_fixture_open(&m);
        g_autofree char *mem = g_build_filename(m.root, "old.mem", NULL);
        g_autofree char *gone = g_build_filename(m.root, "gone.mem", NULL);
        g_autofree char *msg = NULL;
        delete_snapshots(m.dom);

        /* before nkp: a memory snapshot in clear, one whose file was
         * deleted since, one without a memory file (the test driver has no
         * disk-only snapshot: memory 'no' becomes 'internal', no file) */
        memory_snapshot(m.dom, "old", mem);
        memory_snapshot(m.dom, "gone", gone);
        g_assert_cmpint(unlink(gone), ==, 0);
        virDomainSnapshotPtr d = virDomainSnapshotCreateXML(
                m.dom, "<domainsnapshot><name>disk</name><memory snapshot='no'/></domainsnapshot>",
                0);
        g_assert_nonnull(d);
        virDomainSnapshotFree(d);

        /* not an nkp VM: nothing alarmed, nothing recorded */
        restart_scan(m.ctx, m.v);
        g_assert_null(memory_alarm(m.ctx, mem, &msg));
        g_autofree char *empty = record_text(m.root);
        g_assert_cmpstr(empty, ==, "");

        /* nkp installed, nkpd starts: the old snapshot is alarmed, alone */
        make_nkp_vm(m.v, m.uuid);
        restart_scan(m.ctx, m.v);
        g_assert_nonnull(memory_alarm(m.ctx, mem, &msg));
        g_assert_nonnull(strstr(msg, "Snapshot 'old' of VM 'test'"));
        g_assert_nonnull(strstr(msg, "virsh snapshot-delete test old"));
        g_assert_nonnull(strstr(msg, "nkpctl vm snapshot test NAME"));
        g_assert_null(strstr(msg, "gone"));
        g_assert_null(strstr(msg, "'disk'"));
        g_clear_pointer(&msg, g_free);
        g_autofree char *line = record_line(m.dom, m.uuid, "old");
        g_autofree char *rec = record_text(m.root);
        g_assert_cmpstr(rec, ==, line);

        /* cleared by the admin, nkpd restarts: not raised again, neither by
         * the scan nor by the watch reading the current snapshot */
        g_assert_cmpint(nkp_alarm_clear(m.ctx, "vm-clear-save", "test"), ==, 0);
        restart_scan(m.ctx, m.v);
        g_assert_null(memory_alarm(m.ctx, mem, &msg));
        NkpCopyWatch *w = nkp_copy_watch_new();
        nkp_copy_watch_start_scan(m.ctx, m.v, w);
        memory_snapshot(m.dom, "cur", mem);
        g_autofree char *cur_line = record_line(m.dom, m.uuid, "cur");
        nkp_copy_watch_status_written(m.ctx, w, "test");
        nkp_copy_watch_process(m.ctx, m.v, w);
        g_assert_nonnull(memory_alarm(m.ctx, mem, &msg)); /* the new one is */
        g_assert_nonnull(strstr(msg, "Snapshot 'cur'"));
        g_clear_pointer(&msg, g_free);
        nkp_copy_watch_free(w);
        g_assert_cmpint(nkp_alarm_clear(m.ctx, "vm-clear-save", "test"), ==, 0);
        restart_scan(m.ctx, m.v); /* and the watch recorded it */
        g_assert_null(memory_alarm(m.ctx, mem, &msg));
        g_clear_pointer(&rec, g_free);
        rec = record_text(m.root);
        g_assert_nonnull(strstr(rec, line));
        g_assert_nonnull(strstr(rec, cur_line));

        /* a damaged record: taken as empty, both alarmed again in one
         * alarm, the record written anew */
        g_autofree char *path = g_build_filename(m.root, "var/lib/nkp/memory-snapshots", NULL);
        g_autofree char *damaged = g_strconcat(line, "not a line\n", NULL);
        g_assert_true(g_file_set_contents(path, damaged, -1, NULL));
        g_assert_cmpint(chmod(path, 0600), ==, 0);
        restart_scan(m.ctx, m.v);
        g_assert_nonnull(memory_alarm(m.ctx, mem, &msg));
        g_assert_true(strstr(msg, "So do its snapshots 'old'") ||
                         strstr(msg, "So do its snapshots 'cur'"));
        g_clear_pointer(&msg, g_free);
        g_clear_pointer(&rec, g_free);
        rec = record_text(m.root);
        g_assert_nonnull(strstr(rec, line));
        g_assert_nonnull(strstr(rec, cur_line));
        g_assert_null(strstr(rec, "not a line"));
        g_assert_cmpint(nkp_alarm_clear(m.ctx, "vm-clear-save", "test"), ==, 0);

        /* unreadable to nkp (not 0600): the same */
        g_assert_cmpint(chmod(path, 0644), ==, 0);
        restart_scan(m.ctx, m.v);
        g_assert_nonnull(memory_alarm(m.ctx, mem, &msg));
        g_clear_pointer(&msg, g_free);
        g_assert_cmpint(nkp_alarm_clear(m.ctx, "vm-clear-save", "test"), ==, 0);
        restart_scan(m.ctx, m.v);
        g_assert_null(memory_alarm(m.ctx, mem, &msg));

        /* the snapshot deleted: its line goes at the next start */
        virDomainSnapshotPtr old = virDomainSnapshotLookupByName(m.dom, "old", 0);
        g_assert_nonnull(old);
        g_assert_cmpint(virDomainSnapshotDelete(old, 0), ==, 0);
        virDomainSnapshotFree(old);
        restart_scan(m.ctx, m.v);
        g_clear_pointer(&rec, g_free);
        rec = record_text(m.root);
        g_assert_cmpstr(rec, ==, cur_line);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/vm-backup/manifest/round-trip", test_round_trip);
        g_test_add_func("/vm-backup/manifest/hostile", test_hostile);
        g_test_add_func("/vm-backup/restore/refused", test_restore_refused);
        g_test_add_func("/vm-backup/own-job", test_own_job);
        g_test_add_func("/vm-backup/copy-watch/memory-snapshot-after-job",
                        test_memory_snapshot_after_job);
        g_test_add_func("/vm-backup/copy-watch/memory-snapshot-start-scan",
                        test_memory_snapshot_start_scan);
        return g_test_run();
}

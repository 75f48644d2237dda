/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Reverting an nkp VM to a disk-only snapshot (issue 16;
 * docs/snapshots-clones.md, "Reverting").
 *
 * libvirt 9.0 refuses `virsh snapshot-revert` of external snapshots ("revert
 * to external snapshot not supported yet").  What a disk-only snapshot S
 * records is enough to go back by hand, and `nkpctl vm revert` does that:
 *  - the <domain> inside S's XML has each disk's chain of that moment, whose
 *    active layer then is the state at S (S's own <disks><source> is the
 *    overlay S made, which took every later write);
 *  - the state at S must stay reusable (revert twice), so that layer is not
 *    written: a NEW LUKS overlay (under the disk's own secret, made as `vm
 *    snapshot` makes them, vm-snapshot.c) goes on top of it and becomes the
 *    disk's active layer, with the chain below written into the definition
 *    (<backingStore>, engine='qemu': without them libvirt 9.0 cannot start
 *    it);
 *  - the layers of the branch left behind are not touched: they are listed
 *    (or, with NKP_VM_REVERT_DELETE_ABANDONED, deleted when no snapshot's
 *    chain needs them);
 *  - S is made libvirt's current snapshot again (snapshotCreateXML of its
 *    own XML, REDEFINE | CURRENT); a refusal there is reported, not fatal:
 *    the disks are back all the same.
 * The rest of the definition (vTPM, memory, the kernel command line) stays
 * as it is now: a disk-only snapshot holds no vTPM state, as in libvirt.
 *
 * Crash safety without a journal: each overlay is made as FILE.nkp-new and
 * renamed to FILE once complete; the definition is switched last, in one
 * define.  A kill before it leaves the VM on its old chain (plus a
 * FILE.nkp-new that the rerun overwrites, or an unused FILE that it leaves
 * alone: docs/snapshots-clones.md); after it, on the new chain.  An error
 * before it removes the overlays made.  Crash points: revert-overlay-made, revert-overlay-renamed,
 * revert-defined. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libxml/parser.h>
#include <libxml/tree.h>

#include "dl-libvirt.h"
#include "nkp-private.h"
#include "nkp-xml.h"

struct nkp_revert_result {
        GPtrArray *items[NKP_REVERT_N_ITEMS]; /* "TARGET PATH" */
        char *current_error;
        bool vtpm;
};

void nkp_revert_disk_free(gpointer p)
{
        NkpRevertDisk *rd = p;
        if (!rd)
                return;
        g_free(rd->target);
        g_free(rd->secret_uuid);
        g_free(rd->overlay);
        if (rd->at_snapshot)
                g_ptr_array_unref(rd->at_snapshot);
        if (rd->now)
                g_ptr_array_unref(rd->now);
        g_free(rd);
}

void nkp_revert_snapshot_free(gpointer p)
{
        NkpRevertSnapshot *s = p;
        if (!s)
                return;
        g_free(s->name);
        g_free(s->state);
        g_free(s->domain_xml);
        g_free(s->memory_file);
        if (s->external)
                g_strfreev(s->external);
        if (s->overlays)
                g_strfreev(s->overlays);
        g_free(s);
}

/* ---- reading a snapshot's XML --------------------------------------------- */

static int snapshot_doc(const char *name, const char *xml, xmlDocPtr *ret)
{
        size_t len = xml ? strlen(xml) : 0;
        xmlDocPtr doc = len && len <= NKP_DOMAIN_XML_MAX
                                ? xmlReadMemory(xml, (int) len, "snapshot.xml", NULL,
                                                XML_PARSE_NONET | XML_PARSE_NOERROR |
                                                        XML_PARSE_NOWARNING)
                                : NULL;
        xmlNodePtr root = doc ? xmlDocGetRootElement(doc) : NULL;
        if (!root || doc->intSubset || !xmlStrEqual(root->name, X("domainsnapshot"))) {
                xmlFreeDoc(doc);
                return nkp_fail(-EBADMSG, "The XML of snapshot '%s' cannot be read.", name);
        }
        *ret = doc;
        return 0;
}

int nkp_revert_snapshot_parse(const char *name, const char *xml, NkpRevertSnapshot **ret)
{
        xmlDocPtr doc = NULL;
        int r = snapshot_doc(name, xml, &doc);
        if (r < 0)
                return r;
        xmlNodePtr root = xmlDocGetRootElement(doc);
        NkpRevertSnapshot *s = g_new0(NkpRevertSnapshot, 1);
        s->name = g_strdup(name);
        xmlChar *state = xmlNodeGetContent(nkp_xml_child(root, "state"));
        s->state = state ? g_strdup((const char *) state) : NULL;
        xmlFree(state);
        xmlNodePtr mem = nkp_xml_child(root, "memory");
        g_autofree char *memory = nkp_xml_attr(mem, "snapshot");
        s->has_memory = memory && strcmp(memory, "no") != 0;
        if (memory && strcmp(memory, "external") == 0)
                s->memory_file = nkp_xml_attr(mem, "file");
        xmlChar *created = xmlNodeGetContent(nkp_xml_child(root, "creationTime"));
        s->created = created ? g_ascii_strtoll((const char *) created, NULL, 10) : 0;
        xmlFree(created);
        GPtrArray *ext = g_ptr_array_new();
        GPtrArray *files = g_ptr_array_new();
        for (xmlNodePtr n = nkp_xml_child(root, "disks") ? nkp_xml_child(root, "disks")->children : NULL; n;
             n = n->next) {
                if (n->type != XML_ELEMENT_NODE || !xmlStrEqual(n->name, X("disk")))
                        continue;
                g_autofree char *dname = nkp_xml_attr(n, "name");
                g_autofree char *how = nkp_xml_attr(n, "snapshot");
                if (!dname)
                        continue;
                if (how && strcmp(how, "external") == 0) {
                        g_autofree char *file = nkp_xml_attr(nkp_xml_child(n, "source"), "file");
                        g_ptr_array_add(ext, g_steal_pointer(&dname));
                        g_ptr_array_add(files, file ? g_steal_pointer(&file) : g_strdup(""));
                } else if (!how || strcmp(how, "no") != 0)
                        s->n_internal++;
        }
        g_ptr_array_add(ext, NULL);
        s->external = (char **) g_ptr_array_free(ext, FALSE);
        g_ptr_array_add(files, NULL);
        s->overlays = (char **) g_ptr_array_free(files, FALSE);
        xmlNodePtr dom = nkp_xml_child(root, "domain");
        if (dom) {
                xmlBufferPtr buf = xmlBufferCreate();
                if (buf && xmlNodeDump(buf, doc, dom, 0, 0) > 0)
                        s->domain_xml = g_strdup((const char *) xmlBufferContent(buf));
                xmlBufferFree(buf);
        }
        xmlFreeDoc(doc);
        *ret = s;
        return 0;
}

/* The chain of disk `target` at snapshot `s` (from its <domain>, completed
 * from the qcow2 headers), active layer first; an empty array when none. */
int nkp_revert_chain_at(const NkpRevertSnapshot *s, const char *target,
                        const char *secret_uuid, GPtrArray **ret)
{
        if (!s->domain_xml) {
                *ret = g_ptr_array_new_with_free_func(nkp_disk_layer_free);
                return 0;
        }
        return nkp_disk_chain_layers(s->domain_xml, strlen(s->domain_xml), target, secret_uuid,
                                     ret);
}

/* ---- the plan -------------------------------------------------------------- */

/* The overlay's name: virsh's way (nkp_overlay_path) with "SNAPSHOT-rN",
 * N the first number whose file is not there ("revert-rN" for a snapshot
 * name that is no safe file name part). */
static char *free_overlay_name(const char *top, const char *snapshot)
{
        bool safe = snapshot[0] && snapshot[0] != '.' && strlen(snapshot) <= 64;
        for (const char *p = snapshot; safe && *p; p++)
                safe = g_ascii_isalnum(*p) || strchr("._-", *p);
        for (unsigned n = 1;; n++) {
                g_autofree char *tag = g_strdup_printf("%s-r%u", safe ? snapshot : "revert", n);
                char *path = nkp_overlay_path(top, tag);
                /* (a PATH.nkp-new left by a kill is overwritten) */
                if (access(path, F_OK) != 0 && errno == ENOENT)
                        return path;
                g_free(path);
        }
}

static bool in_chain(GPtrArray *layers, const char *path)
{
        for (guint i = 0; layers && i < layers->len; i++)
                if (strcmp(((NkpDiskLayer *) layers->pdata[i])->path, path) == 0)
                        return true;
        return false;
}

/* Every layer of the chain at the snapshot is there and LUKS under the
 * disk's secret (the new chain is opened with it alone). */
static int check_layers(const char *vm, const char *snap, const char *target, GPtrArray *layers,
                        const char *secret_uuid)
{
        for (guint k = 0; k < layers->len; k++) {
                NkpDiskLayer *l = layers->pdata[k];
                struct stat st;
                if (stat(l->path, &st) < 0 || !S_ISREG(st.st_mode))
                        return nkp_fail(-ENOENT, "VM '%s': snapshot '%s' needs '%s' (disk %s), "
                                                 "which is missing; nothing was changed.",
                                        vm, snap, l->path, target);
                if (!l->encrypted || nkp_qcow2_is_luks(l->path) != 1)
                        return nkp_fail(-EPERM, "VM '%s': the layer '%s' of disk %s at snapshot "
                                                "'%s' is not encrypted; nkp reverts to encrypted "
                                                "chains only. Nothing was changed.",
                                        vm, l->path, target, snap);
                /* One secret per disk chain (vm-snapshot.c). */
                g_free(l->secret_uuid);
                l->secret_uuid = g_strdup(secret_uuid);
        }
        return 0;
}

int nkp_revert_plan(const NkpDomain *d, const char *xml, const NkpRevertSnapshot *s,
                    GPtrArray **ret)
{
        if (s->has_memory || s->n_internal > 0 || !s->external || !s->external[0])
                return nkp_fail(-EINVAL, "VM '%s': snapshot '%s' is not a disk-only external "
                                         "snapshot (%s); nkp reverts those only (libvirt "
                                         "reverts internal ones itself: virsh snapshot-revert).",
                                d->name, s->name,
                                s->has_memory     ? "it holds memory state"
                                : s->n_internal   ? "it has internal disk snapshots"
                                                  : "it has no external disk");
        if (!s->domain_xml)
                return nkp_fail(-EBADMSG, "VM '%s': snapshot '%s' has no <domain> recording the "
                                          "disks of its moment; nkp cannot revert to it.",
                                d->name, s->name);
        g_autoptr(GPtrArray) plan = g_ptr_array_new_with_free_func(nkp_revert_disk_free);
        for (char **t = s->external; *t; t++) {
                const char *suuid = nkp_vm_disk_secret_uuid(d, *t);
                if (!suuid)
                        return nkp_fail(-EINVAL, "VM '%s': disk %s of snapshot '%s' is not "
                                                 "encrypted by nkp; nkp reverts nkp disks "
                                                 "only. Nothing was changed.",
                                        d->name, *t, s->name);
                NkpRevertDisk *rd = g_new0(NkpRevertDisk, 1);
                g_ptr_array_add(plan, rd);
                rd->target = g_strdup(*t);
                rd->secret_uuid = g_strdup(suuid);
                int r = nkp_revert_chain_at(s, *t, suuid, &rd->at_snapshot);
                if (r < 0)
                        return r;
                if ((r = nkp_domain_disk_layers(xml, strlen(xml), *t, &rd->now)) < 0)
                        return r;
                nkp_disk_chain_from_headers(rd->now, suuid);
                if (rd->at_snapshot->len == 0 || rd->now->len == 0)
                        return nkp_fail(-ENOENT, "VM '%s': disk %s of snapshot '%s' is not in "
                                                 "%s; nothing was changed.",
                                        d->name, *t, s->name,
                                        rd->now->len ? "the snapshot's record"
                                                     : "the VM's definition any more");
                if ((r = check_layers(d->name, s->name, *t, rd->at_snapshot, suuid)) < 0)
                        return r;
                const NkpDiskLayer *top = rd->at_snapshot->pdata[0];
                /* Its state at the snapshot is gone once the guest wrote
                 * into it (a blockcommit made it the active layer again). */
                if (strcmp(top->path, ((NkpDiskLayer *) rd->now->pdata[0])->path) == 0)
                        return nkp_fail(-ESTALE, "VM '%s': the layer '%s' that held disk %s at "
                                                 "snapshot '%s' is the disk's active layer now "
                                                 "(a blockcommit?) and has been written since; "
                                                 "its state at '%s' is gone. Nothing was "
                                                 "changed.",
                                        d->name, top->path, *t, s->name, s->name);
                rd->overlay = free_overlay_name(top->path, s->name);
        }
        *ret = g_steal_pointer(&plan);
        return 0;
}

/* ---- making the overlays, writing the definition ---------------------------- */

/* The virtual size in a qcow2 header (offset 24, big-endian u64, qcow2
 * spec): the size of the disk at the snapshot. */
static int qcow2_size(const char *path, guint64 *ret)
{
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
                return nkp_fail(-errno, "Cannot open '%s': %s.", path, g_strerror(errno));
        uint8_t h[32];
        ssize_t n = pread(fd, h, sizeof h, 0);
        close(fd);
        if (n != (ssize_t) sizeof h || memcmp(h, "QFI\xfb", 4) != 0)
                return nkp_fail(-EMEDIUMTYPE, "'%s' is not a qcow2 image.", path);
        guint64 size = 0;
        for (int i = 24; i < 32; i++)
                size = size << 8 | h[i];
        *ret = size;
        return 0;
}

int nkp_revert_make_overlay(const NkpRevertDisk *rd, const nkp_secret *value)
{
        const NkpDiskLayer *top = rd->at_snapshot->pdata[0];
        guint64 size = 0;
        int r = qcow2_size(top->path, &size);
        if (r < 0)
                return r;
        g_autofree char *tmp = g_strconcat(rd->overlay, ".nkp-new", NULL);
        if ((r = nkp_luks_overlay_create(tmp, top->path, top->format, size, value)) < 0)
                return r;
        int fd = open(tmp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0 || fsync(fd) < 0) {
                r = nkp_fail(-errno, "Cannot write '%s': %s.", tmp, g_strerror(errno));
                if (fd >= 0)
                        close(fd);
                (void) nkp_unlink_nofollow(tmp);
                return r;
        }
        close(fd);
        nkp_test_crash_point("revert-overlay-made");
        if (rename(tmp, rd->overlay) < 0) {
                r = nkp_fail(-errno, "Cannot put '%s' in place: %s.", rd->overlay,
                             g_strerror(errno));
                (void) nkp_unlink_nofollow(tmp);
                return r;
        }
        (void) nkp_fsync_dir_of(rd->overlay);
        nkp_test_crash_point("revert-overlay-renamed");
        return 0;
}

/* `xml` with disk `target`'s active <source file> set to `path`. */
static int set_source(const char *xml, const char *target, const char *path, char **ret)
{
        xmlDocPtr doc = xmlReadMemory(xml, (int) strlen(xml), "domain.xml", NULL,
                                      XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
        xmlNodePtr root = doc ? xmlDocGetRootElement(doc) : NULL;
        xmlNodePtr src = NULL;
        for (xmlNodePtr n = nkp_xml_child(root, "devices") ? nkp_xml_child(root, "devices")->children : NULL;
             n && !src; n = n->next) {
                if (n->type != XML_ELEMENT_NODE || !xmlStrEqual(n->name, X("disk")))
                        continue;
                g_autofree char *t = nkp_xml_attr(nkp_xml_child(n, "target"), "dev");
                if (t && strcmp(t, target) == 0) {
                        src = nkp_xml_child(n, "source");
                        xmlSetProp(nkp_xml_child(n, "driver"), X("type"), X("qcow2"));
                }
        }
        if (!src || !xmlHasProp(src, X("file"))) {
                xmlFreeDoc(doc);
                return nkp_fail(-ENOENT, "The VM has no file disk %s.", target);
        }
        xmlSetProp(src, X("file"), X(path));
        xmlChar *out = NULL;
        int n = 0;
        xmlDocDumpMemory(doc, &out, &n);
        xmlFreeDoc(doc);
        if (!out)
                return nkp_fail(-ENOMEM, "Out of memory formatting the domain XML.");
        *ret = g_strndup((const char *) out, (gsize) n);
        xmlFree(out);
        return 0;
}

int nkp_revert_definition(const char *xml, GPtrArray *plan, char **ret)
{
        g_autofree char *cur = g_strdup(xml);
        for (guint i = 0; i < plan->len; i++) {
                const NkpRevertDisk *rd = plan->pdata[i];
                g_autofree char *moved = NULL, *chained = NULL;
                int r = set_source(cur, rd->target, rd->overlay, &moved);
                if (r < 0)
                        return r;
                NkpDiskLayer top = { .target = rd->target, .path = rd->overlay,
                                     .format = (char *) "qcow2", .encrypted = true,
                                     .secret_uuid = rd->secret_uuid };
                g_autoptr(GPtrArray) layers = g_ptr_array_new();
                g_ptr_array_add(layers, &top);
                for (guint k = 0; k < rd->at_snapshot->len; k++)
                        g_ptr_array_add(layers, rd->at_snapshot->pdata[k]);
                if ((r = nkp_domain_set_disk_chain(moved, rd->target, layers, &chained)) < 0)
                        return r;
                g_free(cur);
                cur = g_steal_pointer(&chained);
        }
        *ret = g_steal_pointer(&cur);
        return 0;
}

void nkp_revert_abandoned(GPtrArray *plan, GPtrArray *snapshots, GPtrArray *unneeded,
                          GPtrArray *needed)
{
        for (guint i = 0; i < plan->len; i++) {
                const NkpRevertDisk *rd = plan->pdata[i];
                for (guint k = 0; k < rd->now->len; k++) {
                        const NkpDiskLayer *l = rd->now->pdata[k];
                        if (in_chain(rd->at_snapshot, l->path))
                                continue;
                        bool used = false;
                        for (guint j = 0; j < snapshots->len && !used; j++) {
                                g_autoptr(GPtrArray) c = NULL;
                                if (nkp_revert_chain_at(snapshots->pdata[j], rd->target,
                                                        rd->secret_uuid, &c) < 0) {
                                        nkp_error_clear();
                                        used = true; /* unreadable: keep it, to be safe */
                                        continue;
                                }
                                used = in_chain(c, l->path);
                        }
                        g_ptr_array_add(used ? needed : unneeded,
                                        g_strdup_printf("%s %s", rd->target, l->path));
                }
        }
}

/* ---- the operation --------------------------------------------------------- */

static const char *last_virt_error(void)
{
        virErrorPtr e = virGetLastError();
        return e && e->message ? e->message : "unknown libvirt error";
}

/* Every snapshot of `dom`, parsed (to know which layers they need). */
static int all_snapshots(virDomainPtr dom, const char *vm, GPtrArray **ret)
{
        virDomainSnapshotPtr *snaps = NULL;
        int n = virDomainListAllSnapshots(dom, &snaps, 0);
        if (n < 0)
                return nkp_fail(-EIO, "libvirt cannot list the snapshots of VM '%s': %s.", vm,
                                last_virt_error());
        g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(nkp_revert_snapshot_free);
        int r = 0;
        for (int i = 0; i < n; i++) {
                char *x = r == 0 ? virDomainSnapshotGetXMLDesc(snaps[i], 0) : NULL;
                NkpRevertSnapshot *s = NULL;
                if (r == 0 && !x)
                        r = nkp_fail(-EIO, "libvirt cannot read snapshot '%s' of VM '%s': %s.",
                                     virDomainSnapshotGetName(snaps[i]), vm, last_virt_error());
                else if (r == 0 && (r = nkp_revert_snapshot_parse(
                                            virDomainSnapshotGetName(snaps[i]), x, &s)) == 0)
                        g_ptr_array_add(out, s);
                free(x);
                virDomainSnapshotFree(snaps[i]);
        }
        free(snaps);
        if (r == 0)
                *ret = g_steal_pointer(&out);
        return r;
}

/* libvirt's current snapshot made `name` again: REDEFINE | CURRENT of its
 * own XML (DISK_ONLY too when its state says disk-snapshot: libvirt
 * checks that they agree).  NULL when done, else why not. */
static char *mark_current(virDomainPtr dom, const char *xml, const NkpRevertSnapshot *s)
{
        unsigned flags = VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT;
        if (s->state && strcmp(s->state, "disk-snapshot") == 0)
                flags |= VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY;
        virDomainSnapshotPtr snap = virDomainSnapshotCreateXML(dom, xml, flags);
        if (!snap)
                return g_strdup(last_virt_error());
        virDomainSnapshotFree(snap);
        return NULL;
}

/* ---- snapshots under deep rekey and decrypt (vm-convert.c) ------------------ */

int nkp_vm_snapshots(NkpVirt *v, const char *name, GPtrArray **ret)
{
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(v), name);
        if (!dom)
                return nkp_fail(-ENOENT, "No libvirt domain '%s': %s.", name, last_virt_error());
        int r = all_snapshots(dom, name, ret);
        virDomainFree(dom);
        return r;
}

/* `xml` with each from[i] replaced by to[i]; NULL when it names none. */
static char *renamed_secrets(const char *xml, const char *const *from, const char *const *to)
{
        g_autofree char *cur = g_strdup(xml);
        bool changed = false;
        for (size_t i = 0; from[i]; i++) {
                if (!strstr(cur, from[i]))
                        continue;
                g_auto(GStrv) parts = g_strsplit(cur, from[i], -1);
                g_free(cur);
                cur = g_strjoinv(to[i], parts);
                changed = true;
        }
        return changed ? g_steal_pointer(&cur) : NULL;
}

/* 1 when snapshot `snap` of VM `vm` was redefined with the new UUIDs, 0
 * when it names none of the old ones, else -EIO (logged). */
static int rename_snapshot_secrets(virDomainPtr dom, virDomainSnapshotPtr snap,
                                   const char *current, const char *vm,
                                   const char *const *from, const char *const *to)
{
        const char *name = virDomainSnapshotGetName(snap);
        char *x = virDomainSnapshotGetXMLDesc(snap, 0);
        g_autoptr(NkpRevertSnapshot) s = NULL;
        g_autofree char *renamed = x ? renamed_secrets(x, from, to) : NULL;
        int r = x ? nkp_revert_snapshot_parse(name, x, &s) : -EIO;
        free(x);
        if (r == 0 && !renamed)
                return 0;
        if (r == 0) {
                unsigned flags = VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE;
                if (s->state && strcmp(s->state, "disk-snapshot") == 0)
                        flags |= VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY;
                if (current && strcmp(current, name) == 0)
                        flags |= VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT;
                virDomainSnapshotPtr again = virDomainSnapshotCreateXML(dom, renamed, flags);
                if (again) {
                        virDomainSnapshotFree(again);
                        return 1;
                }
        }
        nkp_error_clear();
        nkp_log(NKP_LOG_WARNING, "note: VM '%s': the record of snapshot '%s' still names the "
                                 "disks' old secret UUIDs (libvirt: %s); harmless: nkpctl vm "
                                 "revert opens every layer with the disk's current secret.",
                vm, name, last_virt_error());
        return -EIO;
}

int nkp_vm_snapshots_rename_secrets(NkpVirt *v, const char *name, const char *const *from,
                                    const char *const *to)
{
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(v), name);
        virDomainSnapshotPtr *snaps = NULL;
        int n = dom ? virDomainListAllSnapshots(dom, &snaps, 0) : -1;
        if (n < 0) {
                nkp_log(NKP_LOG_WARNING, "note: VM '%s': cannot list its snapshots to give them "
                                         "the new secret UUIDs: %s.",
                        name, last_virt_error());
                if (dom)
                        virDomainFree(dom);
                return 0;
        }
        virDomainSnapshotPtr cur = virDomainSnapshotCurrent(dom, 0);
        g_autofree char *current = cur ? g_strdup(virDomainSnapshotGetName(cur)) : NULL;
        if (cur)
                virDomainSnapshotFree(cur);
        int done = 0;
        for (int i = 0; i < n; i++) {
                if (rename_snapshot_secrets(dom, snaps[i], current, name, from, to) > 0)
                        done++;
                virDomainSnapshotFree(snaps[i]);
        }
        free(snaps);
        virDomainFree(dom);
        return done;
}

static bool has_vtpm_key(const NkpDomain *d)
{
        for (size_t i = 0; i < nkp_keysafe_n_entries(d->keysafe); i++)
                if (strcmp(nkp_keysafe_entry_kind(d->keysafe, i), NKP_OBJECT_VTPM) == 0)
                        return true;
        return false;
}

static nkp_revert_result *result_new(void)
{
        nkp_revert_result *res = g_new0(nkp_revert_result, 1);
        for (int k = 0; k < NKP_REVERT_N_ITEMS; k++)
                res->items[k] = g_ptr_array_new_with_free_func(g_free);
        return res;
}

/* Deletes the abandoned layers of res->items[ABANDONED] (top first: each
 * one's backing file is deleted after it), moving each to DELETED. */
static void delete_abandoned(nkp_revert_result *res)
{
        GPtrArray *left = g_ptr_array_new_with_free_func(g_free);
        for (guint i = 0; i < res->items[NKP_REVERT_ABANDONED]->len; i++) {
                char *item = res->items[NKP_REVERT_ABANDONED]->pdata[i];
                const char *path = strchr(item, ' ') + 1;
                int r = nkp_unlink_nofollow(path);
                if (r < 0)
                        nkp_log(NKP_LOG_WARNING, "Cannot delete the abandoned layer '%s': %s.",
                                path, g_strerror(-r));
                g_ptr_array_add(r < 0 ? left : res->items[NKP_REVERT_DELETED], g_strdup(item));
        }
        g_ptr_array_unref(res->items[NKP_REVERT_ABANDONED]);
        res->items[NKP_REVERT_ABANDONED] = left;
}

static int revert_locked(nkp_context *ctx, NkpVirt *v, virDomainPtr dom, const NkpDomain *d,
                         const char *xml, const char *snapshot, unsigned flags,
                         nkp_revert_result *res)
{
        virDomainSnapshotPtr snap = virDomainSnapshotLookupByName(dom, snapshot, 0);
        if (!snap)
                return nkp_fail(-ENOENT, "VM '%s' has no snapshot '%s' (virsh snapshot-list "
                                         "'%s' lists them).",
                                d->name, snapshot, d->name);
        char *sxml = virDomainSnapshotGetXMLDesc(snap, 0);
        virDomainSnapshotFree(snap);
        if (!sxml)
                return nkp_fail(-EIO, "libvirt cannot read snapshot '%s' of VM '%s': %s.",
                                snapshot, d->name, last_virt_error());
        g_autofree char *snapshot_xml = g_strdup(sxml);
        free(sxml);
        g_autoptr(NkpRevertSnapshot) s = NULL;
        g_autoptr(GPtrArray) plan = NULL;
        g_autoptr(GPtrArray) snapshots = NULL;
        g_autoptr(GPtrArray) secrets = NULL;
        g_autofree char *new_xml = NULL;
        int r = nkp_revert_snapshot_parse(snapshot, snapshot_xml, &s);
        if (r < 0 || (r = nkp_revert_plan(d, xml, s, &plan)) < 0)
                return r;
        if ((r = all_snapshots(dom, d->name, &snapshots)) < 0)
                return r;
        if ((r = nkp_revert_definition(xml, plan, &new_xml)) < 0)
                return r;
        if ((r = nkp_vm_unlock(ctx, d, true, &secrets)) < 0)
                return r;
        guint made = 0;
        while (r == 0 && made < plan->len) {
                const NkpRevertDisk *rd = plan->pdata[made];
                const nkp_secret *value = nkp_vm_disk_value(secrets, rd->target);
                r = value ? nkp_revert_make_overlay(rd, value)
                          : nkp_fail(-ENOKEY, "VM '%s' has no key for disk %s.", d->name,
                                     rd->target);
                if (r == 0)
                        made++;
        }
        if (r == 0)
                r = nkp_virt_domain_define(v, new_xml);
        if (r < 0) {
                /* Nothing names the overlays made so far: gone again. */
                for (guint i = 0; i < made; i++)
                        (void) nkp_unlink_nofollow(((NkpRevertDisk *) plan->pdata[i])->overlay);
                return nkp_fail_prefix(r, "VM '%s' was not reverted (its disks and definition "
                                          "are as they were)",
                                       d->name);
        }
        nkp_test_crash_point("revert-defined");
        for (guint i = 0; i < plan->len; i++) {
                const NkpRevertDisk *rd = plan->pdata[i];
                g_ptr_array_add(res->items[NKP_REVERT_LAYER],
                                g_strdup_printf("%s %s", rd->target, rd->overlay));
        }
        nkp_revert_abandoned(plan, snapshots, res->items[NKP_REVERT_ABANDONED],
                             res->items[NKP_REVERT_KEPT]);
        if (flags & NKP_VM_REVERT_DELETE_ABANDONED)
                delete_abandoned(res);
        res->current_error = mark_current(dom, snapshot_xml, s);
        res->vtpm = has_vtpm_key(d);
        return 0;
}

int nkp_vm_revert(nkp_context *ctx, nkp_virt *v, const char *domain, const char *snapshot,
                  unsigned flags, nkp_revert_result **ret)
{
        if (!snapshot || !snapshot[0])
                return nkp_fail(-EINVAL, "Name the snapshot to revert to.");
        g_autoptr(NkpDomain) d0 = NULL;
        int r = nkp_vm_definition(v, domain, NULL, &d0);
        if (r < 0)
                return r;
        if (!d0->keysafe)
                return nkp_fail(-EINVAL, "VM '%s' is not encrypted by nkp: revert its snapshots "
                                         "with virsh.",
                                domain);
        int active = nkp_virt_domain_is_active(v, domain);
        if (active < 0)
                return active;
        if (active > 0)
                return nkp_fail(-EBUSY, "VM '%s' is running; shut it off first (a running "
                                        "disk cannot be switched), then run this again.",
                                domain);
        int lock = -1;
        g_autoptr(NkpDomain) d = NULL;
        g_autofree char *xml = NULL;
        if ((r = nkp_vm_lock_recovered(ctx, v, d0, "revert", &lock, NULL, &xml, &d)) < 0)
                return r;
        virDomainPtr dom = virDomainLookupByName(nkp_virt_connection(v), domain);
        nkp_revert_result *res = result_new();
        if (!dom)
                r = nkp_fail(-ENOENT, "No libvirt domain '%s': %s.", domain, last_virt_error());
        else if ((active = nkp_virt_domain_is_active(v, domain)) != 0)
                r = active < 0 ? active
                               : nkp_fail(-EBUSY, "VM '%s' is running; shut it off first, "
                                                  "then run this again.",
                                          domain);
        else
                r = revert_locked(ctx, v, dom, d, xml, snapshot, flags, res);
        if (dom)
                virDomainFree(dom);
        nkp_journal_unlock(lock);
        if (r < 0 || !ret)
                nkp_revert_result_free(res);
        else
                *ret = res;
        return r;
}

/* ---- the result -------------------------------------------------------------- */

size_t nkp_revert_result_count(const nkp_revert_result *r, enum nkp_revert_item kind)
{
        return r && kind < NKP_REVERT_N_ITEMS ? r->items[kind]->len : 0;
}

const char *nkp_revert_result_item(const nkp_revert_result *r, enum nkp_revert_item kind,
                                   size_t i)
{
        return i < nkp_revert_result_count(r, kind) ? r->items[kind]->pdata[i] : NULL;
}

const char *nkp_revert_result_current_error(const nkp_revert_result *r)
{
        return r ? r->current_error : NULL;
}

bool nkp_revert_result_vtpm(const nkp_revert_result *r)
{
        return r && r->vtpm;
}

void nkp_revert_result_free(nkp_revert_result *r)
{
        if (!r)
                return;
        for (int k = 0; k < NKP_REVERT_N_ITEMS; k++)
                g_ptr_array_unref(r->items[k]);
        g_free(r->current_error);
        g_free(r);
}

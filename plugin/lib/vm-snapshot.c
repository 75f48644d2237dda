/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Snapshots of nkp VMs (issue 16; docs/snapshots-clones.md).
 *
 * What libvirt 9.0 does, checked in the lab (QEMU 7.2):
 *  - `virsh snapshot-create-as VM S --disk-only` makes a PLAIN qcow2 overlay
 *    even when the active layer is LUKS: libvirt does not copy the
 *    encryption of the layer it covers.  New guest writes, and copy-on-write
 *    of old clusters, land in it in clear.
 *  - An <encryption format='luks'><secret …/></encryption> in the snapshot
 *    XML's disk <source> is honoured for a running VM (blockdev-create makes
 *    a LUKS overlay under that secret) but ignored for a shut-off one
 *    (qemu-img create, plain file).  Without engine='qemu' in it, the
 *    persistent definition then carries an encryption whose engine is
 *    unset and the next start fails ("Unexpected enum value 0 for
 *    virStorageEncryptionEngine").
 * So `nkpctl vm snapshot` makes every overlay itself (qemu-img create, LUKS
 * as vm encrypt makes them, -u: the encrypted layer below is not opened)
 * and hands it to libvirt with VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT, one
 * atomic disk-only snapshot, engine='qemu' set.
 *
 * One secret per disk chain: every layer of a disk is opened with the
 * disk's own libvirt secret (its DEK as passphrase), the one the keysafe
 * holds.  Each LUKS layer still has its own random master key (the
 * passphrase only opens its key slot), so no two files share a data key,
 * and the keysafe, the hook and rekey stay one key per disk.
 *
 * A plain layer in an nkp disk's chain (a snapshot made behind nkp's back)
 * is found in the domain XML (<source> and each <backingStore>'s <source>
 * with or without <encryption>), named by `vm status`, refused at start by
 * the hook (unless [disks] allow_plain_layers = true) with a vm-plain-layer
 * alarm, and fixed by `nkpctl vm encrypt-layer VM FILE`: the layer is
 * converted in place (its backing reference kept) and the definition gets
 * its <encryption>.  Crash safety without a journal: the converted copy is
 * FILE.nkp-new until one rename puts it in place, and the file's own qcow2
 * header (crypt_method) says which side a kill left; the definition is
 * written after the rename, and a rerun (or the hook's refusal, which names
 * the rerun) finishes a definition that still says plain.
 *
 * Internal snapshots cannot work on a LUKS qcow2 (QEMU 7.2 aborts while it
 * writes the VM state through the encryption layer; qemu-img gets no key
 * offline), so every disk nkp encrypts carries snapshot='no' (domain.c):
 * libvirt refuses internal, full-system and plain disk-only snapshots that
 * do not name the disk, while nkp's own snapshot XML names each disk
 * snapshot='external'.  nkpd adds the attribute to nkp definitions written
 * before nkp set it (nkp_vm_refuse_snapshots). */
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

void nkp_disk_layer_free(gpointer p)
{
        NkpDiskLayer *l = p;
        if (!l)
                return;
        g_free(l->target);
        g_free(l->path);
        g_free(l->format);
        g_free(l->secret_uuid);
        g_free(l);
}

static char *secret_of(xmlNodePtr enc)
{
        return nkp_xml_attr(nkp_xml_child(enc, "secret"), "uuid");
}

/* The domain XML as a document (the hook's input was checked by
 * nkp_domain_parse first; the same safe options: no network, no entities,
 * no DTD). */
static int read_doc(const char *xml, size_t len, xmlDocPtr *ret)
{
        if (!xml || len == 0 || len > NKP_DOMAIN_XML_MAX)
                return nkp_fail(-EBADMSG, "The domain XML is empty or too large.");
        xmlDocPtr doc = xmlReadMemory(xml, (int) len, "domain.xml", NULL,
                                      XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
        if (!doc || doc->intSubset || !xmlDocGetRootElement(doc)) {
                xmlFreeDoc(doc);
                return nkp_fail(-EBADMSG, "The domain XML cannot be read.");
        }
        *ret = doc;
        return 0;
}

/* The <disk> with target `target`, NULL when none. */
static xmlNodePtr find_disk(xmlDocPtr doc, const char *target)
{
        for (xmlNodePtr dev = xmlDocGetRootElement(doc)->children; dev; dev = dev->next) {
                if (dev->type != XML_ELEMENT_NODE || !xmlStrEqual(dev->name, X("devices")))
                        continue;
                for (xmlNodePtr n = dev->children; n; n = n->next) {
                        if (n->type != XML_ELEMENT_NODE || !xmlStrEqual(n->name, X("disk")))
                                continue;
                        g_autofree char *t = nkp_xml_attr(nkp_xml_child(n, "target"), "dev");
                        if (t && strcmp(t, target) == 0)
                                return n;
                }
        }
        return NULL;
}

/* libvirt 9.0 gives a LUKS <encryption> without engine= its default engine
 * only on a disk's active layer (post-parse); once a snapshot makes that
 * layer a <backingStore>, the next start fails with "Unexpected enum value
 * 0 for virStorageEncryptionEngine".  So every <encryption> of every disk
 * chain gets engine='qemu' written out.  Returns how many were changed. */
static unsigned set_engines(xmlNodePtr n)
{
        unsigned changed = 0;
        for (xmlNodePtr c = n ? n->children : NULL; c; c = c->next) {
                if (c->type != XML_ELEMENT_NODE || c->ns)
                        continue;
                if (xmlStrEqual(c->name, X("encryption"))) {
                        xmlChar *fmt = xmlGetProp(c, X("format"));
                        xmlChar *eng = xmlGetProp(c, X("engine"));
                        if (fmt && xmlStrEqual(fmt, X("luks")) && !eng) {
                                xmlSetProp(c, X("engine"), X("qemu"));
                                changed++;
                        }
                        xmlFree(fmt);
                        xmlFree(eng);
                } else if (xmlStrEqual(c->name, X("disk")) ||
                           xmlStrEqual(c->name, X("source")) ||
                           xmlStrEqual(c->name, X("backingStore")) ||
                           xmlStrEqual(c->name, X("devices"))) {
                        changed += set_engines(c);
                }
        }
        return changed;
}

static int format_doc(xmlDocPtr doc, char **ret)
{
        xmlChar *out = NULL;
        int n = 0;
        xmlDocDumpMemory(doc, &out, &n);
        if (!out)
                return nkp_fail(-ENOMEM, "Out of memory formatting the domain XML.");
        *ret = g_strndup((const char *) out, (gsize) n);
        xmlFree(out);
        return 0;
}

static xmlNodePtr find_disk(xmlDocPtr doc, const char *target);

/* <backingStore> elements for `layers` (the chain below a new overlay),
 * under `parent`, ended by an empty <backingStore/> (libvirt then probes
 * nothing: a probed LUKS layer has no secret and libvirt 9.0 refuses the
 * start with "Unexpected enum value 0 for virStorageEncryptionEngine"). */
static void add_backing_chain(xmlNodePtr parent, GPtrArray *layers)
{
        for (guint k = 0; k < layers->len; k++) {
                const NkpDiskLayer *l = layers->pdata[k];
                xmlNodePtr bs = xmlNewChild(parent, NULL, X("backingStore"), NULL);
                xmlSetProp(bs, X("type"), X("file"));
                xmlNodePtr fmt = xmlNewChild(bs, NULL, X("format"), NULL);
                xmlSetProp(fmt, X("type"), X(l->format ? l->format : "qcow2"));
                xmlNodePtr src = xmlNewChild(bs, NULL, X("source"), NULL);
                xmlSetProp(src, X("file"), X(l->path));
                if (l->encrypted && l->secret_uuid) {
                        xmlNodePtr enc = xmlNewChild(src, NULL, X("encryption"), NULL);
                        xmlSetProp(enc, X("format"), X("luks"));
                        xmlSetProp(enc, X("engine"), X("qemu"));
                        xmlNodePtr sec = xmlNewChild(enc, NULL, X("secret"), NULL);
                        xmlSetProp(sec, X("type"), X("passphrase"));
                        xmlSetProp(sec, X("uuid"), X(l->secret_uuid));
                }
                parent = bs;
        }
        xmlNewChild(parent, NULL, X("backingStore"), NULL);
}

/* After a snapshot: the persistent definition of `domain` with the chain
 * below each new overlay written out (`chains`: target -> the layers
 * before the snapshot; libvirt writes it itself for a running VM, not for
 * a shut-off one) and every disk encryption's engine set (set_engines);
 * defined again when that changed anything. */
static int complete_definition(NkpVirt *v, const char *domain, GHashTable *chains)
{
        g_autofree char *xml = NULL, *fixed = NULL;
        int r = nkp_virt_domain_xml(v, domain, true, &xml);
        if (r < 0)
                return r;
        xmlDocPtr doc = NULL;
        if ((r = read_doc(xml, strlen(xml), &doc)) < 0)
                return r;
        unsigned changed = 0;
        GHashTableIter it;
        gpointer key, value;
        g_hash_table_iter_init(&it, chains);
        while (g_hash_table_iter_next(&it, &key, &value)) {
                xmlNodePtr disk = find_disk(doc, key);
                xmlNodePtr bs = disk ? nkp_xml_child(disk, "backingStore") : NULL;
                if (!disk || (bs && nkp_xml_child(bs, "source")))
                        continue;
                if (bs) {
                        xmlUnlinkNode(bs);
                        xmlFreeNode(bs);
                }
                add_backing_chain(disk, value);
                changed++;
        }
        changed += set_engines(xmlDocGetRootElement(doc));
        r = changed ? format_doc(doc, &fixed) : 0;
        xmlFreeDoc(doc);
        if (r < 0 || !changed)
                return r;
        return nkp_virt_domain_define(v, fixed);
}

static char *source_path(xmlNodePtr src)
{
        char *p = nkp_xml_attr(src, "file");
        return p ? p : nkp_xml_attr(src, "dev");
}

/* The layers of one disk element, active layer first. */
static void disk_layers(xmlNodePtr disk, const char *target, GPtrArray *out)
{
        xmlNodePtr src = nkp_xml_child(disk, "source");
        if (!src)
                return;
        xmlNodePtr enc = nkp_xml_child(src, "encryption");
        if (!enc)
                enc = nkp_xml_child(disk, "encryption");
        xmlNodePtr drv = nkp_xml_child(disk, "driver");
        unsigned depth = 0;
        xmlNodePtr layer = disk;
        while (src) {
                g_autofree char *path = source_path(src);
                if (!path)
                        break;
                NkpDiskLayer *l = g_new0(NkpDiskLayer, 1);
                l->target = g_strdup(target);
                l->path = g_steal_pointer(&path);
                l->format = depth == 0 ? nkp_xml_attr(drv, "type") : nkp_xml_attr(nkp_xml_child(layer, "format"), "type");
                l->depth = depth;
                l->encrypted = enc != NULL;
                l->secret_uuid = enc ? secret_of(enc) : NULL;
                g_ptr_array_add(out, l);
                layer = nkp_xml_child(layer, "backingStore");
                src = layer ? nkp_xml_child(layer, "source") : NULL;
                enc = src ? nkp_xml_child(src, "encryption") : NULL;
                depth++;
        }
}

int nkp_domain_disk_layers(const char *xml, size_t len, const char *target, GPtrArray **ret)
{
        xmlDocPtr doc = NULL;
        int r = read_doc(xml, len, &doc);
        if (r < 0)
                return r;
        g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(nkp_disk_layer_free);
        xmlNodePtr disk = find_disk(doc, target);
        if (disk)
                disk_layers(disk, target, out);
        xmlFreeDoc(doc);
        *ret = g_steal_pointer(&out);
        return 0;
}

int nkp_vm_disk_chain_plain_layers(const NkpDomain *d, const char *xml, size_t len,
                                   GPtrArray **ret)
{
        g_autoptr(GPtrArray) plain = g_ptr_array_new_with_free_func(nkp_disk_layer_free);
        for (size_t i = 0; d->keysafe && i < nkp_keysafe_n_entries(d->keysafe); i++) {
                if (strcmp(nkp_keysafe_entry_kind(d->keysafe, i), NKP_OBJECT_DISK) != 0)
                        continue;
                g_autoptr(GPtrArray) layers = NULL;
                int r = nkp_domain_disk_layers(xml, len, nkp_keysafe_entry_id(d->keysafe, i),
                                               &layers);
                if (r < 0)
                        return r;
                for (guint k = 0; k < layers->len; k++) {
                        NkpDiskLayer *l = layers->pdata[k];
                        if (l->encrypted)
                                continue;
                        layers->pdata[k] = NULL; /* moved */
                        g_ptr_array_add(plain, l);
                }
        }
        *ret = g_steal_pointer(&plain);
        return 0;
}

int nkp_vm_plain_layer_check(nkp_context *ctx, const NkpDomain *d, const char *xml, size_t len)
{
        g_autoptr(GPtrArray) plain = NULL;
        int r = nkp_vm_disk_chain_plain_layers(d, xml, len, &plain);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot start: nkp cannot read its disk chains",
                                       d->name);
        if (plain->len == 0 || ctx->disks_allow_plain_layers)
                return 0;
        const NkpDiskLayer *l = plain->pdata[0];
        g_autofree char *msg = g_strdup_printf(
                "VM '%s' cannot start: its disk %s has a plain (unencrypted) layer '%s', made "
                "behind nkp's back (virsh snapshot-create-as?); encrypt it in place (nkpctl vm "
                "encrypt-layer '%s' '%s'), or allow plain layers in %s ([disks] "
                "allow_plain_layers = true)",
                d->name, l->target, l->path, d->name, l->path, ctx->conf_path);
        (void) nkp_alarm_raise(ctx, "vm-plain-layer", d->name, msg);
        return nkp_fail(-EPERM, "%s", msg);
}

/* ---- reading a qcow2 header (the hook and rekey must not spawn qemu-img) -- */

/* 1 when `path` is a qcow2 file whose header says LUKS (crypt_method 2,
 * qcow2 spec: a big-endian u32 at offset 32 after "QFI\xfb"), 0 when
 * another qcow2, negative errno when it cannot be read or is not qcow2. */
int nkp_qcow2_is_luks(const char *path)
{
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
                return -errno;
        uint8_t h[36];
        ssize_t n = pread(fd, h, sizeof h, 0);
        close(fd);
        if (n != (ssize_t) sizeof h || memcmp(h, "QFI\xfb", 4) != 0)
                return -EMEDIUMTYPE;
        uint32_t method = (uint32_t) h[32] << 24 | (uint32_t) h[33] << 16 |
                          (uint32_t) h[34] << 8 | h[35];
        return method == 2;
}

/* The backing file named in the qcow2 header of `path` (offsets 8: u64
 * name offset, 16: u32 name length, qcow2 spec), resolved against its
 * directory; NULL when none or unreadable. */
static char *qcow2_backing(const char *path)
{
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
                return NULL;
        uint8_t h[20];
        char *out = NULL;
        if (pread(fd, h, sizeof h, 0) == (ssize_t) sizeof h && memcmp(h, "QFI\xfb", 4) == 0) {
                uint64_t off = 0;
                for (int i = 8; i < 16; i++)
                        off = off << 8 | h[i];
                uint32_t len = (uint32_t) h[16] << 24 | (uint32_t) h[17] << 16 |
                               (uint32_t) h[18] << 8 | h[19];
                char name[1024];
                if (off && len > 0 && len < sizeof name &&
                    pread(fd, name, len, (off_t) off) == (ssize_t) len) {
                        name[len] = '\0';
                        if (g_path_is_absolute(name)) {
                                out = g_strdup(name);
                        } else {
                                g_autofree char *dir = g_path_get_dirname(path);
                                out = g_build_filename(dir, name, NULL);
                        }
                }
        }
        close(fd);
        return out;
}

/* Appends to `layers` what the last one's qcow2 header says is below it
 * (a chain libvirt left out of the definition), at most 32 deep; a LUKS
 * layer found so is the disk's (`secret_uuid`). */
static void complete_from_headers(GPtrArray *layers, const char *secret_uuid)
{
        while (layers->len > 0 && layers->len < 32) {
                const NkpDiskLayer *last = layers->pdata[layers->len - 1];
                g_autofree char *below = qcow2_backing(last->path);
                if (!below)
                        return;
                int luks = nkp_qcow2_is_luks(below);
                NkpDiskLayer *l = g_new0(NkpDiskLayer, 1);
                l->target = g_strdup(last->target);
                l->path = g_steal_pointer(&below);
                l->format = g_strdup(luks >= 0 ? "qcow2" : "raw");
                l->depth = layers->len;
                l->encrypted = luks == 1;
                l->secret_uuid = luks == 1 ? g_strdup(secret_uuid) : NULL;
                g_ptr_array_add(layers, l);
        }
}

/* ---- making LUKS overlays ------------------------------------------------- */

#define LUKS_OPTS_FMT                                                                       \
        "encrypt.format=luks,encrypt.key-secret=snew,encrypt.iter-time=10,"               \
        "encrypt.hash-alg=sha512,backing_file=%s,backing_fmt=%s"
#define LUKS_CREATE_ATTEMPTS 6

/* qemu-img create of a LUKS qcow2 `path` of `size` bytes over `backing`
 * (not opened: -u), its passphrase `value` on a pipe.  QEMU 7.2's PBKDF
 * benchmark flake ("Unable to get accurate CPU usage", tools.c) retried. */
static int create_overlay(const char *path, const char *backing, const char *backing_fmt,
                          guint64 size, const nkp_secret *value)
{
        g_autofree char *opts = g_strdup_printf(LUKS_OPTS_FMT, backing,
                                                backing_fmt ? backing_fmt : "qcow2");
        g_autofree char *sz = g_strdup_printf("%" G_GUINT64_FORMAT, size);
        const char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-u", "--object",
                               "secret,id=snew,file=/dev/fd/3,format=raw", "-o", opts, path,
                               sz, NULL };
        nkp_secret *secrets[] = { (nkp_secret *) value };
        const NkpToolRun run = { .argv = argv, .secrets = secrets, .n_secrets = 1,
                                 .blob_fd = -1 };
        g_autofree char *err = NULL;
        int r = 0;
        for (int attempt = 0; attempt < LUKS_CREATE_ATTEMPTS; attempt++) {
                if (attempt > 0)
                        g_usleep((gulong) (100000 << attempt));
                g_clear_pointer(&err, g_free);
                (void) nkp_unlink_nofollow(path);
                r = nkp_tool_run(&run, &err);
                if (r == 0 || !err || !strstr(err, "accurate CPU usage"))
                        break;
        }
        if (r != 0) {
                (void) nkp_unlink_nofollow(path);
                return r < 0 ? r
                             : nkp_fail(-EIO, "qemu-img could not create '%s': %s.", path,
                                        err && err[0] ? err : "no detail");
        }
        return 0;
}

/* The disk value (hex DEK) of target `target` among nkp_vm_unlock's. */
static const nkp_secret *disk_value(GPtrArray *secrets, const char *target)
{
        for (guint i = 0; i < secrets->len; i++) {
                const NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_DISK) == 0 && strcmp(s->object_id, target) == 0)
                        return s->value;
        }
        return NULL;
}

static const char *disk_secret_uuid(const NkpDomain *d, const char *target)
{
        for (size_t i = 0; i < nkp_keysafe_n_entries(d->keysafe); i++)
                if (strcmp(nkp_keysafe_entry_kind(d->keysafe, i), NKP_OBJECT_DISK) == 0 &&
                    strcmp(nkp_keysafe_entry_id(d->keysafe, i), target) == 0)
                        return nkp_keysafe_entry_secret_uuid(d->keysafe, i);
        return NULL;
}

/* virsh's name for an overlay: the active layer's path without its
 * extension, then ".NAME" (vm1.qcow2 -> vm1.s1). */
static char *overlay_path(const char *top, const char *name)
{
        g_autofree char *dir = g_path_get_dirname(top);
        g_autofree char *base = g_path_get_basename(top);
        char *dot = strrchr(base, '.');
        if (dot && dot != base)
                *dot = '\0';
        g_autofree char *file = g_strdup_printf("%s.%s", base, name);
        return g_build_filename(dir, file, NULL);
}

static bool snapshot_name_ok(const char *name)
{
        if (!name || !name[0] || strlen(name) > 64)
                return false;
        for (const char *p = name; *p; p++)
                if (!g_ascii_isalnum(*p) && !strchr("._-", *p))
                        return false;
        return name[0] != '.';
}

static const char *last_virt_error(void)
{
        virErrorPtr e = virGetLastError();
        return e && e->message ? e->message : "unknown libvirt error";
}

/* The capacity (virtual size) of disk `target`, from libvirt (it reads the
 * image header; works for shut-off domains too). */
static int disk_capacity(virDomainPtr dom, const char *target, guint64 *ret)
{
        virDomainBlockInfo info;
        if (virDomainGetBlockInfo(dom, target, &info, 0) < 0)
                return nkp_fail(-EIO, "libvirt cannot read the size of disk %s: %s.", target,
                                last_virt_error());
        *ret = info.capacity;
        return 0;
}

struct nkp_snapshot_result {
        char *name;
        GPtrArray *files; /* "TARGET PATH" */
};

static void snapshot_xml_disk(GString *x, const char *target, const char *path,
                              const char *secret_uuid)
{
        g_autofree char *t = g_markup_escape_text(target, -1);
        g_autofree char *p = g_markup_escape_text(path, -1);
        g_string_append_printf(x,
                               "    <disk name='%s' snapshot='external' type='file'>\n"
                               "      <driver type='qcow2'/>\n"
                               "      <source file='%s'>\n"
                               "        <encryption format='luks' engine='qemu'>\n"
                               "          <secret type='passphrase' uuid='%s'/>\n"
                               "        </encryption>\n"
                               "      </source>\n"
                               "    </disk>\n",
                               t, p, secret_uuid);
}

/* The overlays named in snapshot XML `sx` (made by nkp: REUSE_EXT) handed
 * to libvirt as one disk-only snapshot (atomic when `running`), `extra`
 * flags added.  -EIO with libvirt's message when it refuses (then it
 * changed nothing and the caller removes the files). */
static int hand_overlays(virDomainPtr dom, const char *domain, const char *sx, bool running,
                         unsigned extra)
{
        unsigned flags = VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY |
                         VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT | extra;
        if (running)
                flags |= VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
        virDomainSnapshotPtr snap = virDomainSnapshotCreateXML(dom, sx, flags);
        if (!snap)
                return nkp_fail(-EIO, "libvirt refused the snapshot of VM '%s': %s. Nothing was "
                                      "changed.",
                                domain, last_virt_error());
        virDomainSnapshotFree(snap);
        return 0;
}

int nkp_vm_snapshot(nkp_context *ctx, nkp_virt *v, const char *domain, const char *name,
                    char ***ret_files)
{
        if (!snapshot_name_ok(name))
                return nkp_fail(-EINVAL, "'%s' is not a snapshot name nkp takes (letters, "
                                         "digits, '.', '_', '-'; at most 64; no leading '.').",
                                name ? name : "");
        g_autoptr(NkpDomain) d0 = NULL;
        int r = nkp_vm_definition(v, domain, NULL, &d0);
        if (r < 0)
                return r;
        if (!d0->keysafe)
                return nkp_fail(-EINVAL, "VM '%s' is not encrypted by nkp: take its snapshot "
                                         "with virsh (nkpctl vm encrypt '%s' first to have it "
                                         "encrypted).",
                                domain, domain);
        /* The VM's lock keeps conversions out while the chain grows. */
        int lock = -1;
        g_autoptr(NkpDomain) d = NULL;
        r = nkp_vm_lock_recovered(ctx, v, d0, "snapshot", &lock, NULL, NULL, &d);
        if (r < 0)
                return r;
        int active = nkp_virt_domain_is_active(v, domain);
        g_autofree char *xml = NULL;
        g_autoptr(GPtrArray) secrets = NULL;
        g_autoptr(GPtrArray) made = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) files = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) plain = NULL;
        g_autoptr(GHashTable) chains = g_hash_table_new_full(
                g_str_hash, g_str_equal, g_free, (GDestroyNotify) g_ptr_array_unref);
        g_autofree char *ename = g_markup_escape_text(name, -1);
        GString *sx = g_string_new(NULL);
        virDomainPtr dom = NULL;
        if (active < 0) {
                r = active;
                goto out;
        }
        if ((r = nkp_virt_domain_xml(v, domain, active == 0, &xml)) < 0)
                goto out;
        if ((r = nkp_vm_disk_chain_plain_layers(d, xml, strlen(xml), &plain)) < 0)
                goto out;
        if (plain->len > 0) {
                const NkpDiskLayer *l = plain->pdata[0];
                r = nkp_fail(-EPERM, "VM '%s': its disk %s has a plain layer '%s' already; "
                                     "encrypt it first (nkpctl vm encrypt-layer '%s' '%s').",
                             domain, l->target, l->path, domain, l->path);
                goto out;
        }
        if ((r = nkp_vm_unlock(ctx, d, true, &secrets)) < 0)
                goto out;
        dom = virDomainLookupByName(nkp_virt_connection(v), domain);
        if (!dom) {
                r = nkp_fail(-ENOENT, "No libvirt domain '%s': %s.", domain, last_virt_error());
                goto out;
        }
        g_string_append_printf(sx, "<domainsnapshot>\n  <name>%s</name>\n  <disks>\n", ename);
        for (guint i = 0; i < d->disks->len; i++) {
                const NkpDomainDisk *dd = d->disks->pdata[i];
                const char *suuid = disk_secret_uuid(d, dd->target);
                if (!suuid) {
                        g_autofree char *t = g_markup_escape_text(dd->target, -1);
                        g_string_append_printf(sx, "    <disk name='%s' snapshot='no'/>\n", t);
                        continue;
                }
                g_autoptr(GPtrArray) layers = NULL;
                if ((r = nkp_domain_disk_layers(xml, strlen(xml), dd->target, &layers)) < 0)
                        goto out;
                complete_from_headers(layers, suuid);
                for (guint k = 0; k < layers->len; k++) {
                        const NkpDiskLayer *l = layers->pdata[k];
                        if (l->encrypted)
                                continue;
                        r = nkp_fail(-EPERM, "VM '%s': its disk %s has a plain layer '%s'; "
                                             "encrypt it first (nkpctl vm encrypt-layer '%s' "
                                             "'%s').",
                                     domain, l->target, l->path, domain, l->path);
                        goto out;
                }
                const NkpDiskLayer *top = layers->len ? layers->pdata[0] : NULL;
                const nkp_secret *value = disk_value(secrets, dd->target);
                if (!top || !value) {
                        r = nkp_fail(-EINVAL, "VM '%s': disk %s has no file nkp can snapshot.",
                                     domain, dd->target);
                        goto out;
                }
                g_autofree char *path = overlay_path(top->path, name);
                if (access(path, F_OK) == 0) {
                        r = nkp_fail(-EEXIST, "VM '%s': '%s' exists already; pick another "
                                              "snapshot name.",
                                     domain, path);
                        goto out;
                }
                guint64 size = 0;
                if ((r = disk_capacity(dom, dd->target, &size)) < 0)
                        goto out;
                if ((r = create_overlay(path, top->path, top->format, size, value)) < 0)
                        goto out;
                g_ptr_array_add(made, g_strdup(path));
                g_ptr_array_add(files, g_strdup_printf("%s %s", dd->target, path));
                g_hash_table_insert(chains, g_strdup(dd->target), g_ptr_array_ref(layers));
                snapshot_xml_disk(sx, dd->target, path, suuid);
        }
        g_string_append(sx, "  </disks>\n</domainsnapshot>\n");
        if ((r = hand_overlays(dom, domain, sx->str, active > 0, 0)) < 0)
                goto out;
        g_ptr_array_set_size(made, 0); /* libvirt owns them now */
        if ((r = complete_definition(v, domain, chains)) < 0) {
                r = nkp_fail_prefix(r, "VM '%s': snapshot '%s' was taken, but engine='qemu' "
                                       "and the chain below it could not be written into its "
                                       "definition, without which libvirt 9.0 refuses the "
                                       "next start",
                                    domain, name);
                goto out;
        }
        if (ret_files) {
                g_ptr_array_add(files, NULL);
                *ret_files = (char **) g_ptr_array_free(g_steal_pointer(&files), FALSE);
        }
out:
        for (guint i = 0; i < made->len; i++)
                (void) nkp_unlink_nofollow(made->pdata[i]);
        if (dom)
                virDomainFree(dom);
        g_string_free(sx, TRUE);
        nkp_journal_unlock(lock);
        return r;
}

/* ---- sealing a plain active layer of a running VM (nkpd) ------------------ */

static bool is_persistent(NkpVirt *v, const char *name);

int nkp_vm_plain_tops(const NkpDomain *d, const char *live, size_t len, GPtrArray **ret)
{
        g_autoptr(GPtrArray) plain = NULL;
        int r = nkp_vm_disk_chain_plain_layers(d, live, len, &plain);
        if (r < 0)
                return r;
        g_autoptr(GPtrArray) tops = g_ptr_array_new_with_free_func(nkp_disk_layer_free);
        for (guint k = 0; k < plain->len; k++) {
                NkpDiskLayer *l = plain->pdata[k];
                if (l->depth != 0)
                        continue;
                plain->pdata[k] = NULL; /* moved */
                g_ptr_array_add(tops, l);
        }
        *ret = g_steal_pointer(&tops);
        return 0;
}

#define SEAL_NAME_TRIES 100

char *nkp_seal_overlay_path(const char *plain)
{
        struct stat st;
        for (int n = 1; n <= SEAL_NAME_TRIES; n++) {
                char *path = n == 1 ? g_strconcat(plain, ".nkp-seal", NULL)
                                    : g_strdup_printf("%s.nkp-seal-%d", plain, n);
                if (lstat(path, &st) < 0 && errno == ENOENT)
                        return path;
                g_free(path);
        }
        return NULL;
}

/* The running definition of nkp VM `d` (NULL and no tops when it does not
 * run) and the plain active layers of its nkp disks in it. */
static int running_plain_tops(NkpVirt *v, const NkpDomain *d, char **ret_live, GPtrArray **ret)
{
        *ret_live = NULL;
        if (nkp_virt_domain_is_active(v, d->name) <= 0 ||
            nkp_virt_domain_xml(v, d->name, false, ret_live) < 0) {
                nkp_error_clear(); /* shut off (meanwhile): nothing runs to seal */
                *ret = g_ptr_array_new_with_free_func(nkp_disk_layer_free);
                return 0;
        }
        return nkp_vm_plain_tops(d, *ret_live, strlen(*ret_live), ret);
}

/* The new LUKS overlay over plain layer `top` (its final name chosen by
 * nkp_seal_overlay_path) in *ret_path: made as PATH.nkp-new and linked to
 * PATH only when complete (an existing file is never replaced), so no
 * half-made overlay ever has the final name. */
static int make_seal_overlay(virDomainPtr dom, const NkpDiskLayer *top, const nkp_secret *value,
                             char **ret_path)
{
        g_autofree char *path = nkp_seal_overlay_path(top->path);
        if (!path)
                return nkp_fail(-EEXIST, "'%s.nkp-seal' to '-%d' all exist; remove the ones no "
                                         "chain uses.",
                                top->path, SEAL_NAME_TRIES);
        guint64 size = 0;
        int r = disk_capacity(dom, top->target, &size);
        if (r < 0)
                return r;
        g_autofree char *tmp = g_strconcat(path, ".nkp-new", NULL);
        if ((r = create_overlay(tmp, top->path, top->format, size, value)) < 0)
                return r;
        if (link(tmp, path) < 0) {
                int e = errno;
                r = nkp_fail(-e, "Cannot put the overlay '%s' in place: %s.", path,
                             g_strerror(e));
                (void) nkp_unlink_nofollow(tmp);
                return r;
        }
        (void) nkp_unlink_nofollow(tmp);
        (void) nkp_fsync_dir_of(path);
        *ret_path = g_steal_pointer(&path);
        return 0;
}

/* nkp_vm_seal_plain_tops with the VM's lock held: the definitions read
 * again (an nkpctl command may have changed them before the lock). */
static int seal_locked(nkp_context *ctx, NkpVirt *v, const char *name, GString *note)
{
        g_autoptr(NkpDomain) d = NULL;
        g_autofree char *live = NULL;
        g_autoptr(GPtrArray) tops = NULL;
        int r = nkp_vm_definition(v, name, NULL, &d);
        if (r < 0)
                return r;
        if (!d->keysafe || (r = running_plain_tops(v, d, &live, &tops)) < 0 || tops->len == 0)
                return r;
        g_autoptr(GPtrArray) secrets = NULL;
        g_autoptr(GPtrArray) made = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GHashTable) chains = g_hash_table_new_full(
                g_str_hash, g_str_equal, g_free, (GDestroyNotify) g_ptr_array_unref);
        GString *sx = g_string_new("<domainsnapshot>\n  <disks>\n");
        virDomainPtr dom = NULL;
        if ((r = nkp_vm_unlock(ctx, d, true, &secrets)) < 0)
                goto out;
        dom = virDomainLookupByName(nkp_virt_connection(v), name);
        if (!dom) {
                r = nkp_fail(-ENOENT, "No libvirt domain '%s': %s.", name, last_virt_error());
                goto out;
        }
        for (guint i = 0; i < d->disks->len; i++) {
                const NkpDomainDisk *dd = d->disks->pdata[i];
                const NkpDiskLayer *top = NULL;
                for (guint k = 0; k < tops->len && !top; k++)
                        if (strcmp(((NkpDiskLayer *) tops->pdata[k])->target, dd->target) == 0)
                                top = tops->pdata[k];
                const nkp_secret *value = top ? disk_value(secrets, dd->target) : NULL;
                const char *suuid = top ? disk_secret_uuid(d, dd->target) : NULL;
                if (!top) {
                        g_autofree char *t = g_markup_escape_text(dd->target, -1);
                        g_string_append_printf(sx, "    <disk name='%s' snapshot='no'/>\n", t);
                        continue;
                }
                if (!value || !suuid) {
                        r = nkp_fail(-ENOENT, "VM '%s' has no key for disk %s.", name, dd->target);
                        goto out;
                }
                g_autofree char *path = NULL;
                g_autoptr(GPtrArray) layers = NULL;
                if ((r = make_seal_overlay(dom, top, value, &path)) < 0)
                        goto out;
                g_ptr_array_add(made, g_strdup(path));
                if ((r = nkp_domain_disk_layers(live, strlen(live), dd->target, &layers)) < 0)
                        goto out;
                g_hash_table_insert(chains, g_strdup(dd->target), g_steal_pointer(&layers));
                snapshot_xml_disk(sx, dd->target, path, suuid);
                g_string_append_printf(note, "%sVM '%s': disk %s: plain layer '%s' sealed under '%s'",
                                       note->len ? "; " : "", name, dd->target, top->path, path);
        }
        g_string_append(sx, "  </disks>\n</domainsnapshot>\n");
        /* NO_METADATA: no snapshot the administrator did not ask for in
         * virsh snapshot-list (libvirt 9.0 takes it with REUSE_EXT). */
        if ((r = hand_overlays(dom, name, sx->str, true,
                               VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)) < 0)
                goto out;
        g_ptr_array_set_size(made, 0); /* libvirt owns them now */
        /* a transient VM's "inactive" XML is its running one: defining it
         * would make the VM persistent */
        if (is_persistent(v, name) && (r = complete_definition(v, name, chains)) < 0) {
                r = nkp_fail_prefix(r, "The overlays are in use, but engine='qemu' and the chain "
                                       "below them could not be written into the definition, "
                                       "without which libvirt 9.0 refuses the next start");
                goto out;
        }
        r = (int) tops->len;
out:
        for (guint i = 0; i < made->len; i++)
                (void) nkp_unlink_nofollow(made->pdata[i]);
        if (dom)
                virDomainFree(dom);
        g_string_free(sx, TRUE);
        return r;
}

int nkp_vm_seal_plain_tops(nkp_context *ctx, NkpVirt *v, const char *name, char **ret_note)
{
        if (!ctx->disks_seal_plain_layers)
                return 0;
        g_autoptr(NkpDomain) d = NULL;
        g_autofree char *live = NULL;
        g_autoptr(GPtrArray) tops = NULL;
        int r = nkp_vm_definition(v, name, NULL, &d);
        if (r == -ENOENT) {
                nkp_error_clear();
                return 0; /* gone meanwhile */
        }
        if (r < 0)
                return nkp_fail_prefix(r, "The disk chains of VM '%s' cannot be checked", name);
        if (!d->keysafe)
                return 0;
        if ((r = running_plain_tops(v, d, &live, &tops)) < 0)
                return nkp_fail_prefix(r, "The disk chains of VM '%s' cannot be checked", name);
        if (tops->len == 0)
                return 0; /* the common case: no lock taken */
        const NkpDiskLayer *first = tops->pdata[0];
        g_autofree char *what = g_strdup_printf(
                "VM '%s': disk %s: plain layer '%s' is NOT sealed (the guest's writes still land "
                "in it in clear; nkpd tries again at libvirt's next status write)",
                name, first->target, first->path);
        /* nkpd never waits: an nkpctl command holding the lock (or a journal
         * it left) owns the chain right now. */
        g_autofree char *journal = nkp_journal_path(ctx, d->uuid);
        int lock = -1;
        r = nkp_vm_lock(ctx, d->uuid, true, 0, &lock);
        if (r == -EBUSY || (r == 0 && access(journal, F_OK) == 0)) {
                nkp_journal_unlock(lock);
                return nkp_fail(-EBUSY, "%s: an nkpctl command holds the VM's lock or left a "
                                        "journal (nkpctl vm status '%s' says which).",
                                what, name);
        }
        if (r < 0)
                return nkp_fail_prefix(r, "%s", what);
        GString *note = g_string_new(NULL);
        r = seal_locked(ctx, v, name, note);
        nkp_journal_unlock(lock);
        if (r < 0) {
                g_string_free(note, TRUE);
                return nkp_fail_prefix(r, "%s", what);
        }
        if (ret_note && note->len)
                *ret_note = g_string_free(note, FALSE);
        else
                g_string_free(note, TRUE);
        return r;
}

/* ---- encrypting a plain layer in place ------------------------------------- */

/* `--image-opts` of a chain whose top is `layers[from]`: the key secret
 * `sid` on every encrypted layer (backing.…), none on plain ones.  `top_key`
 * forces the key on the top one (the new copy). */
char *nkp_disk_chain_opts(GPtrArray *layers, guint from, const char *file, bool top_key)
{
        GString *s = g_string_new(NULL);
        g_string_append_printf(s, "driver=qcow2,file.filename=%s", file);
        GString *prefix = g_string_new("");
        for (guint k = from; k < layers->len; k++) {
                const NkpDiskLayer *l = layers->pdata[k];
                if ((k == from && top_key) || (k > from && l->encrypted))
                        g_string_append_printf(s, ",%sencrypt.key-secret=sk", prefix->str);
                g_string_append(prefix, "backing.");
        }
        g_string_free(prefix, TRUE);
        return g_string_free(s, FALSE);
}

/* The layer's converted copy in `path`.nkp-new: a LUKS qcow2 over the same
 * backing, holding the same clusters (qemu-img convert -n -B: only what
 * the layer itself allocates), compared with the original through the
 * whole chain, fsynced, owner and mode copied. */
static int convert_layer(GPtrArray *layers, guint k, guint64 size, const nkp_secret *value)
{
        const NkpDiskLayer *l = layers->pdata[k];
        const NkpDiskLayer *below = k + 1 < layers->len ? layers->pdata[k + 1] : NULL;
        if (!below)
                return nkp_fail(-EINVAL, "'%s' is the base of its disk, not a snapshot layer: "
                                         "nkpctl vm encrypt encrypts whole disks.",
                                l->path);
        g_autofree char *tmp = g_strconcat(l->path, ".nkp-new", NULL);
        int r = create_overlay(tmp, below->path, below->format, size, value);
        if (r < 0)
                return r;
        g_autofree char *src = nkp_disk_chain_opts(layers, k, l->path, false);
        g_autofree char *dst = nkp_disk_chain_opts(layers, k, tmp, true);
        nkp_secret *secrets[] = { (nkp_secret *) value };
        const char *conv[] = { "qemu-img", "convert", "-q", "-n", "-B", below->path, "--object",
                               "secret,id=sk,file=/dev/fd/3,format=raw", "--image-opts", src,
                               "--target-image-opts", dst, NULL };
        const NkpToolRun run = { .argv = conv, .secrets = secrets, .n_secrets = 1,
                                 .blob_fd = -1 };
        g_autofree char *err = NULL;
        r = nkp_tool_run(&run, &err);
        if (r == 0) {
                g_clear_pointer(&err, g_free);
                const char *cmp[] = { "qemu-img", "compare", "-q", "--object",
                                      "secret,id=sk,file=/dev/fd/3,format=raw", "--image-opts",
                                      src, dst, NULL };
                const NkpToolRun crun = { .argv = cmp, .secrets = secrets, .n_secrets = 1,
                                          .blob_fd = -1 };
                r = nkp_tool_run(&crun, &err);
        }
        if (r == 0) {
                struct stat st;
                int fd = open(tmp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
                if (fd < 0 || stat(l->path, &st) < 0 || fchmod(fd, st.st_mode & 07777) < 0 ||
                    fchown(fd, st.st_uid, st.st_gid) < 0 || fsync(fd) < 0)
                        r = -errno;
                if (fd >= 0)
                        close(fd);
                if (r < 0)
                        (void) nkp_fail(r, "Cannot finish the encrypted copy of '%s': %s.",
                                        l->path, g_strerror(-r));
        } else if (r > 0) {
                r = nkp_fail(-EIO, "qemu-img could not encrypt '%s': %s. Nothing was changed.",
                             l->path, err && err[0] ? err : "no detail");
        }
        if (r < 0)
                (void) nkp_unlink_nofollow(tmp);
        return r;
}

/* The XML with disk `target`'s chain written as `layers` says: the active
 * layer's <encryption> at disk level, every layer below as a
 * <backingStore> (add_backing_chain), every engine set. */
static int write_disk_chain(const char *xml, const char *target, GPtrArray *layers, char **ret)
{
        xmlDocPtr doc = NULL;
        int r = read_doc(xml, strlen(xml), &doc);
        if (r < 0)
                return r;
        xmlNodePtr disk = find_disk(doc, target);
        xmlNodePtr src = disk ? nkp_xml_child(disk, "source") : NULL;
        if (!src || layers->len == 0) {
                xmlFreeDoc(doc);
                return nkp_fail(-ENOENT, "VM has no disk %s.", target);
        }
        const NkpDiskLayer *top = layers->pdata[0];
        xmlNodePtr n;
        while ((n = nkp_xml_child(disk, "backingStore")) || (n = nkp_xml_child(src, "encryption"))) {
                xmlUnlinkNode(n);
                xmlFreeNode(n);
        }
        if (top->encrypted && !nkp_xml_child(disk, "encryption")) {
                xmlNodePtr enc = xmlNewChild(disk, NULL, X("encryption"), NULL);
                xmlSetProp(enc, X("format"), X("luks"));
                xmlNodePtr sec = xmlNewChild(enc, NULL, X("secret"), NULL);
                xmlSetProp(sec, X("type"), X("passphrase"));
                xmlSetProp(sec, X("uuid"), X(top->secret_uuid));
        }
        g_autoptr(GPtrArray) below = g_ptr_array_new();
        for (guint k = 1; k < layers->len; k++)
                g_ptr_array_add(below, layers->pdata[k]);
        add_backing_chain(disk, below);
        (void) set_engines(xmlDocGetRootElement(doc));
        r = format_doc(doc, ret);
        xmlFreeDoc(doc);
        return r;
}

int nkp_vm_encrypt_layer(nkp_context *ctx, nkp_virt *v, const char *domain, const char *file)
{
        g_autoptr(NkpDomain) d0 = NULL;
        int r = nkp_vm_definition(v, domain, NULL, &d0);
        if (r < 0)
                return r;
        if (!d0->keysafe)
                return nkp_fail(-EINVAL, "VM '%s' is not encrypted by nkp.", domain);
        int active = nkp_virt_domain_is_active(v, domain);
        if (active < 0)
                return active;
        if (active > 0)
                return nkp_fail(-EBUSY, "VM '%s' is running; shut it off first (a running "
                                        "layer cannot be rewritten), then run this again.",
                                domain);
        int lock = -1;
        g_autoptr(NkpDomain) d = NULL;
        g_autofree char *xml = NULL;
        r = nkp_vm_lock_recovered(ctx, v, d0, "encrypt-layer", &lock, NULL, &xml, &d);
        if (r < 0)
                return r;
        g_autoptr(GPtrArray) plain = NULL;
        g_autoptr(GPtrArray) layers = NULL;
        g_autoptr(GPtrArray) secrets = NULL;
        g_autofree char *new_xml = NULL;
        const NkpDiskLayer *hit = NULL;
        const nkp_secret *value = NULL;
        const char *suuid = NULL;
        if ((r = nkp_vm_disk_chain_plain_layers(d, xml, strlen(xml), &plain)) < 0)
                goto out;
        for (guint i = 0; i < plain->len && !hit; i++) {
                const NkpDiskLayer *l = plain->pdata[i];
                if (strcmp(l->path, file) == 0)
                        hit = l;
        }
        if (!hit) {
                r = nkp_fail(-ENOENT, "'%s' is not a plain layer of an nkp disk of VM '%s' "
                                      "(nkpctl vm status '%s' names them).",
                             file, domain, domain);
                goto out;
        }
        if ((r = nkp_domain_disk_layers(xml, strlen(xml), hit->target, &layers)) < 0)
                goto out;
        if ((r = nkp_vm_unlock(ctx, d, true, &secrets)) < 0)
                goto out;
        value = disk_value(secrets, hit->target);
        suuid = disk_secret_uuid(d, hit->target);
        /* An offline `virsh snapshot-create-as` leaves no <backingStore>:
         * the layers below come from the qcow2 headers. */
        complete_from_headers(layers, suuid);
        if (!value || !suuid) {
                r = nkp_fail(-ENOENT, "VM '%s' has no key for disk %s.", domain, hit->target);
                goto out;
        }
        /* A rerun after a kill between the rename and the define finds the
         * file encrypted already: only the definition is left to do. */
        r = nkp_qcow2_is_luks(hit->path);
        if (r < 0) {
                r = nkp_fail(r, "Cannot read the qcow2 header of '%s': %s.", hit->path,
                             g_strerror(-r));
                goto out;
        }
        if (r == 0) {
                /* The layer's own virtual size (its header), not the
                 * disk's: a layer below may be smaller than the top. */
                guint64 size = 0, cluster = 0;
                g_autofree char *backing = NULL;
                if ((r = nkp_qcow2_geometry(hit->path, &size, &cluster, &backing)) < 0) {
                        r = nkp_fail(r, "Cannot read the qcow2 header of '%s': %s.", hit->path,
                                     g_strerror(-r));
                        goto out;
                }
                if ((r = convert_layer(layers, hit->depth, size, value)) < 0)
                        goto out;
                nkp_test_crash_point("layer-converted");
                g_autofree char *tmp = g_strconcat(hit->path, ".nkp-new", NULL);
                if (rename(tmp, hit->path) < 0) {
                        r = nkp_fail(-errno, "Cannot put the encrypted '%s' in place: %s.",
                                     hit->path, g_strerror(errno));
                        (void) nkp_unlink_nofollow(tmp);
                        goto out;
                }
                (void) nkp_fsync_dir_of(hit->path);
                nkp_test_crash_point("layer-swapped");
        }
        {
                NkpDiskLayer *l = layers->pdata[hit->depth];
                l->encrypted = true;
                g_free(l->secret_uuid);
                l->secret_uuid = g_strdup(suuid);
        }
        if ((r = write_disk_chain(xml, hit->target, layers, &new_xml)) < 0)
                goto out;
        if ((r = nkp_virt_domain_define(v, new_xml)) < 0)
                goto out;
        if (plain->len == 1) /* that was the last one */
                (void) nkp_alarm_clear(ctx, "vm-plain-layer", domain);
        r = 0;
out:
        nkp_journal_unlock(lock);
        return r;
}

/* The alarm's message: the same whoever raises it (vm status, nkpd), naming
 * the fixes.  `sealed_under`: the encrypted active layer over `l` (nkpd
 * sealed it: nkp_vm_seal_plain_tops), else NULL;
 * `unsealed`: `l` is the running VM's active layer although nkpd seals
 * such layers (it could not yet).  Encrypting the layer in place needs the
 * VM shut off; an active plain layer can also be committed while it runs. */
static char *plain_layer_message(const nkp_context *ctx, const char *vm, const NkpDiskLayer *l,
                                 const char *sealed_under, bool unsealed)
{
        const char *refusal = ctx->disks_allow_plain_layers
                                      ? ""
                                      : "; until then its next start is refused";
        if (sealed_under)
                return g_strdup_printf(
                        "VM '%s': its disk %s has a plain (unencrypted) layer '%s', made behind "
                        "nkp's back (virsh snapshot-create-as?); nkpd sealed it: the guest's "
                        "writes since go to the encrypted '%s', but what it wrote before is in "
                        "clear in '%s'; shut the VM off and encrypt it in place (nkpctl vm "
                        "encrypt-layer '%s' '%s')%s",
                        vm, l->target, l->path, sealed_under, l->path, vm, l->path, refusal);
        return g_strdup_printf(
                "VM '%s': its disk %s has a plain (unencrypted) layer '%s', made behind nkp's "
                "back (virsh snapshot-create-as?), so the guest's writes land in it in clear%s; "
                "shut the VM off and encrypt it in place (nkpctl vm encrypt-layer '%s' '%s'), "
                "or commit it into the encrypted layer below (virsh blockcommit '%s' %s "
                "--active --pivot --wait, then delete the file)%s",
                vm, l->target, l->path,
                unsealed ? "; it is NOT sealed (nkpd could not: its log says why; it tries "
                           "again at libvirt's next status write)"
                         : "",
                vm, l->path, vm, l->target, refusal);
}

/* The active layer of disk `target` in `live` when it is encrypted (so a
 * plain layer below it was sealed), else NULL. */
static char *sealed_under(const char *live, const char *target)
{
        g_autoptr(GPtrArray) layers = NULL;
        if (nkp_domain_disk_layers(live, strlen(live), target, &layers) < 0 || layers->len == 0) {
                nkp_error_clear();
                return NULL;
        }
        const NkpDiskLayer *top = layers->pdata[0];
        return top->encrypted ? g_strdup(top->path) : NULL;
}

static bool has_layer(GPtrArray *layers, const char *path)
{
        for (guint i = 0; i < layers->len; i++)
                if (strcmp(((NkpDiskLayer *) layers->pdata[i])->path, path) == 0)
                        return true;
        return false;
}

int nkp_vm_plain_layer_alarm(nkp_context *ctx, const NkpDomain *d, const char *xml,
                             const char *live, GPtrArray *out)
{
        g_autoptr(GPtrArray) plain = g_ptr_array_new_with_free_func(nkp_disk_layer_free);
        const char *texts[] = { live, xml };
        guint from_live = 0; /* the first ones, found in `live` */
        for (guint t = 0; t < G_N_ELEMENTS(texts); t++) {
                g_autoptr(GPtrArray) some = NULL;
                if (!texts[t])
                        continue;
                int r = nkp_vm_disk_chain_plain_layers(d, texts[t], strlen(texts[t]), &some);
                if (r < 0)
                        return r;
                for (guint k = 0; k < some->len; k++) {
                        NkpDiskLayer *l = some->pdata[k];
                        if (has_layer(plain, l->path))
                                continue;
                        some->pdata[k] = NULL; /* moved */
                        g_ptr_array_add(plain, l);
                }
                if (t == 0)
                        from_live = plain->len;
        }
        for (guint i = 0; out && i < plain->len; i++) {
                const NkpDiskLayer *l = plain->pdata[i];
                g_ptr_array_add(out, g_strdup_printf("%s %s", l->target, l->path));
        }
        if (plain->len == 0) {
                (void) nkp_alarm_clear(ctx, "vm-plain-layer", d->name);
                nkp_error_clear();
                return 0;
        }
        /* A plain layer under an encrypted active layer was sealed: so it
         * stays once the VM is shut off (then read from `xml`). */
        const NkpDiskLayer *first = plain->pdata[0];
        g_autofree char *under = first->depth > 0
                                         ? sealed_under(from_live > 0 ? live : xml, first->target)
                                         : NULL;
        bool unsealed = from_live > 0 && first->depth == 0 && ctx->disks_seal_plain_layers;
        g_autofree char *msg = plain_layer_message(ctx, d->name, first, under, unsealed);
        if (!nkp_alarm_open(ctx, "vm-plain-layer", d->name, msg) &&
            nkp_alarm_raise(ctx, "vm-plain-layer", d->name, msg) < 0)
                nkp_log(NKP_LOG_WARNING, "%s", nkp_error_message());
        nkp_error_clear();
        return (int) plain->len;
}

void nkp_vm_status_add_plain_layers(nkp_context *ctx, NkpVirt *v, const NkpDomain *d,
                                    const char *xml, GPtrArray *out)
{
        g_autofree char *live = NULL;
        if (nkp_virt_domain_is_active(v, d->name) > 0)
                (void) nkp_virt_domain_xml(v, d->name, false, &live);
        /* The alarm as soon as anyone looks (nkpd raises it too, on the
         * definitions libvirt rewrites: nkp_vm_watch_plain_layers). */
        (void) nkp_vm_plain_layer_alarm(ctx, d, xml, live, out);
        nkp_error_clear();
}

int nkp_vm_watch_plain_layers(nkp_context *ctx, NkpVirt *v, const char *name, char **ret_note)
{
        g_autofree char *xml = NULL, *live = NULL;
        g_autoptr(NkpDomain) d = NULL;
        int r = nkp_vm_definition(v, name, &xml, &d);
        if (r == -ENOENT) {
                nkp_error_clear();
                return 0; /* gone meanwhile */
        }
        if (r < 0)
                return nkp_fail_prefix(r, "The disk chains of VM '%s' cannot be checked", name);
        if (!d->keysafe || nkp_vm_conversion_pending(ctx, d))
                return 0; /* not nkp's VM; or nkpctl is changing its chains right now */
        if (nkp_virt_domain_is_active(v, name) > 0 &&
            nkp_virt_domain_xml(v, name, false, &live) < 0)
                nkp_error_clear(); /* stopped meanwhile: the definition says it all */
        g_autoptr(GPtrArray) found = g_ptr_array_new_with_free_func(g_free);
        bool was_open = nkp_alarm_open(ctx, "vm-plain-layer", name, NULL);
        r = nkp_vm_plain_layer_alarm(ctx, d, xml, live, found);
        if (r < 0)
                return nkp_fail_prefix(r, "The disk chains of VM '%s' cannot be checked", name);
        if (r > 0 && !was_open && ret_note) /* said once, not at every rewrite */
                *ret_note = g_strdup_printf("VM '%s': plain (unencrypted) disk layer '%s' in its "
                                            "chain: alarm vm-plain-layer",
                                            name, strchr(found->pdata[0], ' ') + 1);
        return r;
}

/* ---- for deep rekey and decrypt of chained disks (vm-convert.c) ----------- */

int nkp_disk_chain_layers(const char *xml, size_t len, const char *target,
                          const char *secret_uuid, GPtrArray **ret)
{
        int r = nkp_domain_disk_layers(xml, len, target, ret);
        if (r == 0)
                complete_from_headers(*ret, secret_uuid);
        return r;
}

int nkp_domain_set_disk_chain(const char *xml, const char *target, GPtrArray *layers, char **ret)
{
        return write_disk_chain(xml, target, layers, ret);
}

/* ---- for vm-revert.c (declared in nkp-private.h) --------------------------- */

int nkp_luks_overlay_create(const char *path, const char *backing, const char *backing_fmt,
                            guint64 size, const nkp_secret *value)
{
        return create_overlay(path, backing, backing_fmt, size, value);
}

void nkp_disk_chain_from_headers(GPtrArray *layers, const char *secret_uuid)
{
        complete_from_headers(layers, secret_uuid);
}

const nkp_secret *nkp_vm_disk_value(GPtrArray *secrets, const char *target)
{
        return disk_value(secrets, target);
}

const char *nkp_vm_disk_secret_uuid(const NkpDomain *d, const char *target)
{
        return disk_secret_uuid(d, target);
}

char *nkp_overlay_path(const char *top, const char *name)
{
        return overlay_path(top, name);
}

/* ---- snapshot='no' on definitions written before nkp set it --------------- */

static bool is_persistent(NkpVirt *v, const char *name)
{
        g_autoptr(GPtrArray) names = NULL;
        if (nkp_virt_domain_list(v, &names) < 0) {
                nkp_error_clear();
                return false;
        }
        for (guint i = 0; i < names->len; i++)
                if (strcmp(names->pdata[i], name) == 0)
                        return true;
        return false;
}

/* The definition read again under the VM's lock: an nkpctl command that
 * finished between a first read and the lock must not be undone by a
 * define of what was read before it. */
static int refuse_snapshots_locked(NkpVirt *v, const char *name, int *ret_changed)
{
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        g_autoptr(NkpDomainEdit) e = NULL;
        int r = nkp_vm_definition(v, name, &xml, &d);
        if (r < 0)
                return r;
        *ret_changed = 0;
        if (!d->keysafe) /* decrypted meanwhile */
                return 0;
        if ((r = nkp_domain_edit_new(xml, strlen(xml), &e)) < 0)
                return r;
        int changed = nkp_domain_edit_refuse_snapshots(e);
        if (changed <= 0)
                return changed;
        g_autofree char *out = NULL;
        if ((r = nkp_domain_edit_format(e, &out)) < 0 || (r = nkp_virt_domain_define(v, out)) < 0)
                return r;
        *ret_changed = changed;
        return 0;
}

int nkp_vm_refuse_snapshots(nkp_context *ctx, NkpVirt *v, const char *name, char **ret_note)
{
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        int r = nkp_vm_definition(v, name, &xml, &d);
        if (r == -ENOENT) {
                nkp_error_clear();
                return 0; /* gone meanwhile */
        }
        if (r < 0)
                return nkp_fail_prefix(r, "The snapshot setting of VM '%s' cannot be checked", name);
        /* a transient VM's "inactive" XML is its running one: defining it
         * would make the VM persistent */
        if (!d->keysafe || !is_persistent(v, name))
                return 0;
        g_autoptr(NkpDomainEdit) e = NULL;
        if ((r = nkp_domain_edit_new(xml, strlen(xml), &e)) < 0)
                return r;
        if ((r = nkp_domain_edit_refuse_snapshots(e)) <= 0)
                return r; /* the common case: nothing to do, no lock taken */
        /* An nkpctl command that holds the lock owns the VM: looked at again
         * at the next define event or scan.  The lock file is created if
         * missing (a VM migrated in was never locked here). */
        g_autofree char *journal = nkp_journal_path(ctx, d->uuid);
        int fd = -1;
        r = nkp_vm_lock(ctx, d->uuid, true, 0, &fd);
        if (r == -EBUSY || (r == 0 && access(journal, F_OK) == 0)) {
                nkp_journal_unlock(fd);
                nkp_error_clear();
                return 0;
        }
        if (r < 0)
                return nkp_fail_prefix(r, "The snapshot setting of VM '%s' cannot be checked", name);
        int changed = 0;
        r = refuse_snapshots_locked(v, name, &changed);
        nkp_journal_unlock(fd);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot get snapshot='no' on its encrypted disks",
                                       name);
        if (!changed)
                return 0;
        if (ret_note)
                *ret_note = g_strdup_printf("VM '%s': snapshot='no' set on %d encrypted disk(s), so "
                                            "libvirt refuses internal and plain snapshots of them "
                                            "(nkpctl vm snapshot still works)%s",
                                            name, changed,
                                            nkp_virt_domain_is_active(v, name) > 0
                                                    ? "; the running VM gets it at its next start"
                                                    : "");
        nkp_error_clear();
        return 1;
}

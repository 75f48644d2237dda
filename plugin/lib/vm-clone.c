/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Clones of nkp VMs (issue 16; docs/snapshots-clones.md).
 *
 * virt-clone (and virt-manager's Clone, the same virtinst code) cannot
 * clone an nkp VM on libvirt 9.0: it defines the clone first (the
 * original's keysafe, bound to the original's UUID, and its secret UUIDs),
 * then asks libvirt's storage driver to copy each disk (createXMLFrom);
 * the driver refuses a LUKS volume without a <secret> in the new volume's
 * XML, which virtinst never writes ("A single <secret type='passphrase'...>
 * element is expected"), and virt-clone undefines the clone.  Nothing nkp
 * does outside libvirt can change that request, so the clone is nkp's:
 *
 *   nkpctl vm clone SRC NEW [--file vda=PATH]…
 *
 * does what virt-clone does (new name and UUID, new MAC addresses, a fresh
 * vTPM: virt-clone copies no swtpm state either, the NVRAM path dropped so
 * libvirt makes the clone its own) plus the keys: a new keysafe bound to
 * the clone's UUID under the original's provider, new secret UUIDs (two
 * VMs running at once must not share a libvirt secret), and NEW DEKs:
 * every disk is read through its chain under the original's key and
 * written as one LUKS qcow2 under the clone's (qemu-img convert, then
 * compare).  Why new keys: a clone is often handed to someone else, and a
 * shared DEK would let whoever holds the clone's key read the original's
 * files (and a rekey --deep of one would not cover the other).
 *
 * --same-keys (NKP_VM_CLONE_SAME_KEYS) is the fast other choice: each
 * single-layer disk file copied as it is (a reflink where the filesystem
 * can, else its data extents only), the original's DEKs unwrapped and
 * wrapped again into the clone's keysafe, bound to the clone's UUID, under
 * new secret UUIDs.  A disk with a backing chain is still flattened (one
 * file per disk, as virt-clone), under the original's DEK.
 *
 * Crash safety (docs/crash-safety.md "vm clone"): before its first file
 * the clone writes a record, ROOT/var/lib/nkp/clones/NEW.ini (0600, no key
 * material: the source's name, the UUID it will define, the disk paths it
 * will make); each copy is written as PATH.nkp-new and renamed when
 * complete; the clone is defined last; the record goes once it is defined.
 * A kill leaves no clone, or a complete one, and the record.  The rerun of
 * the same command reads the record: NEW defined with the recorded UUID
 * means only the record was left (removed: done); otherwise it removes the
 * recorded files (PATH only when it is a LUKS qcow2, as every file the
 * clone makes is; PATH.nkp-new always) and clones again.  A file at a
 * target path (or its .nkp-new) that the record does not list is refused
 * as before, with one line and nothing removed: nkp never deletes a file
 * it did not make. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libxml/parser.h>
#include <libxml/tree.h>

#include "nkp-private.h"
#include "nkp-xml.h"

static void drop(xmlNodePtr n)
{
        if (!n)
                return;
        xmlUnlinkNode(n);
        xmlFreeNode(n);
}

/* The path of the clone's copy of disk `target` (files: "vda=PATH"). */
static int clone_path(const char *const *files, const char *target, const char *orig,
                      const char *new_name, char **ret)
{
        size_t tl = strlen(target);
        for (const char *const *f = files; f && *f; f++)
                if (strncmp(*f, target, tl) == 0 && (*f)[tl] == '=') {
                        if (!g_path_is_absolute(*f + tl + 1))
                                return nkp_fail(-EINVAL, "--file %s: the path must be absolute.",
                                                *f);
                        *ret = g_strdup(*f + tl + 1);
                        return 0;
                }
        g_autofree char *dir = g_path_get_dirname(orig);
        g_autofree char *base = g_strdup_printf("%s-%s.qcow2", new_name, target);
        *ret = g_build_filename(dir, base, NULL);
        return 0;
}

/* virt-clone's edits: name, UUID, the disks' new files (chains
 * flattened), no MAC addresses (libvirt makes new ones), no NVRAM path. */
static int clone_xml(const char *xml, const char *new_name, const char *new_uuid,
                     GHashTable *paths, char **ret)
{
        xmlDocPtr doc = xmlReadMemory(xml, (int) strlen(xml), "domain.xml", NULL,
                                      XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
        xmlNodePtr root = doc ? xmlDocGetRootElement(doc) : NULL;
        if (!root || doc->intSubset) {
                xmlFreeDoc(doc);
                return nkp_fail(-EBADMSG, "The original's domain XML cannot be read.");
        }
        xmlNodeSetContent(nkp_xml_child(root, "name"), NULL);
        xmlNodeAddContent(nkp_xml_child(root, "name"), X(new_name));
        xmlNodeSetContent(nkp_xml_child(root, "uuid"), X(new_uuid));
        drop(nkp_xml_child(nkp_xml_child(root, "os"), "nvram"));
        for (xmlNodePtr dev = root->children; dev; dev = dev->next) {
                if (dev->type != XML_ELEMENT_NODE || !xmlStrEqual(dev->name, X("devices")))
                        continue;
                for (xmlNodePtr n = dev->children; n; n = n->next) {
                        if (n->type != XML_ELEMENT_NODE)
                                continue;
                        if (xmlStrEqual(n->name, X("interface")))
                                drop(nkp_xml_child(n, "mac"));
                        if (!xmlStrEqual(n->name, X("disk")))
                                continue;
                        xmlChar *t = xmlGetProp(nkp_xml_child(n, "target"), X("dev"));
                        const char *p = t ? g_hash_table_lookup(paths, t) : NULL;
                        xmlFree(t);
                        if (!p)
                                continue;
                        xmlNodePtr bs;
                        while ((bs = nkp_xml_child(n, "backingStore")))
                                drop(bs);
                        xmlNodePtr src = nkp_xml_child(n, "source");
                        drop(nkp_xml_child(src, "encryption"));
                        xmlSetProp(src, X("file"), X(p));
                }
        }
        xmlChar *out = NULL;
        int len = 0;
        xmlDocDumpMemory(doc, &out, &len);
        xmlFreeDoc(doc);
        if (!out)
                return nkp_fail(-ENOMEM, "Out of memory formatting the clone's XML.");
        *ret = g_strndup((const char *) out, (gsize) len);
        xmlFree(out);
        return 0;
}

/* The clone's definition with no nkp key in it (plain), for enrolment. */
static int plain_clone_xml(const char *xml, GPtrArray *targets, char **ret)
{
        g_autoptr(NkpDomainEdit) e = NULL;
        int r = nkp_domain_edit_new(xml, strlen(xml), &e);
        if (r < 0)
                return r;
        if ((r = nkp_domain_edit_set_keysafe(e, NULL)) < 0)
                return r;
        r = nkp_domain_edit_set_vtpm_secret(e, NULL);
        if (r < 0 && r != -ENOENT)
                return r;
        for (guint i = 0; i < targets->len; i++)
                if ((r = nkp_domain_edit_set_disk_luks(e, targets->pdata[i], NULL)) < 0)
                        return r;
        nkp_error_clear();
        return nkp_domain_edit_format(e, ret);
}

static const nkp_secret *value_of(GPtrArray *secrets, const char *target)
{
        for (guint i = 0; i < secrets->len; i++) {
                const NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_DISK) == 0 && strcmp(s->object_id, target) == 0)
                        return s->value;
        }
        return NULL;
}

#define CLONE_LUKS_OPTIONS                                                                 \
        "encrypt.format=luks,encrypt.key-secret=snew,encrypt.iter-time=10,"               \
        "encrypt.hash-alg=sha512"

/* `in`'s bytes from `pos` to `end` written at the same offsets of `out`:
 * copy_file_range (the kernel may share extents), read/write where it
 * cannot (another filesystem). */
static int copy_range(int in, int out, off_t pos, off_t end)
{
        bool by_kernel = true;
        while (pos < end) {
                if (by_kernel) {
                        off_t po = pos;
                        ssize_t n = copy_file_range(in, &pos, out, &po, (size_t) (end - pos), 0);
                        if (n > 0)
                                continue;
                        if (n == 0)
                                return -EIO; /* the source shrank under us */
                        if (errno != EXDEV && errno != EOPNOTSUPP && errno != ENOSYS &&
                            errno != EINVAL)
                                return -errno;
                        by_kernel = false;
                }
                char buf[1 << 16];
                ssize_t n = pread(in, buf, MIN(sizeof buf, (size_t) (end - pos)), pos);
                if (n <= 0)
                        return n < 0 ? -errno : -EIO;
                for (ssize_t w = 0; w < n;) {
                        ssize_t k = pwrite(out, buf + w, (size_t) (n - w), pos + w);
                        if (k < 0)
                                return -errno;
                        w += k;
                }
                pos += n;
        }
        return 0;
}

/* --same-keys: `src` copied to the new file `dst` as it is (still LUKS
 * under the same key): a reflink where the filesystem can (FICLONE), else
 * its data extents only, so the holes of a sparse disk stay holes. */
static int copy_file_as_is(const char *src, const char *dst)
{
        int in = open(src, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        int out = in < 0 ? -1
                         : open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        struct stat st;
        int r = (out < 0 || fstat(in, &st) < 0) ? -errno : 0;
        if (r == 0 && ioctl(out, FICLONE, in) < 0) {
                for (off_t pos = 0; r == 0 && pos < st.st_size;) {
                        off_t data = lseek(in, pos, SEEK_DATA);
                        if (data < 0) {
                                r = errno == ENXIO ? 0 : -errno;
                                break; /* ENXIO: only a hole is left */
                        }
                        off_t hole = lseek(in, data, SEEK_HOLE);
                        r = hole < 0 ? -errno : copy_range(in, out, data, hole);
                        pos = hole;
                }
                if (r == 0 && ftruncate(out, st.st_size) < 0)
                        r = -errno;
        }
        if (in >= 0)
                close(in);
        if (out >= 0)
                close(out);
        if (r < 0)
                return nkp_fail(r, "Cannot copy '%s' to '%s' for the clone: %s.", src, dst,
                                g_strerror(-r));
        return 0;
}

/* The copy done: `tmp` gets the original's mode and owner, is synced and
 * renamed to `dst`.  Removes `tmp` on error. */
static int finish_copy(const char *orig, const char *tmp, const char *dst)
{
        int r = 0;
        int fd = open(tmp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        struct stat st;
        if (fd < 0 || stat(orig, &st) < 0 || fchmod(fd, st.st_mode & 07777) < 0 ||
            fchown(fd, st.st_uid, st.st_gid) < 0 || fsync(fd) < 0)
                r = nkp_fail(-errno, "Cannot finish the clone's copy '%s': %s.", dst,
                             g_strerror(errno));
        if (r == 0) {
                nkp_test_crash_point("clone-disk-written");
                if (rename(tmp, dst) < 0)
                        r = nkp_fail(-errno, "Cannot finish the clone's copy '%s': %s.", dst,
                                     g_strerror(errno));
        }
        if (fd >= 0)
                close(fd);
        if (r < 0) {
                (void) nkp_unlink_nofollow(tmp);
                return r;
        }
        (void) nkp_fsync_dir_of(dst);
        nkp_test_crash_point("clone-disk-renamed");
        return 0;
}

/* A single-layer disk for --same-keys: copied as it is, then finished. */
static int copy_disk_as_is(const NkpDiskLayer *top, const char *dst)
{
        g_autofree char *tmp = g_strconcat(dst, ".nkp-new", NULL);
        (void) nkp_unlink_nofollow(tmp); /* a killed run's leftover */
        int r = copy_file_as_is(top->path, tmp);
        if (r < 0) {
                (void) nkp_unlink_nofollow(tmp);
                return r;
        }
        return finish_copy(top->path, tmp, dst);
}

/* One disk: the chain read under the original's key ("sk"), written whole
 * as a LUKS qcow2 `dst`.nkp-new under the clone's ("snew"), compared,
 * fsynced, renamed to `dst`. */
static int copy_disk(GPtrArray *layers, const nkp_secret *old_value, const nkp_secret *new_value,
                     const char *dst)
{
        const NkpDiskLayer *top = layers->pdata[0];
        g_autofree char *tmp = g_strconcat(dst, ".nkp-new", NULL);
        g_autofree char *src = nkp_disk_chain_opts(layers, 0, top->path, top->encrypted);
        g_autofree char *dst_opts =
                g_strdup_printf("driver=qcow2,file.filename=%s,encrypt.key-secret=snew", tmp);
        nkp_secret *secrets[] = { (nkp_secret *) old_value, (nkp_secret *) new_value };
        const char *conv[] = { "qemu-img", "convert", "-q", "--object",
                               "secret,id=sk,file=/dev/fd/3,format=raw", "--object",
                               "secret,id=snew,file=/dev/fd/4,format=raw", "--image-opts", src,
                               "-O", "qcow2", "-o", CLONE_LUKS_OPTIONS, tmp, NULL };
        const NkpToolRun run = { .argv = conv, .secrets = secrets, .n_secrets = 2,
                                 .blob_fd = -1 };
        g_autofree char *err = NULL;
        int r = 0;
        for (int attempt = 0; attempt < 6; attempt++) {
                if (attempt > 0)
                        g_usleep((gulong) (100000 << attempt)); /* QEMU's PBKDF flake, tools.c */
                g_clear_pointer(&err, g_free);
                (void) nkp_unlink_nofollow(tmp);
                r = nkp_tool_run(&run, &err);
                if (r == 0 || !err || !strstr(err, "accurate CPU usage"))
                        break;
        }
        if (r == 0) {
                g_clear_pointer(&err, g_free);
                const char *cmp[] = { "qemu-img", "compare", "-q", "--object",
                                      "secret,id=sk,file=/dev/fd/3,format=raw", "--object",
                                      "secret,id=snew,file=/dev/fd/4,format=raw",
                                      "--image-opts", src, dst_opts, NULL };
                const NkpToolRun crun = { .argv = cmp, .secrets = secrets, .n_secrets = 2,
                                          .blob_fd = -1 };
                r = nkp_tool_run(&crun, &err);
        }
        if (r > 0)
                r = nkp_fail(-EIO, "qemu-img could not copy '%s' for the clone: %s.", top->path,
                             err && err[0] ? err : "the copy differs");
        if (r < 0) {
                (void) nkp_unlink_nofollow(tmp);
                return r;
        }
        return finish_copy(top->path, tmp, dst);
}

/* --same-keys: the original's DEKs, unwrapped with its KEK, wrapped again
 * into the clone's keysafe (bound to the clone's UUID, under the secret
 * UUIDs nkp_enrol_build picked) in place of the new DEKs; `en`'s XML and
 * disk values follow.  The new DEKs are wiped unused. */
static int reuse_original_deks(nkp_context *ctx, const NkpDomain *orig, NkpEnrolment *en)
{
        g_autoptr(NkpDomain) dc = NULL;
        g_autoptr(nkp_secret) old_kek = NULL, new_kek = NULL;
        int r = nkp_domain_parse(en->xml, strlen(en->xml), &dc);
        if (r < 0 || (r = nkp_vm_kek(ctx, orig, &old_kek)) < 0 ||
            (r = nkp_vm_kek(ctx, dc, &new_kek)) < 0)
                return r;
        for (guint i = 0; i < en->disks->len; i++) {
                NkpEnrolDisk *ed = en->disks->pdata[i];
                g_autoptr(nkp_secret) dek = NULL;
                nkp_secret *value = NULL;
                if ((r = nkp_keysafe_get_dek(orig->keysafe, old_kek, NKP_OBJECT_DISK, ed->target,
                                             &dek)) < 0 ||
                    (r = nkp_keysafe_put_dek(dc->keysafe, new_kek, NKP_OBJECT_DISK, ed->target,
                                             ed->secret_uuid, dek)) < 0 ||
                    (r = nkp_secret_value_from_dek(dek, &value)) < 0)
                        return r;
                nkp_secret_free(ed->value);
                ed->value = value;
        }
        g_autofree char *ksxml = NULL, *xml = NULL;
        g_autoptr(NkpDomainEdit) e = NULL;
        if ((r = nkp_keysafe_format(dc->keysafe, &ksxml)) < 0 ||
            (r = nkp_domain_edit_new(en->xml, strlen(en->xml), &e)) < 0 ||
            (r = nkp_domain_edit_set_keysafe(e, ksxml)) < 0 ||
            (r = nkp_domain_edit_format(e, &xml)) < 0)
                return r;
        g_free(en->xml);
        en->xml = g_steal_pointer(&xml);
        return 0;
}

/* ---- the clone's record (crash safety) -------------------------------------------- */

#define RECORD_GROUP "clone"

static int read_uuids(const char *xml, size_t len, char **ret_uuid, char **ret_keysafe_uuid);

/* ROOT/var/lib/nkp/clones/NEW.ini (NEW has no '/': checked first). */
static char *record_path(const nkp_context *ctx, const char *new_name)
{
        g_autofree char *dir = nkp_context_path(ctx, "/var/lib/nkp/clones");
        g_autofree char *base = g_strconcat(new_name, ".ini", NULL);
        return g_build_filename(dir, base, NULL);
}

/* The record a killed clone left at `path`, in *ret (caller frees), or
 * NULL when there is none.  -EBADMSG unreadable, -EPERM not ours/0600. */
static int record_read(const char *path, GKeyFile **ret)
{
        g_autofree char *text = NULL;
        size_t len = 0;
        *ret = NULL;
        int r = nkp_read_file(path, 1 << 16, true, &text, &len);
        if (r == -ENOENT) {
                nkp_error_clear();
                return 0;
        }
        if (r < 0)
                return r;
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autofree char *uuid = NULL;
        if (!g_key_file_load_from_data(kf, text, len, G_KEY_FILE_NONE, NULL) ||
            !(uuid = g_key_file_get_string(kf, RECORD_GROUP, "uuid", NULL)) ||
            !g_key_file_has_key(kf, RECORD_GROUP, "files", NULL))
                return nkp_fail(-EBADMSG, "The record of an interrupted clone '%s' cannot be "
                                          "read; remove the files it names by hand, then the "
                                          "record, and clone again.",
                                path);
        *ret = g_steal_pointer(&kf);
        return 0;
}

/* True when the record lists `path` as a disk the clone makes. */
static bool record_lists(GKeyFile *rec, const char *path)
{
        if (!rec)
                return false;
        g_auto(GStrv) files = g_key_file_get_string_list(rec, RECORD_GROUP, "files", NULL, NULL);
        for (char **f = files; f && *f; f++)
                if (strcmp(*f, path) == 0)
                        return true;
        return false;
}

/* Anything (a dangling symlink too) at `path`. */
static bool present(const char *path)
{
        struct stat st;
        return lstat(path, &st) == 0;
}

/* What a killed clone may have left at `path`: a regular file (never a
 * symlink), and for a disk's final path a LUKS qcow2, as the clone makes. */
static bool clone_made(const char *path, bool final)
{
        struct stat st;
        return lstat(path, &st) == 0 && S_ISREG(st.st_mode) &&
               (!final || nkp_qcow2_is_luks(path) == 1);
}

/* Whether a file at `path` (or `path`.nkp-new) stops the clone: 0 none,
 * or one the record lists that the clone could have made; -EEXIST with
 * the message otherwise. */
static int check_target(GKeyFile *rec, const char *path, const char *target)
{
        g_autofree char *tmp = g_strconcat(path, ".nkp-new", NULL);
        bool listed = record_lists(rec, path);
        const char *found = NULL;
        if (present(path) && !(listed && clone_made(path, true)))
                found = path;
        else if (present(tmp) && !(listed && clone_made(tmp, false)))
                found = tmp;
        if (!found)
                return 0;
        return nkp_fail(-EEXIST, "'%s' exists already; name another file for the clone's disk "
                                 "%s (--file %s=PATH).",
                        found, target, target);
}

/* Removes what the killed clone recorded in `rec` made: each PATH and
 * PATH.nkp-new the record lists, only where clone_made says the clone
 * could have made it (check_target vetted the current targets already). */
static void record_undo(GKeyFile *rec)
{
        g_auto(GStrv) files = g_key_file_get_string_list(rec, RECORD_GROUP, "files", NULL, NULL);
        for (char **f = files; f && *f; f++) {
                g_autofree char *tmp = g_strconcat(*f, ".nkp-new", NULL);
                if (clone_made(tmp, false))
                        (void) nkp_unlink_nofollow(tmp);
                if (clone_made(*f, true))
                        (void) nkp_unlink_nofollow(*f);
                (void) nkp_fsync_dir_of(*f);
        }
}

/* Writes the record before the clone's first file: `src`, the UUID it
 * will define, the disk paths (values of `paths`) it will make. */
static int record_write(const char *path, const char *src, const char *uuid, GHashTable *paths)
{
        g_autofree char *dir = g_path_get_dirname(path);
        int r = nkp_mkdir_private(dir);
        if (r < 0)
                return nkp_fail(r, "Cannot create '%s' for the clone's record: %s.", dir,
                                g_strerror(-r));
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(GPtrArray) list = g_ptr_array_new();
        GHashTableIter it;
        gpointer value;
        g_hash_table_iter_init(&it, paths);
        while (g_hash_table_iter_next(&it, NULL, &value))
                g_ptr_array_add(list, value);
        g_key_file_set_integer(kf, RECORD_GROUP, "version", 1);
        g_key_file_set_string(kf, RECORD_GROUP, "source", src);
        g_key_file_set_string(kf, RECORD_GROUP, "uuid", uuid);
        g_key_file_set_string_list(kf, RECORD_GROUP, "files", (const char *const *) list->pdata,
                                   list->len);
        gsize len = 0;
        g_autofree char *text = g_key_file_to_data(kf, &len, NULL);
        if ((r = nkp_write_file_atomic(path, text, len, 0600, false)) < 0)
                return nkp_fail(r, "Cannot write the clone's record '%s': %s.", path,
                                g_strerror(-r));
        return 0;
}

static void record_remove(const char *path)
{
        (void) nkp_unlink_nofollow(path);
        (void) nkp_fsync_dir_of(path);
}

/* 1 when `xml` (the defined NEW) has the UUID the record names: the
 * killed clone got as far as its define. */
static int record_defined(GKeyFile *rec, const char *xml)
{
        g_autofree char *own = NULL, *ks = NULL;
        g_autofree char *uuid = rec ? g_key_file_get_string(rec, RECORD_GROUP, "uuid", NULL)
                                    : NULL;
        if (!uuid || read_uuids(xml, strlen(xml), &own, &ks) < 0) {
                nkp_error_clear();
                return 0;
        }
        return own && g_ascii_strcasecmp(own, uuid) == 0;
}

/* The clone of `src` (its definition `xml`, `d`, read under its lock) to
 * `new_name`, both locks held: the record, the copies, the define. */
static int clone_locked(nkp_context *ctx, nkp_virt *v, const char *src, const char *new_name,
                        const char *const *files, bool same_keys, const char *xml,
                        const NkpDomain *d)
{
        int r;
        g_autofree char *rec_path = record_path(ctx, new_name);
        g_autoptr(GKeyFile) rec = NULL;
        if ((r = record_read(rec_path, &rec)) < 0)
                return r;
        g_autofree char *other = NULL;
        if (nkp_virt_domain_xml(v, new_name, true, &other) == 0) {
                if (!record_defined(rec, other))
                        return nkp_fail(-EEXIST, "A VM named '%s' exists already.", new_name);
                record_remove(rec_path); /* killed after its define: complete */
                return 0;
        }
        nkp_error_clear();

        g_autoptr(GPtrArray) plain = NULL;
        if ((r = nkp_vm_disk_chain_plain_layers(d, xml, strlen(xml), &plain)) < 0)
                return r;
        if (plain->len > 0) {
                const NkpDiskLayer *l = plain->pdata[0];
                return nkp_fail(-EPERM, "VM '%s': its disk %s has a plain layer '%s'; encrypt "
                                        "it first (nkpctl vm encrypt-layer '%s' '%s').",
                                src, l->target, l->path, src, l->path);
        }
        g_autoptr(GPtrArray) secrets = NULL;
        if ((r = nkp_vm_unlock(ctx, d, true, &secrets)) < 0)
                return r;

        /* The disks with keys, their chains and their clone paths. */
        g_autoptr(GPtrArray) targets = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) chains = g_ptr_array_new_with_free_func(
                (GDestroyNotify) g_ptr_array_unref);
        g_autoptr(GHashTable) paths = g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                                            g_free);
        for (size_t i = 0; i < nkp_keysafe_n_entries(d->keysafe); i++) {
                if (strcmp(nkp_keysafe_entry_kind(d->keysafe, i), NKP_OBJECT_DISK) != 0)
                        continue;
                const char *t = nkp_keysafe_entry_id(d->keysafe, i);
                GPtrArray *layers = NULL;
                if ((r = nkp_domain_disk_layers(xml, strlen(xml), t, &layers)) < 0)
                        return r;
                if (layers->len == 0) {
                        g_ptr_array_unref(layers);
                        continue; /* a key for a detached disk */
                }
                char *p = NULL;
                if ((r = clone_path(files, t, ((NkpDiskLayer *) layers->pdata[0])->path,
                                    new_name, &p)) < 0) {
                        g_ptr_array_unref(layers);
                        return r;
                }
                if ((r = check_target(rec, p, t)) < 0) {
                        g_free(p);
                        g_ptr_array_unref(layers);
                        return r;
                }
                g_ptr_array_add(targets, g_strdup(t));
                g_ptr_array_add(chains, layers);
                g_hash_table_insert(paths, g_strdup(t), p);
        }

        char new_uuid[NKP_UUID_STRING_LEN + 1];
        nkp_uuid_random(new_uuid);
        g_autofree char *cxml = NULL, *pxml = NULL;
        if ((r = clone_xml(xml, new_name, new_uuid, paths, &cxml)) < 0)
                return r;
        if ((r = plain_clone_xml(cxml, targets, &pxml)) < 0)
                return r;
        g_autoptr(NkpDomain) dn = NULL;
        if ((r = nkp_domain_parse(pxml, strlen(pxml), &dn)) < 0)
                return r;
        g_autoptr(nkp_provider) p = NULL;
        if ((r = nkp_provider_pick(ctx, nkp_keysafe_provider_name(d->keysafe), &p)) < 0)
                return r;
        g_autoptr(NkpEnrolment) en = NULL;
        if ((r = nkp_enrol_build(ctx, dn, pxml, p, dn->has_vtpm, targets, &en)) < 0)
                return r;
        if (same_keys && (r = reuse_original_deks(ctx, d, en)) < 0)
                return r;

        if (rec)
                record_undo(rec);
        if ((r = record_write(rec_path, src, new_uuid, paths)) < 0)
                return r;
        nkp_test_crash_point("clone-recorded");

        guint done = 0;
        for (; done < targets->len; done++) {
                const char *t = targets->pdata[done];
                const nkp_secret *nv = NULL;
                for (guint k = 0; k < en->disks->len; k++) {
                        const NkpEnrolDisk *ed = en->disks->pdata[k];
                        if (strcmp(ed->target, t) == 0)
                                nv = ed->value;
                }
                const nkp_secret *ov = value_of(secrets, t);
                if (!nv || !ov) {
                        r = nkp_fail(-ENOENT, "VM '%s': no key for disk %s.", src, t);
                        break;
                }
                GPtrArray *layers = chains->pdata[done];
                const char *dst = g_hash_table_lookup(paths, t);
                if (same_keys && layers->len == 1)
                        r = copy_disk_as_is(layers->pdata[0], dst);
                else
                        r = copy_disk(layers, ov, nv, dst);
                if (r < 0)
                        break;
        }
        if (r == 0)
                r = nkp_virt_domain_define(v, en->xml);
        if (r < 0) {
                for (guint i = 0; i < done; i++)
                        (void) nkp_unlink_nofollow(g_hash_table_lookup(paths, targets->pdata[i]));
                record_remove(rec_path);
                return r;
        }
        nkp_test_crash_point("clone-defined");
        record_remove(rec_path);
        return 0;
}

static int running_refusal(nkp_virt *v, const char *src)
{
        int r = nkp_virt_domain_is_active(v, src);
        return r <= 0 ? r
                      : nkp_fail(-EBUSY, "VM '%s' is running; shut it off first (its disks "
                                         "change while it runs), then clone it.",
                                 src);
}

/* One clone to `new_name` at a time: flock on ROOT/var/lib/nkp/clones/
 * NEW.lock, never waiting (a clone copies whole disks for minutes). */
static int lock_new_name(nkp_context *ctx, const char *new_name, int *ret_fd)
{
        g_autofree char *dir = nkp_context_path(ctx, "/var/lib/nkp/clones");
        int r = nkp_mkdir_private(dir);
        if (r < 0)
                return nkp_fail(r, "Cannot create '%s' for the clone's record: %s.", dir,
                                g_strerror(-r));
        g_autofree char *base = g_strconcat(new_name, ".lock", NULL);
        g_autofree char *path = g_build_filename(dir, base, NULL);
        r = nkp_lock_file(path, true, ret_fd);
        if (r == -EBUSY)
                return nkp_fail(r, "Another nkpctl vm clone to '%s' is running; wait for it "
                                   "to finish. Nothing was changed.",
                                new_name);
        return r;
}

/* The clone runs with two locks: the one of NEW's name (two clones to the
 * same NEW would remove each other's files on their reruns) and the
 * source VM's (a start, rekey or snapshot of the source must not change
 * the files being read; an interrupted conversion of the source is
 * finished or rolled back first, like every command that reads its keys). */
int nkp_vm_clone(nkp_context *ctx, nkp_virt *v, const char *src, const char *new_name,
                 const char *const *files, unsigned flags)
{
        if (flags & ~NKP_VM_CLONE_SAME_KEYS)
                return nkp_fail(-EINVAL, "Unknown clone flags 0x%x.", flags);
        if (!new_name || !new_name[0] || strchr(new_name, '/'))
                return nkp_fail(-EINVAL, "'%s' is not a name for the clone.",
                                new_name ? new_name : "");
        g_autoptr(NkpDomain) d0 = NULL;
        int r = nkp_vm_definition(v, src, NULL, &d0);
        if (r < 0)
                return r;
        if (!d0->keysafe)
                return nkp_fail(-EINVAL, "VM '%s' is not encrypted by nkp: clone it with "
                                         "virt-clone.",
                                src);
        if ((r = running_refusal(v, src)) < 0)
                return r;
        int new_lock = -1, lock = -1;
        if ((r = lock_new_name(ctx, new_name, &new_lock)) < 0)
                return r;
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        r = nkp_vm_lock_recovered(ctx, v, d0, "clone", &lock, NULL, &xml, &d);
        if (r == 0) {
                if ((r = running_refusal(v, src)) == 0 && !d->keysafe)
                        r = nkp_fail(-EINVAL, "VM '%s' is not encrypted by nkp any more.", src);
                if (r == 0)
                        r = clone_locked(ctx, v, src, new_name, files,
                                         flags & NKP_VM_CLONE_SAME_KEYS, xml, d);
                nkp_journal_unlock(lock);
        }
        nkp_journal_unlock(new_lock);
        return r;
}

/* ---- definitions copied with another VM's keysafe ---------------------------------- */
/* virt-clone --preserve-data / --skip-copy, or a `virsh dumpxml` edited by
 * hand, define a new UUID that carries the original's keysafe, bound to
 * the original's UUID (and its secret UUIDs).  Such a definition can never
 * unlock (the keysafe's AAD names the UUID), and it must not: it would
 * share the original's keys.  Read here with libxml2 alone, because
 * nkp_domain_parse refuses it. */

/* The UUID the <keysafe><vm uuid=…/> of `root`'s <metadata> names, or NULL. */
static char *keysafe_vm_uuid(xmlNodePtr root)
{
        xmlNodePtr md = nkp_xml_child(root, "metadata");
        for (xmlNodePtr n = md ? md->children : NULL; n; n = n->next) {
                if (n->type != XML_ELEMENT_NODE || !n->ns || !n->ns->href ||
                    !xmlStrEqual(n->ns->href, X(NKP_KEYSAFE_NS)))
                        continue;
                for (xmlNodePtr vm = n->children; vm; vm = vm->next) {
                        if (vm->type != XML_ELEMENT_NODE || !xmlStrEqual(vm->name, X("vm")))
                                continue;
                        xmlChar *u = xmlGetProp(vm, X("uuid"));
                        char *ret = u ? g_ascii_strdown((const char *) u, -1) : NULL;
                        xmlFree(u);
                        return ret;
                }
        }
        return NULL;
}

/* The domain's own <uuid> and its keysafe's VM UUID (NULL when none),
 * lower case.  -EBADMSG not a readable domain XML. */
static void drop_generic_error(void *ctx, const char *msg, ...)
{
        (void) ctx;
        (void) msg;
}

static int read_uuids(const char *xml, size_t len, char **ret_uuid, char **ret_keysafe_uuid)
{
        /* Quiet, as domain.c's parser: the hook's stderr holds one line. */
        xmlGenericErrorFunc old_func = xmlGenericError;
        void *old_ctx = xmlGenericErrorContext;
        xmlSetGenericErrorFunc(NULL, drop_generic_error);
        xmlDocPtr doc = xmlReadMemory(xml, (int) MIN(len, (size_t) INT_MAX), "domain.xml", NULL,
                                      XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
        xmlSetGenericErrorFunc(old_ctx, old_func);
        xmlNodePtr root = doc ? xmlDocGetRootElement(doc) : NULL;
        if (!root || doc->intSubset || !xmlStrEqual(root->name, X("domain"))) {
                xmlFreeDoc(doc);
                return nkp_fail(-EBADMSG, "Not a domain XML.");
        }
        xmlChar *u = xmlNodeGetContent(nkp_xml_child(root, "uuid"));
        *ret_uuid = u ? g_ascii_strdown(g_strstrip((char *) u), -1) : NULL;
        xmlFree(u);
        *ret_keysafe_uuid = keysafe_vm_uuid(root);
        xmlFreeDoc(doc);
        return 0;
}

int nkp_domain_foreign_keysafe(const char *xml, size_t len, char **ret_keysafe_uuid)
{
        g_autofree char *own = NULL, *ks = NULL;
        if (!nkp_domain_mentions_nkp(xml, len))
                return 0;
        if (read_uuids(xml, len, &own, &ks) < 0) {
                nkp_error_clear();
                return 0; /* not this check's business */
        }
        uint8_t a[16], b[16];
        if (!own || !ks || nkp_uuid_parse(own, a) < 0 || nkp_uuid_parse(ks, b) < 0 ||
            memcmp(a, b, sizeof a) == 0)
                return 0;
        *ret_keysafe_uuid = g_steal_pointer(&ks);
        return 1;
}

/* The name of the defined VM whose UUID is `uuid`, or NULL. */
static char *vm_named_by_uuid(NkpVirt *v, const char *uuid)
{
        g_autoptr(GPtrArray) names = NULL;
        if (nkp_virt_domain_list(v, &names) < 0) {
                nkp_error_clear();
                return NULL;
        }
        for (guint i = 0; i < names->len; i++) {
                g_autofree char *xml = NULL, *own = NULL, *ks = NULL;
                if (nkp_virt_domain_xml(v, names->pdata[i], true, &xml) < 0 ||
                    read_uuids(xml, strlen(xml), &own, &ks) < 0) {
                        nkp_error_clear();
                        continue;
                }
                if (own && g_ascii_strcasecmp(own, uuid) == 0)
                        return g_strdup(names->pdata[i]);
        }
        return NULL;
}

/* The vm-foreign-keysafe alarm of `name` goes (the copy was undefined or
 * no longer carries another VM's keysafe). */
static void clear_foreign_alarm(nkp_context *ctx, const char *name)
{
        if (nkp_alarm_open(ctx, "vm-foreign-keysafe", name, NULL))
                (void) nkp_alarm_clear(ctx, "vm-foreign-keysafe", name);
        nkp_error_clear();
}

int nkp_vm_watch_foreign_keysafe(nkp_context *ctx, NkpVirt *v, const char *name,
                                 char **ret_note)
{
        g_autofree char *xml = NULL, *ks_uuid = NULL;
        int r = nkp_virt_domain_xml(v, name, true, &xml);
        if (r == -ENOENT) {
                nkp_error_clear();
                clear_foreign_alarm(ctx, name);
                return 1; /* gone: nothing to enrol either */
        }
        if (r < 0)
                return r;
        if (!nkp_domain_foreign_keysafe(xml, strlen(xml), &ks_uuid)) {
                clear_foreign_alarm(ctx, name);
                return 0;
        }
        g_autofree char *src = vm_named_by_uuid(v, ks_uuid);
        g_autofree char *msg = g_strdup_printf(
                "VM '%s' carries the nkp keysafe of %s%s%s (UUID %s): a copied definition "
                "(virt-clone --preserve-data or --skip-copy, or by hand) cannot use another "
                "VM's keys, so its start is refused; undefine it (virsh undefine '%s') and "
                "clone with nkpctl vm clone '%s' '%s'",
                name, src ? "VM '" : "another VM", src ? src : "", src ? "'" : "", ks_uuid,
                name, src ? src : "SOURCE", name);
        if (!nkp_alarm_open(ctx, "vm-foreign-keysafe", name, msg)) {
                if (nkp_alarm_raise(ctx, "vm-foreign-keysafe", name, msg) < 0)
                        nkp_log(NKP_LOG_WARNING, "%s", nkp_error_message());
                else if (ret_note)
                        *ret_note = g_strdup_printf("%s: alarm vm-foreign-keysafe", msg);
        }
        nkp_error_clear();
        return 1;
}

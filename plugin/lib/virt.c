/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libvirt glue: ephemeral private secrets and domain definitions.
 *
 * The secrets nkp defines are always ephemeral='yes' (never written to
 * /etc/libvirt/secrets) and private='yes' (the value cannot be read back
 * through the API).  Their value is hex(DEK): see nkp-private.h.
 *
 * Bounding: libvirt has no per-call timeout.  A connection opened with a
 * deadline arms a process alarm (SIGALRM) around each libvirt call made
 * through it; when it fires the process prints one line and exits 1 (see
 * nkp_virt_open in nkp.h).  Nested calls keep the outermost arming. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libvirt/libvirt.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libvirt/virterror.h>

#include "dl-libvirt.h" /* libvirt is loaded by nkp_virt_open(), not at start */
#include "nkp-private.h"

struct nkp_virt {
        virConnectPtr conn;
        unsigned deadline; /* seconds, 0 = unbounded */
};

/* ---- the call deadline ------------------------------------------------------ */

/* Written before the alarm is armed, read by the handler (async-signal-safe
 * write of a preformatted line). */
static char deadline_line[256];
static size_t deadline_line_len;
static int deadline_depth;

static void on_deadline(int sig)
{
        (void) sig;
        ssize_t w = write(STDERR_FILENO, deadline_line, deadline_line_len);
        (void) w;
        _exit(1);
}

static void deadline_arm(unsigned seconds)
{
        if (deadline_depth++ > 0)
                return;
        const char *prg = g_get_prgname();
        int n = snprintf(deadline_line, sizeof deadline_line,
                         "%s: libvirt did not answer within %u seconds; is libvirtd running and "
                         "responsive? Run the command again once it is: nkp never leaves a VM "
                         "unable to start.\n",
                         prg ? prg : "nkp", seconds);
        deadline_line_len = n < 0 ? 0 : MIN((size_t) n, sizeof deadline_line - 1);
        struct sigaction sa = { .sa_handler = on_deadline };
        sigemptyset(&sa.sa_mask);
        sigaction(SIGALRM, &sa, NULL);
        alarm(seconds);
}

typedef struct {
        bool armed;
} VirtCall;

static VirtCall virt_call_begin(unsigned seconds)
{
        if (seconds == 0)
                return (VirtCall) { false };
        deadline_arm(seconds);
        return (VirtCall) { true };
}

static void virt_call_end(VirtCall *c)
{
        if (c->armed && --deadline_depth == 0)
                alarm(0);
}

/* Bounds the rest of the enclosing function by the connection's deadline. */
#define BOUNDED(v) __attribute__((cleanup(virt_call_end))) G_GNUC_UNUSED VirtCall virt_call_ = \
        virt_call_begin((v)->deadline)

static void silent_error(void *userdata, virErrorPtr err)
{
        (void) userdata;
        (void) err;
}

static const char *last_virt_error(void)
{
        virErrorPtr e = virGetLastError();
        return e && e->message ? e->message : "unknown libvirt error";
}

static int virt_errno(void)
{
        virErrorPtr e = virGetLastError();
        if (!e)
                return -EIO;
        switch (e->code) {
        case VIR_ERR_NO_SECRET:
        case VIR_ERR_NO_DOMAIN:
                return -ENOENT;
        case VIR_ERR_NO_SUPPORT:
                return -EOPNOTSUPP;
        case VIR_ERR_NO_CONNECT:
        case VIR_ERR_SYSTEM_ERROR:
        case VIR_ERR_RPC:
                return -ECONNREFUSED;
        case VIR_ERR_OPERATION_INVALID:
                return -EBUSY;
        default:
                return -EIO;
        }
}

int nkp_secret_value_from_dek(const nkp_secret *dek, nkp_secret **ret)
{
        if (!dek || nkp_secret_len(dek) != NKP_DEK_SIZE)
                return nkp_fail(-EINVAL, "A DEK must be %d bytes.", NKP_DEK_SIZE);
        nkp_secret *v = NULL;
        int r = nkp_secret_new(NKP_SECRET_VALUE_LEN + 1, &v);
        if (r < 0)
                return r;
        nkp_hex_encode(nkp_secret_data(dek), NKP_DEK_SIZE, (char *) nkp_secret_data_mut(v));
        /* Now shrink: copy the 64 text bytes into an exact-size secret. */
        nkp_secret *exact = NULL;
        r = nkp_secret_new_copy(nkp_secret_data(v), NKP_SECRET_VALUE_LEN, &exact);
        nkp_secret_free(v);
        if (r < 0)
                return r;
        *ret = exact;
        return 0;
}

int nkp_virt_open(const char *uri, unsigned deadline_seconds, nkp_virt **ret)
{
        int r = nkp_dlopen_libvirt();
        if (r < 0)
                return r;
        virSetErrorFunc(NULL, silent_error);
        G_GNUC_UNUSED VirtCall c __attribute__((cleanup(virt_call_end))) =
                virt_call_begin(deadline_seconds);
        virConnectPtr conn = virConnectOpen(uri);
        if (!conn) {
                int err = virt_errno();
                return nkp_fail(err == -EIO ? -ECONNREFUSED : err,
                                "Cannot connect to libvirt at '%s': %s. Is libvirtd running?",
                                uri ? uri : "(default)", last_virt_error());
        }
        nkp_virt *v = g_new0(nkp_virt, 1);
        v->conn = conn;
        v->deadline = deadline_seconds;
        *ret = v;
        return 0;
}

void nkp_virt_close(nkp_virt *v)
{
        if (!v)
                return;
        if (v->conn) {
                BOUNDED(v);
                virConnectClose(v->conn);
        }
        g_free(v);
}

static bool uuid_ok(const char *s)
{
        uint8_t b[16];
        return s && nkp_uuid_parse(s, b) == 0;
}

/* Whether the root element of a secret's XML says `attr`='yes'. */
static bool secret_attr_yes(xmlNode *root, const char *attr)
{
        xmlChar *val = xmlGetProp(root, (const xmlChar *) attr);
        bool yes = val && strcmp((const char *) val, "yes") == 0;
        xmlFree(val);
        return yes;
}

bool nkp_virt_secret_xml_reusable(const char *xml)
{
        if (!xml)
                return false;
        xmlDoc *doc = xmlReadMemory(xml, (int) strlen(xml), NULL, "UTF-8",
                                    XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
        xmlNode *root = doc ? xmlDocGetRootElement(doc) : NULL;
        bool ok = root && !doc->intSubset && strcmp((const char *) root->name, "secret") == 0 &&
                  secret_attr_yes(root, "ephemeral") && secret_attr_yes(root, "private");
        xmlFreeDoc(doc);
        return ok;
}

/* A secret with nkp's UUID that someone else defined persistent (its value
 * written to libvirt's disk) or readable (virsh secret-get-value) would
 * receive a DEK where it must never be: reused only when it is ephemeral
 * and private, as nkp defines them. */
static int check_existing_secret(virSecretPtr sec, const char *secret_uuid)
{
        char *xml = virSecretGetXMLDesc(sec, 0);
        if (!xml)
                return nkp_fail(virt_errno(), "Cannot read the libvirt secret '%s': %s.",
                                secret_uuid, last_virt_error());
        bool ok = nkp_virt_secret_xml_reusable(xml);
        free(xml);
        if (!ok)
                return nkp_fail(-EEXIST,
                                "libvirt already holds a secret with nkp's UUID %s that is not "
                                "ephemeral and private, so nkp will not put a key in it; nothing "
                                "was changed. Check who defined it (virsh secret-dumpxml %s), "
                                "then remove it (virsh secret-undefine %s).",
                                secret_uuid, secret_uuid, secret_uuid);
        return 0;
}

int nkp_virt_secret_define(nkp_virt *v, const char *secret_uuid, const char *kind,
                           const char *vm_uuid, const char *volume, const nkp_secret *value)
{
        BOUNDED(v);
        if (!uuid_ok(secret_uuid) || !kind)
                return nkp_fail(-EINVAL, "The secret UUID '%s' is not a valid UUID.",
                                secret_uuid ? secret_uuid : "");
        g_autofree char *usage = NULL;
        if (strcmp(kind, NKP_OBJECT_VTPM) == 0) {
                if (!uuid_ok(vm_uuid))
                        return nkp_fail(-EINVAL, "A vTPM secret needs the VM UUID.");
                usage = g_strdup_printf("<usage type='vtpm'><name>nkp-vtpm-%s</name></usage>",
                                        vm_uuid);
        } else if (strcmp(kind, NKP_OBJECT_DISK) == 0) {
                if (!volume || volume[0] != '/')
                        return nkp_fail(-EINVAL, "A disk secret needs the absolute disk path.");
                g_autofree char *esc = g_markup_escape_text(volume, -1);
                usage = g_strdup_printf("<usage type='volume'><volume>%s</volume></usage>", esc);
        } else {
                return nkp_fail(-EINVAL, "Unknown protected object kind '%s'.", kind);
        }
        g_autofree char *xml = g_strdup_printf(
                "<secret ephemeral='yes' private='yes'>"
                "<description>nkp: DEK of a protected VM object (ephemeral)</description>"
                "<uuid>%s</uuid>%s</secret>",
                secret_uuid, usage);

        virSecretPtr sec = virSecretLookupByUUIDString(v->conn, secret_uuid);
        if (sec) {
                int r = check_existing_secret(sec, secret_uuid);
                if (r < 0) {
                        virSecretFree(sec);
                        return r;
                }
        } else {
                sec = virSecretDefineXML(v->conn, xml, 0);
                if (!sec)
                        return nkp_fail(virt_errno(), "Cannot define the libvirt secret '%s': %s.",
                                        secret_uuid, last_virt_error());
        }
        int r = virSecretSetValue(sec, nkp_secret_data(value), nkp_secret_len(value), 0);
        if (r < 0) {
                int err = virt_errno();
                r = nkp_fail(err, "Cannot set the value of the libvirt secret '%s': %s.",
                             secret_uuid, last_virt_error());
                virSecretUndefine(sec);
        }
        virSecretFree(sec);
        return r < 0 ? r : 0;
}

int nkp_virt_secret_undefine(nkp_virt *v, const char *secret_uuid)
{
        BOUNDED(v);
        virSecretPtr sec = virSecretLookupByUUIDString(v->conn, secret_uuid);
        if (!sec)
                return nkp_fail(virt_errno(), "No libvirt secret '%s': %s.", secret_uuid,
                                last_virt_error());
        int r = virSecretUndefine(sec);
        int err = r < 0 ? virt_errno() : 0;
        if (r < 0)
                nkp_fail(err, "Cannot undefine the libvirt secret '%s': %s.", secret_uuid,
                         last_virt_error());
        virSecretFree(sec);
        return r < 0 ? err : 0;
}

bool nkp_virt_secret_exists(nkp_virt *v, const char *secret_uuid)
{
        BOUNDED(v);
        virSecretPtr sec = virSecretLookupByUUIDString(v->conn, secret_uuid);
        if (!sec)
                return false;
        virSecretFree(sec);
        return true;
}

int nkp_virt_domain_xml(nkp_virt *v, const char *name, bool inactive, char **ret)
{
        BOUNDED(v);
        virDomainPtr dom = virDomainLookupByName(v->conn, name);
        if (!dom)
                return nkp_fail(virt_errno(), "No libvirt domain '%s': %s.", name,
                                last_virt_error());
        unsigned flags = VIR_DOMAIN_XML_SECURE | (inactive ? VIR_DOMAIN_XML_INACTIVE : 0);
        char *xml = virDomainGetXMLDesc(dom, flags);
        int err = xml ? 0 : virt_errno();
        if (!xml)
                nkp_fail(err, "Cannot read the XML of domain '%s': %s.", name, last_virt_error());
        virDomainFree(dom);
        if (!xml)
                return err;
        *ret = g_strdup(xml);
        free(xml);
        return 0;
}

int nkp_virt_domain_define(nkp_virt *v, const char *xml)
{
        BOUNDED(v);
        virDomainPtr dom = virDomainDefineXML(v->conn, xml);
        if (!dom)
                return nkp_fail(virt_errno(), "libvirt refused the new domain definition: %s.",
                                last_virt_error());
        virDomainFree(dom);
        return 0;
}

int nkp_virt_domain_create(nkp_virt *v, const char *xml, bool transient)
{
        BOUNDED(v);
        virDomainPtr dom = transient ? virDomainCreateXML(v->conn, xml, 0)
                                     : virDomainDefineXML(v->conn, xml);
        if (!dom)
                return nkp_fail(virt_errno(), "libvirt refused the new domain: %s.",
                                last_virt_error());
        int r = 0;
        if (!transient && virDomainCreate(dom) < 0)
                r = nkp_fail(virt_errno(), "The domain is defined, but libvirt could not start "
                                           "it: %s.",
                             last_virt_error());
        virDomainFree(dom);
        return r;
}

static gint cmp_str(gconstpointer a, gconstpointer b)
{
        return strcmp(*(char *const *) a, *(char *const *) b);
}

int nkp_virt_domain_list(nkp_virt *v, GPtrArray **ret_names)
{
        BOUNDED(v);
        virDomainPtr *doms = NULL;
        int n = virConnectListAllDomains(v->conn, &doms, VIR_CONNECT_LIST_DOMAINS_PERSISTENT);
        if (n < 0)
                return nkp_fail(virt_errno(), "Cannot list the libvirt domains: %s.",
                                last_virt_error());
        GPtrArray *names = g_ptr_array_new_with_free_func(g_free);
        for (int i = 0; i < n; i++) {
                const char *name = virDomainGetName(doms[i]);
                if (name)
                        g_ptr_array_add(names, g_strdup(name));
                virDomainFree(doms[i]);
        }
        free(doms);
        g_ptr_array_sort(names, cmp_str);
        *ret_names = names;
        return 0;
}

int nkp_virt_domain_is_active(nkp_virt *v, const char *name)
{
        BOUNDED(v);
        virDomainPtr dom = virDomainLookupByName(v->conn, name);
        if (!dom)
                return nkp_fail(virt_errno(), "No libvirt domain '%s': %s.", name,
                                last_virt_error());
        int r = virDomainIsActive(dom);
        int err = r < 0 ? virt_errno() : 0;
        if (r < 0)
                nkp_fail(err, "Cannot ask libvirt whether '%s' runs: %s.", name,
                         last_virt_error());
        virDomainFree(dom);
        return r < 0 ? err : r;
}

int nkp_virt_domain_has_managed_save(nkp_virt *v, const char *name)
{
        BOUNDED(v);
        virDomainPtr dom = virDomainLookupByName(v->conn, name);
        if (!dom)
                return nkp_fail(virt_errno(), "No libvirt domain '%s': %s.", name,
                                last_virt_error());
        int r = virDomainHasManagedSaveImage(dom, 0);
        int err = r < 0 ? virt_errno() : 0;
        if (r < 0)
                nkp_fail(err, "Cannot ask libvirt whether '%s' has a saved state: %s.", name,
                         last_virt_error());
        virDomainFree(dom);
        return r < 0 ? err : r;
}

int nkp_virt_managed_save_xml(nkp_virt *v, const char *name, char **ret)
{
        BOUNDED(v);
        virDomainPtr dom = virDomainLookupByName(v->conn, name);
        if (!dom)
                return nkp_fail(virt_errno(), "No libvirt domain '%s': %s.", name,
                                last_virt_error());
        int r = virDomainHasManagedSaveImage(dom, 0);
        char *xml = r > 0 ? virDomainManagedSaveGetXMLDesc(dom, VIR_DOMAIN_XML_SECURE) : NULL;
        int err = r < 0 || (r > 0 && !xml) ? virt_errno() : 0;
        if (err)
                nkp_fail(err, "Cannot read the saved state of '%s': %s.", name, last_virt_error());
        virDomainFree(dom);
        if (err)
                return err;
        *ret = xml ? g_strdup(xml) : NULL;
        free(xml);
        return 0;
}

/* ---- unlocking a VM --------------------------------------------------------- */

void nkp_vm_secret_free(gpointer p)
{
        NkpVmSecret *s = p;
        if (!s)
                return;
        g_free(s->kind);
        g_free(s->object_id);
        g_free(s->secret_uuid);
        g_free(s->volume);
        nkp_secret_free(s->value);
        g_free(s);
}

int nkp_vm_kek(nkp_context *ctx, const NkpDomain *d, nkp_secret **ret)
{
        const nkp_keysafe *ks = d->keysafe;
        if (!ks)
                return nkp_fail(-EINVAL, "VM '%s' is not protected by nkp.", d->name);
        const char *pname = nkp_keysafe_provider_name(ks);
        const char *key_id = nkp_keysafe_provider_key_id(ks);
        const char *want_fp = nkp_keysafe_provider_fingerprint(ks);
        if (!pname || !key_id || !want_fp)
                return nkp_fail(-EBADMSG, "The nkp keysafe of VM '%s' names no provider.",
                                d->name);

        g_autoptr(nkp_secret) kdk = NULL;
        int r = nkp_provider_get_kdk(ctx, key_id, &kdk);
        if (r == -ENOENT)
                return nkp_fail(-ENOKEY, "The key provider '%s' (key id %s) of VM '%s' is not on "
                                         "this host.",
                                pname, key_id, d->name);
        if (r < 0)
                return r;
        g_autofree char *fp = NULL;
        r = nkp_kdk_fingerprint(kdk, &fp);
        if (r < 0)
                return r;
        if (g_ascii_strcasecmp(fp, want_fp) != 0)
                return nkp_fail(-EKEYREJECTED,
                                "The provider with key id %s on this host holds a different key "
                                "than '%s' that protects VM '%s' (fingerprint mismatch).",
                                key_id, pname, d->name);
        return nkp_kek_derive(kdk, nkp_keysafe_kek_salt(ks), key_id, d->uuid, ret);
}

int nkp_vm_unlock(nkp_context *ctx, const NkpDomain *d, bool want_values, GPtrArray **ret)
{
        g_autoptr(nkp_secret) kek = NULL;
        int r = nkp_vm_kek(ctx, d, &kek);
        const nkp_keysafe *ks = d->keysafe;
        const char *pname = ks ? nkp_keysafe_provider_name(ks) : NULL;
        const char *key_id = ks ? nkp_keysafe_provider_key_id(ks) : NULL;
        if (r == -ENOKEY)
                return nkp_fail(-ENOKEY,
                                "VM '%s' is locked: its key provider '%s' (key id %s) is not on "
                                "this host. Restore it: nkpctl provider restore FILE.p12, then: "
                                "nkpctl host unlock",
                                d->name, pname, key_id);
        if (r == -EKEYREJECTED)
                return nkp_fail(-EKEYREJECTED,
                                "VM '%s' is locked: the provider with key id %s on this host holds "
                                "a different key than '%s' that protects the VM (fingerprint "
                                "mismatch). Restore the provider's own backup: nkpctl provider "
                                "restore FILE.p12, then: nkpctl host unlock",
                                d->name, key_id, pname);
        if (r == -EHOSTUNREACH) {
                /* a network-bound provider whose Tang servers do not answer
                 * (tang.c's line names them and the fix): locked, as when
                 * the provider is missing, so the hook raises vm-locked */
                g_autofree char *why = g_strdup(nkp_error_message());
                return nkp_fail(-ENOKEY, "VM '%s' is locked: %s", d->name, why);
        }
        if (r < 0 && ks && pname && key_id)
                return nkp_fail_prefix(r, "VM '%s' cannot be unlocked: the key of provider '%s' "
                                          "(key id %s) is unavailable",
                                       d->name, pname, key_id);
        if (r < 0)
                return r;

        g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(nkp_vm_secret_free);
        for (size_t i = 0; i < nkp_keysafe_n_entries(ks); i++) {
                const char *kind = nkp_keysafe_entry_kind(ks, i);
                const char *id = nkp_keysafe_entry_id(ks, i);
                NkpVmSecret *s = g_new0(NkpVmSecret, 1);
                s->kind = g_strdup(kind);
                s->object_id = g_strdup(id);
                s->secret_uuid = g_strdup(nkp_keysafe_entry_secret_uuid(ks, i));
                g_ptr_array_add(out, s);
                if (strcmp(kind, NKP_OBJECT_DISK) == 0) {
                        const NkpDomainDisk *disk = nkp_domain_find_disk(d, id);
                        s->volume = g_strdup(disk ? disk->source_file : NULL);
                }
                /* Unwrap even when not asked for values: proves the keysafe opens. */
                g_autoptr(nkp_secret) dek = NULL;
                r = nkp_keysafe_get_dek(ks, kek, kind, id, &dek);
                if (r < 0)
                        return nkp_fail_prefix(r, "VM '%s': the %s key '%s' does not unwrap",
                                               d->name, kind, id);
                if (want_values) {
                        r = nkp_secret_value_from_dek(dek, &s->value);
                        if (r < 0)
                                return r;
                }
        }
        if (ret)
                *ret = g_steal_pointer(&out);
        return 0;
}

/* ---- the keysafe in the domain metadata ------------------------------------- */

int nkp_virt_keysafe_get(nkp_virt *v, const char *name, bool live, char **ret)
{
        BOUNDED(v);
        virDomainPtr dom = virDomainLookupByName(v->conn, name);
        if (!dom)
                return nkp_fail(virt_errno(), "No libvirt domain '%s': %s.", name,
                                last_virt_error());
        char *xml = virDomainGetMetadata(dom, VIR_DOMAIN_METADATA_ELEMENT, NKP_KEYSAFE_NS,
                                         live ? VIR_DOMAIN_AFFECT_LIVE : VIR_DOMAIN_AFFECT_CONFIG);
        int r = 0;
        if (!xml) {
                virErrorPtr e = virGetLastError();
                if (e && e->code == VIR_ERR_NO_DOMAIN_METADATA)
                        *ret = NULL;
                else
                        r = nkp_fail(virt_errno(), "Cannot read the metadata of '%s': %s.", name,
                                     last_virt_error());
        } else {
                *ret = g_strdup(xml);
                free(xml);
        }
        virDomainFree(dom);
        return r;
}

int nkp_virt_keysafe_set(nkp_virt *v, const char *name, const char *keysafe_xml)
{
        BOUNDED(v);
        virDomainPtr dom = virDomainLookupByName(v->conn, name);
        if (!dom)
                return nkp_fail(virt_errno(), "No libvirt domain '%s': %s.", name,
                                last_virt_error());
        int active = virDomainIsActive(dom);
        unsigned flags = VIR_DOMAIN_AFFECT_CONFIG | (active > 0 ? VIR_DOMAIN_AFFECT_LIVE : 0);
        int r = virDomainSetMetadata(dom, VIR_DOMAIN_METADATA_ELEMENT, keysafe_xml,
                                     keysafe_xml ? "nkp" : NULL, NKP_KEYSAFE_NS, flags);
        if (r < 0)
                r = nkp_fail(virt_errno(), "Cannot write the nkp keysafe into the metadata of "
                                           "'%s': %s.",
                             name, last_virt_error());
        virDomainFree(dom);
        return r < 0 ? r : 0;
}

int nkp_virt_keysafe_put(nkp_virt *v, const char *name, const char *keysafe_xml, bool live)
{
        BOUNDED(v);
        virDomainPtr dom = virDomainLookupByName(v->conn, name);
        if (!dom)
                return nkp_fail(virt_errno(), "No libvirt domain '%s': %s.", name,
                                last_virt_error());
        unsigned flags = live ? VIR_DOMAIN_AFFECT_LIVE : VIR_DOMAIN_AFFECT_CONFIG;
        /* libvirt puts the element and its children into the namespace
         * itself (prefix "nkp", as a define of the domain stores them).  A
         * default xmlns declaration in the text would be kept beside it,
         * and what virDomainGetMetadata then returns could not be set
         * again ("failed to create a new XML namespace"): drop it. */
        static const char decl[] = " xmlns=\"" NKP_KEYSAFE_NS "\"";
        g_autofree char *head = NULL, *plain = NULL;
        const char *at = strstr(keysafe_xml, decl);
        const char *tag_end = strchr(keysafe_xml, '>');
        if (at && tag_end && at < tag_end) {
                head = g_strndup(keysafe_xml, (gsize) (at - keysafe_xml));
                plain = g_strconcat(head, at + strlen(decl), NULL);
        }
        int r = virDomainSetMetadata(dom, VIR_DOMAIN_METADATA_ELEMENT, plain ? plain : keysafe_xml,
                                     "nkp", NKP_KEYSAFE_NS, flags);
        if (r < 0)
                r = nkp_fail(virt_errno(), "Cannot write the nkp keysafe into the %s definition "
                                           "of '%s': %s.",
                             live ? "live" : "persistent", name, last_virt_error());
        virDomainFree(dom);
        return r < 0 ? r : 0;
}

void *nkp_virt_connection(nkp_virt *v)
{
        return v->conn;
}

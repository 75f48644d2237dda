/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The domain XML: what nkp reads from it and the edits `vm encrypt` makes.
 *
 * Input comes from libvirt (the hook's stdin, virDomainGetXMLDesc) but is
 * treated as hostile: it is parsed with libxml2 without network access,
 * without entity substitution, without DTD loading, with a size cap, and a
 * document that declares a DOCTYPE is refused outright (libvirt never writes
 * one; refusing it closes every entity-expansion trick).  The DOCTYPE is
 * found by the parser (its internalSubset callback stops the parse before
 * any declaration is read), never by searching the text: a comment or a
 * CDATA block that merely contains "<!DOCTYPE" is text, libvirt keeps it in
 * another tool's <metadata>, and nkp must read that domain like libvirt does
 * (issue 13).  libxml2's own error printing is switched off: the library
 * never prints.
 *
 * <name> is kept as libvirt keeps it (its whole text, not stripped, no
 * length cap: libvirt 9.0 has none); <tpm> and <disk> are read from every
 * <devices>, as libvirt's "./devices/tpm" XPath does, and a vTPM counts as
 * encrypted only when every emulator <tpm> has an <encryption secret=…>.
 *
 * What is read (namespace-aware; libvirt's elements have no namespace):
 *
 *   <domain>
 *     <name>…</name> <uuid>…</uuid>
 *     <metadata>
 *       <nkp:keysafe xmlns:nkp="NKP_KEYSAFE_NS" …/>   ← any element in nkp's
 *     </metadata>                                       namespace (at most one)
 *     <devices>
 *       <disk type='file' device='disk'>
 *         <driver type='qcow2'/> <source file='…'/> <target dev='vda'/>
 *         <encryption format='luks'><secret type='passphrase' uuid='…'/></encryption>
 *       </disk>                    (encryption also accepted inside <source>)
 *       <tpm model='tpm-crb'>
 *         <backend type='emulator' version='2.0'><encryption secret='…'/></backend>
 *       </tpm>
 *     </devices>
 *   </domain>
 *
 * The nkp element is copied into a standalone document (its namespace
 * declared on it, wherever the input declared it) and handed to
 * nkp_keysafe_parse(). */
#include <errno.h>
#include <string.h>

#include <libxml/parser.h>
#include <libxml/tree.h>

#include "nkp-private.h"
#include "nkp-xml.h"

static int parse_options(void)
{
        /* No XML_PARSE_NOENT (it would substitute entities), no DTDLOAD,
         * no DTDATTR, no HUGE. */
        return XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING | XML_PARSE_NOCDATA;
}

bool nkp_domain_mentions_nkp(const char *xml, size_t len)
{
        return xml && memmem(xml, len, NKP_KEYSAFE_NS, strlen(NKP_KEYSAFE_NS)) != NULL;
}

/* libxml2 calls this at "<!DOCTYPE name …", before it reads any
 * declaration of the internal subset: the parse stops there. */
static void refuse_doctype(void *user, const xmlChar *name, const xmlChar *external_id,
                           const xmlChar *system_id)
{
        (void) name;
        (void) external_id;
        (void) system_id;
        xmlParserCtxtPtr ctxt = user;
        ctxt->_private = (void *) 1;
        xmlStopParser(ctxt);
}

/* libxml2 reports some errors (a failed encoding conversion, "I/O error")
 * through its generic handler, which prints on stderr even with
 * XML_PARSE_NOERROR; the hook's stderr must hold one line, so they are
 * dropped while nkp parses (the parse still fails with its own message). */
static void drop_generic_error(void *ctx, const char *msg, ...)
{
        (void) ctx;
        (void) msg;
}

static xmlDocPtr read_memory_quietly(xmlParserCtxtPtr ctxt, const char *xml, size_t len)
{
        xmlGenericErrorFunc old_func = xmlGenericError;
        void *old_ctx = xmlGenericErrorContext;
        xmlSetGenericErrorFunc(NULL, drop_generic_error);
        xmlDocPtr doc = xmlCtxtReadMemory(ctxt, xml, (int) len, "domain.xml", NULL,
                                          parse_options());
        xmlSetGenericErrorFunc(old_ctx, old_func);
        return doc;
}

/* Parses into a document whose root is a namespace-less <domain>. */
static int read_doc(const char *xml, size_t len, xmlDocPtr *ret)
{
        if (!xml || len == 0)
                return nkp_fail(-EBADMSG, "The domain XML is empty.");
        if (len > NKP_DOMAIN_XML_MAX)
                return nkp_fail(-EFBIG, "The domain XML is larger than %d bytes.",
                                NKP_DOMAIN_XML_MAX);
        if (len > INT32_MAX)
                return nkp_fail(-EFBIG, "The domain XML is too large.");
        xmlInitParser();
        xmlParserCtxtPtr ctxt = xmlNewParserCtxt();
        if (!ctxt || !ctxt->sax) {
                xmlFreeParserCtxt(ctxt);
                return nkp_fail(-ENOMEM, "Out of memory while parsing the domain XML.");
        }
        ctxt->sax->internalSubset = refuse_doctype;
        xmlDocPtr doc = read_memory_quietly(ctxt, xml, len);
        if (ctxt->_private) {
                xmlFreeDoc(doc);
                xmlFreeParserCtxt(ctxt);
                return nkp_fail(-EBADMSG, "The domain XML declares a DOCTYPE, which libvirt never "
                                          "writes; refused.");
        }
        if (!doc) {
                xmlErrorPtr e = xmlCtxtGetLastError(ctxt);
                g_autofree char *msg = g_strdup(e && e->message ? e->message : "malformed");
                g_strstrip(msg);
                int line = e ? e->line : 0;
                xmlFreeParserCtxt(ctxt);
                return nkp_fail(-EBADMSG, "The domain XML is not well-formed (line %d: %s).", line,
                                msg);
        }
        xmlFreeParserCtxt(ctxt);
        if (doc->intSubset || doc->extSubset) {
                xmlFreeDoc(doc);
                return nkp_fail(-EBADMSG, "The domain XML declares a DOCTYPE; refused.");
        }
        xmlNodePtr root = xmlDocGetRootElement(doc);
        if (!root || root->ns || !xmlStrEqual(root->name, X("domain"))) {
                xmlFreeDoc(doc);
                return nkp_fail(-EBADMSG, "The XML is not a libvirt <domain>.");
        }
        *ret = doc;
        return 0;
}

static bool is_elem(xmlNodePtr n, const char *name)
{
        return n && n->type == XML_ELEMENT_NODE && !n->ns && xmlStrEqual(n->name, X(name));
}

/* The text content of an element (no entity references can be present:
 * DOCTYPEs are refused), stripped. */
static char *text(xmlNodePtr n)
{
        if (!n)
                return NULL;
        xmlChar *v = xmlNodeGetContent(n);
        if (!v)
                return NULL;
        char *r = g_strstrip(g_strdup((const char *) v));
        xmlFree(v);
        return r;
}

static bool is_nkp_elem(xmlNodePtr n)
{
        return n && n->type == XML_ELEMENT_NODE && n->ns && n->ns->href &&
               xmlStrEqual(n->ns->href, X(NKP_KEYSAFE_NS));
}

/* The nkp element inside <metadata>: 0 and *ret NULL when none, -EBADMSG
 * when there are two. */
static int find_keysafe_node(xmlNodePtr root, xmlNodePtr *ret)
{
        xmlNodePtr found = NULL;
        xmlNodePtr md = nkp_xml_child(root, "metadata");
        for (xmlNodePtr n = md ? md->children : NULL; n; n = n->next) {
                if (!is_nkp_elem(n))
                        continue;
                if (found)
                        return nkp_fail(-EBADMSG, "The domain <metadata> holds more than one nkp "
                                                  "element; there must be exactly one keysafe.");
                found = n;
        }
        *ret = found;
        return 0;
}

/* `node` as a standalone XML document (namespaces reconciled onto it). */
static int node_to_string(xmlNodePtr node, char **ret)
{
        xmlDocPtr doc = xmlNewDoc(X("1.0"));
        if (!doc)
                return nkp_fail(-ENOMEM, "Out of memory.");
        xmlNodePtr copy = xmlDocCopyNode(node, doc, 1);
        if (!copy) {
                xmlFreeDoc(doc);
                return nkp_fail(-ENOMEM, "Out of memory.");
        }
        xmlDocSetRootElement(doc, copy);
        xmlReconciliateNs(doc, copy);
        xmlBufferPtr buf = xmlBufferCreate();
        if (!buf || xmlNodeDump(buf, doc, copy, 0, 0) < 0) {
                xmlBufferFree(buf);
                xmlFreeDoc(doc);
                return nkp_fail(-ENOMEM, "Cannot serialize the nkp keysafe element.");
        }
        *ret = g_strdup((const char *) xmlBufferContent(buf));
        xmlBufferFree(buf);
        xmlFreeDoc(doc);
        return 0;
}

static void disk_free(gpointer p)
{
        NkpDomainDisk *d = p;
        if (!d)
                return;
        g_free(d->target);
        g_free(d->device);
        g_free(d->type);
        g_free(d->source_file);
        g_free(d->driver_type);
        g_free(d->encryption_format);
        g_free(d->encryption_secret);
        g_free(d);
}

void nkp_domain_free(NkpDomain *d)
{
        if (!d)
                return;
        g_free(d->name);
        g_free(d->uuid);
        g_free(d->tpm_model);
        g_free(d->tpm_version);
        g_free(d->tpm_secret);
        if (d->disks)
                g_ptr_array_unref(d->disks);
        g_free(d->keysafe_xml);
        nkp_keysafe_free(d->keysafe);
        g_free(d);
}

static xmlNodePtr disk_encryption(xmlNodePtr disk)
{
        xmlNodePtr e = nkp_xml_child(disk, "encryption");
        return e ? e : nkp_xml_child(nkp_xml_child(disk, "source"), "encryption");
}

static void read_disk(NkpDomain *d, xmlNodePtr n)
{
        NkpDomainDisk *disk = g_new0(NkpDomainDisk, 1);
        disk->type = nkp_xml_attr(n, "type");
        disk->device = nkp_xml_attr(n, "device");
        if (!disk->device)
                disk->device = g_strdup("disk");
        disk->target = nkp_xml_attr(nkp_xml_child(n, "target"), "dev");
        xmlNodePtr src = nkp_xml_child(n, "source");
        disk->source_file = nkp_xml_attr(src, "file");
        if (!disk->source_file)
                disk->source_file = nkp_xml_attr(src, "dev");
        disk->driver_type = nkp_xml_attr(nkp_xml_child(n, "driver"), "type");
        xmlNodePtr enc = disk_encryption(n);
        if (enc) {
                disk->encryption_format = nkp_xml_attr(enc, "format");
                if (!disk->encryption_format)
                        disk->encryption_format = g_strdup("default");
                disk->encryption_secret = nkp_xml_attr(nkp_xml_child(enc, "secret"), "uuid");
        }
        g_ptr_array_add(d->disks, disk);
}

/* The first emulator <tpm> describes the vTPM; any later one without an
 * <encryption secret=…> makes it plain (fail closed: libvirt would reject
 * such a domain, nkp must not let it through as encrypted). */
static void read_tpm(NkpDomain *d, xmlNodePtr n)
{
        xmlNodePtr be = nkp_xml_child(n, "backend");
        g_autofree char *type = nkp_xml_attr(be, "type");
        if (!type || strcmp(type, "emulator") != 0)
                return;
        g_autofree char *secret = nkp_xml_attr(nkp_xml_child(be, "encryption"), "secret");
        if (d->has_vtpm) {
                if (!secret)
                        g_clear_pointer(&d->tpm_secret, g_free);
                return;
        }
        d->has_vtpm = true;
        d->tpm_model = nkp_xml_attr(n, "model");
        d->tpm_version = nkp_xml_attr(be, "version");
        d->tpm_secret = g_steal_pointer(&secret);
}

/* The whole text of an element, as libvirt's "string(./name[1])" reads it. */
static char *raw_text(xmlNodePtr n)
{
        if (!n)
                return NULL;
        xmlChar *v = xmlNodeGetContent(n);
        if (!v)
                return NULL;
        char *r = g_strdup((const char *) v);
        xmlFree(v);
        return r;
}

int nkp_domain_parse(const char *xml, size_t len, NkpDomain **ret)
{
        xmlDocPtr doc = NULL;
        int r = read_doc(xml, len, &doc);
        if (r < 0)
                return r;
        g_autoptr(NkpDomain) d = g_new0(NkpDomain, 1);
        d->disks = g_ptr_array_new_with_free_func(disk_free);
        xmlNodePtr root = xmlDocGetRootElement(doc);

        d->name = raw_text(nkp_xml_child(root, "name"));
        g_autofree char *uuid = text(nkp_xml_child(root, "uuid"));
        uint8_t ub[16];
        if (!d->name || d->name[0] == '\0') {
                xmlFreeDoc(doc);
                return nkp_fail(-EBADMSG, "The domain XML has no usable <name>.");
        }
        if (!uuid || nkp_uuid_parse(uuid, ub) < 0) {
                xmlFreeDoc(doc);
                return nkp_fail(-EBADMSG, "The domain XML of '%s' has no valid <uuid>.", d->name);
        }
        d->uuid = g_malloc(NKP_UUID_STRING_LEN + 1);
        nkp_uuid_format(ub, d->uuid);

        for (xmlNodePtr devices = root->children; devices; devices = devices->next) {
                if (!is_elem(devices, "devices"))
                        continue;
                for (xmlNodePtr n = devices->children; n; n = n->next) {
                        if (is_elem(n, "disk"))
                                read_disk(d, n);
                        else if (is_elem(n, "tpm"))
                                read_tpm(d, n);
                }
        }

        xmlNodePtr ks = NULL;
        r = find_keysafe_node(root, &ks);
        if (r == 0 && ks)
                r = node_to_string(ks, &d->keysafe_xml);
        xmlFreeDoc(doc);
        if (r < 0)
                return r;

        if (d->keysafe_xml) {
                r = nkp_keysafe_parse(d->keysafe_xml, strlen(d->keysafe_xml), &d->keysafe);
                if (r < 0)
                        return nkp_fail_prefix(r, "The nkp keysafe in the metadata of VM '%s' is "
                                                  "damaged", d->name);
                const char *ks_uuid = nkp_keysafe_vm_uuid(d->keysafe);
                uint8_t kb[16];
                if (!ks_uuid || nkp_uuid_parse(ks_uuid, kb) < 0 || memcmp(kb, ub, 16) != 0)
                        return nkp_fail(-EBADMSG,
                                        "The nkp keysafe of VM '%s' was made for the VM UUID '%s', "
                                        "not '%s' (a copied VM?); it cannot unlock this VM.",
                                        d->name, ks_uuid ? ks_uuid : "", d->uuid);
        }
        *ret = g_steal_pointer(&d);
        return 0;
}

const NkpDomainDisk *nkp_domain_find_disk(const NkpDomain *d, const char *target)
{
        for (guint i = 0; d && i < d->disks->len; i++) {
                const NkpDomainDisk *disk = d->disks->pdata[i];
                if (disk->target && strcmp(disk->target, target) == 0)
                        return disk;
        }
        return NULL;
}

/* ---- editing ------------------------------------------------------------- */

struct NkpDomainEdit {
        xmlDocPtr doc;
};

int nkp_domain_edit_new(const char *xml, size_t len, NkpDomainEdit **ret)
{
        xmlDocPtr doc = NULL;
        int r = read_doc(xml, len, &doc);
        if (r < 0)
                return r;
        NkpDomainEdit *e = g_new0(NkpDomainEdit, 1);
        e->doc = doc;
        *ret = e;
        return 0;
}

void nkp_domain_edit_free(NkpDomainEdit *e)
{
        if (!e)
                return;
        xmlFreeDoc(e->doc);
        g_free(e);
}

static void remove_node(xmlNodePtr n)
{
        if (!n)
                return;
        xmlUnlinkNode(n);
        xmlFreeNode(n);
}

int nkp_domain_edit_set_vtpm_secret(NkpDomainEdit *e, const char *secret_uuid)
{
        xmlNodePtr devices = nkp_xml_child(xmlDocGetRootElement(e->doc), "devices");
        for (xmlNodePtr n = devices ? devices->children : NULL; n; n = n->next) {
                if (!is_elem(n, "tpm"))
                        continue;
                xmlNodePtr be = nkp_xml_child(n, "backend");
                g_autofree char *type = nkp_xml_attr(be, "type");
                if (!type || strcmp(type, "emulator") != 0)
                        continue;
                remove_node(nkp_xml_child(be, "encryption"));
                if (secret_uuid) {
                        xmlNodePtr enc = xmlNewChild(be, NULL, X("encryption"), NULL);
                        if (!enc || !xmlSetProp(enc, X("secret"), X(secret_uuid)))
                                return nkp_fail(-ENOMEM, "Out of memory.");
                }
                return 0;
        }
        return nkp_fail(-ENOENT, "The domain has no emulated vTPM.");
}

int nkp_domain_edit_set_disk_luks(NkpDomainEdit *e, const char *target, const char *secret_uuid)
{
        xmlNodePtr devices = nkp_xml_child(xmlDocGetRootElement(e->doc), "devices");
        for (xmlNodePtr n = devices ? devices->children : NULL; n; n = n->next) {
                if (!is_elem(n, "disk"))
                        continue;
                g_autofree char *dev = nkp_xml_attr(nkp_xml_child(n, "target"), "dev");
                if (!dev || strcmp(dev, target) != 0)
                        continue;
                remove_node(nkp_xml_child(n, "encryption"));
                remove_node(nkp_xml_child(nkp_xml_child(n, "source"), "encryption"));
                if (!secret_uuid) {
                        xmlUnsetProp(n, X("snapshot")); /* libvirt's default again */
                        return 0;
                }
                if (!xmlSetProp(n, X("snapshot"), X("no")))
                        return nkp_fail(-ENOMEM, "Out of memory.");
                xmlNodePtr drv = nkp_xml_child(n, "driver");
                if (drv)
                        xmlSetProp(drv, X("type"), X("qcow2"));
                xmlNodePtr enc = xmlNewNode(NULL, X("encryption"));
                if (!enc)
                        return nkp_fail(-ENOMEM, "Out of memory.");
                xmlSetProp(enc, X("format"), X("luks"));
                xmlNodePtr sec = xmlNewChild(enc, NULL, X("secret"), NULL);
                if (!sec) {
                        xmlFreeNode(enc);
                        return nkp_fail(-ENOMEM, "Out of memory.");
                }
                xmlSetProp(sec, X("type"), X("passphrase"));
                xmlSetProp(sec, X("uuid"), X(secret_uuid));
                /* libvirt's order: …, target, …; put it after <target>. */
                xmlNodePtr tgt = nkp_xml_child(n, "target");
                if (tgt)
                        xmlAddNextSibling(tgt, enc);
                else
                        xmlAddChild(n, enc);
                return 0;
        }
        return nkp_fail(-ENOENT, "The domain has no disk with target '%s'.", target);
}

int nkp_domain_edit_refuse_snapshots(NkpDomainEdit *e)
{
        int changed = 0;
        xmlNodePtr devices = nkp_xml_child(xmlDocGetRootElement(e->doc), "devices");
        for (xmlNodePtr n = devices ? devices->children : NULL; n; n = n->next) {
                if (!is_elem(n, "disk"))
                        continue;
                g_autofree char *format = nkp_xml_attr(disk_encryption(n), "format");
                g_autofree char *snapshot = nkp_xml_attr(n, "snapshot");
                if (g_strcmp0(format, "luks") != 0 || g_strcmp0(snapshot, "no") == 0)
                        continue;
                if (!xmlSetProp(n, X("snapshot"), X("no")))
                        return nkp_fail(-ENOMEM, "Out of memory.");
                changed++;
        }
        return changed;
}

int nkp_domain_edit_set_keysafe(NkpDomainEdit *e, const char *keysafe_xml)
{
        xmlNodePtr root = xmlDocGetRootElement(e->doc);
        xmlNodePtr md = nkp_xml_child(root, "metadata");
        if (md) {
                xmlNodePtr n = md->children;
                while (n) {
                        xmlNodePtr next = n->next;
                        if (is_nkp_elem(n))
                                remove_node(n);
                        n = next;
                }
        }
        if (!keysafe_xml)
                return 0;

        xmlDocPtr ksdoc = NULL;
        xmlParserCtxtPtr ctxt = xmlNewParserCtxt();
        if (!ctxt)
                return nkp_fail(-ENOMEM, "Out of memory.");
        ksdoc = xmlCtxtReadMemory(ctxt, keysafe_xml, (int) strlen(keysafe_xml), "keysafe.xml",
                                  NULL, parse_options());
        xmlFreeParserCtxt(ctxt);
        xmlNodePtr ksroot = ksdoc ? xmlDocGetRootElement(ksdoc) : NULL;
        if (!ksroot || !is_nkp_elem(ksroot)) {
                xmlFreeDoc(ksdoc);
                return nkp_fail(-EINVAL, "The keysafe XML is not an element in nkp's namespace.");
        }
        if (!md) {
                md = xmlNewNode(NULL, X("metadata"));
                /* libvirt puts <metadata> after <title>/<description>, before
                 * <maxMemory>/<memory>; after <uuid> is always accepted. */
                xmlNodePtr after = nkp_xml_child(root, "description");
                if (!after)
                        after = nkp_xml_child(root, "title");
                if (!after)
                        after = nkp_xml_child(root, "uuid");
                if (after)
                        xmlAddNextSibling(after, md);
                else
                        xmlAddChild(root, md);
        }
        xmlNodePtr copy = xmlDocCopyNode(ksroot, e->doc, 1);
        xmlFreeDoc(ksdoc);
        if (!copy)
                return nkp_fail(-ENOMEM, "Out of memory.");
        xmlAddChild(md, copy);
        xmlReconciliateNs(e->doc, copy);
        return 0;
}

int nkp_domain_edit_format(NkpDomainEdit *e, char **ret)
{
        xmlChar *mem = NULL;
        int size = 0;
        xmlDocDumpFormatMemory(e->doc, &mem, &size, 0);
        if (!mem)
                return nkp_fail(-ENOMEM, "Cannot serialize the domain XML.");
        *ret = g_strndup((const char *) mem, size);
        xmlFree(mem);
        return 0;
}

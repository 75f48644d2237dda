/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: the hook's DECISION at `prepare begin` under
 * [vtpm] policy=require (issue 13), not only the absence of crashes.
 *
 * Every input is the domain XML on the hook's stdin; nkp_hook_run (the very
 * function the hook program calls) runs the START step with nkp's files in
 * a throwaway root whose nkp.conf says policy=require, tcti=none and a
 * state_dir inside the root, and a libvirt URI that reaches nothing.  No
 * libvirtd is needed: a plain vTPM is refused before any libvirt call, and
 * a keysafe cannot unlock (the root holds no provider).
 *
 * The invariant, aborted on when broken:
 *
 *   nkp_hook_run returns 0 (libvirt starts the VM) only if
 *     (a) nkp_domain_parse reads the input as a domain, and
 *     (b) an independent reading with libxml2, as libvirt 9.0 reads it
 *         (XPath without namespaces over /domain/devices/tpm: the first
 *         <backend>'s type, the first backend/encryption's secret=), finds
 *         the input well-formed with a root <domain> and no emulator <tpm>
 *         whose backend has no <encryption secret=…>.
 *
 *   i.e. a domain that has a plain emulator vTPM, or that cannot be parsed,
 *   is never let through under require.  A refusal (r < 0) must carry its
 *   one-line message. */
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libxml/parser.h>
#include <libxml/xpath.h>

#include "nkp-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char *tmp_root;

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
        (void) st;
        (void) flag;
        (void) ftw;
        return remove(path) < 0 ? -1 : 0;
}

static void remove_root(void)
{
        (void) nftw(tmp_root, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void drop_generic_error(void *ctx, const char *msg, ...)
{
        (void) ctx;
        (void) msg;
}

static const char *fuzz_root(void)
{
        if (tmp_root)
                return tmp_root;
        xmlSetGenericErrorFunc(NULL, drop_generic_error); /* the oracle's parse */
        tmp_root = g_dir_make_tmp("nkp-fuzz-hook-XXXXXX", NULL);
        if (!tmp_root)
                abort();
        atexit(remove_root);
        g_autofree char *etc = g_build_filename(tmp_root, "etc", "nkp", NULL);
        g_autofree char *swtpm = g_build_filename(tmp_root, "swtpm", NULL);
        g_autofree char *conf = g_build_filename(etc, "nkp.conf", NULL);
        g_autofree char *text = g_strdup_printf(
                "[tpm]\ntcti=none\n[vtpm]\npolicy=require\nstate_dir=%s\n", swtpm);
        if (g_mkdir_with_parents(etc, 0700) < 0 || g_mkdir_with_parents(swtpm, 0700) < 0 ||
            !g_file_set_contents(conf, text, -1, NULL))
                abort();
        return tmp_root;
}

/* (b) above: true when libvirt would read a well-formed <domain> with no
 * plain emulator vTPM. */
static bool libvirt_reads_no_plain_vtpm(const uint8_t *data, size_t size)
{
        if (size == 0 || size > NKP_DOMAIN_XML_MAX)
                return false;
        xmlDocPtr doc = xmlReadMemory((const char *) data, (int) size, "oracle.xml", NULL,
                                      XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
        if (!doc)
                return false;
        bool ok = false;
        xmlNodePtr root = xmlDocGetRootElement(doc);
        xmlXPathContextPtr xp = xmlXPathNewContext(doc);
        if (root && !root->ns && xmlStrEqual(root->name, (const xmlChar *) "domain") && xp) {
                xmlXPathObjectPtr plain = xmlXPathEvalExpression(
                        (const xmlChar *) "/domain/devices/tpm[backend[1]/@type='emulator' and "
                                          "not((backend/encryption)[1]/@secret)]",
                        xp);
                ok = plain && plain->type == XPATH_NODESET &&
                     xmlXPathNodeSetIsEmpty(plain->nodesetval);
                xmlXPathFreeObject(plain);
        }
        xmlXPathFreeContext(xp);
        xmlFreeDoc(doc);
        return ok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        const char *root = fuzz_root();
        g_autofree char *uri = g_strdup_printf("qemu+unix:///system?socket=%s/no-such-socket",
                                               root);
        nkp_error_clear();
        int r = nkp_hook_run(root, uri, NKP_HOOK_START, "fuzz", (const char *) data, size);
        if (r < 0) {
                if (!nkp_error_message()[0])
                        abort(); /* a refusal without its line */
                return 0;
        }
        if (r != 0)
                abort();
        /* Let through: (a) and (b) must hold. */
        NkpDomain *d = NULL;
        if (nkp_domain_parse((const char *) data, size, &d) < 0) {
                fprintf(stderr, "fuzz-hook-decision: input nkp cannot parse was let through\n");
                abort();
        }
        bool plain_by_nkp = d->has_vtpm && !d->tpm_secret;
        nkp_domain_free(d);
        if (plain_by_nkp || !libvirt_reads_no_plain_vtpm(data, size)) {
                fprintf(stderr, "fuzz-hook-decision: a plain vTPM was let through under "
                                "policy=require\n");
                abort();
        }
        return 0;
}

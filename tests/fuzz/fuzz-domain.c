/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: the hook's stdin (a domain XML) through
 * nkp_domain_parse, and the edit path used by `vm encrypt`. */
#include <stddef.h>
#include <stdint.h>

#include "nkp-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        const char *xml = (const char *) data;
        NkpDomain *d = NULL;
        (void) nkp_domain_mentions_nkp(xml, size);
        if (nkp_domain_parse(xml, size, &d) == 0) {
                for (guint i = 0; i < d->disks->len; i++)
                        (void) nkp_domain_find_disk(d, ((NkpDomainDisk *) d->disks->pdata[i])->target
                                                               ? ((NkpDomainDisk *) d->disks->pdata[i])->target
                                                               : "vda");
                nkp_domain_free(d);
        }
        NkpDomainEdit *e = NULL;
        if (nkp_domain_edit_new(xml, size, &e) == 0) {
                char *out = NULL;
                (void) nkp_domain_edit_set_vtpm_secret(e, "11111111-2222-4333-8444-555555555555");
                (void) nkp_domain_edit_set_disk_luks(e, "vda", "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee");
                (void) nkp_domain_edit_set_keysafe(e, NULL);
                if (nkp_domain_edit_format(e, &out) == 0)
                        g_free(out);
                nkp_domain_edit_free(e);
        }
        return 0;
}

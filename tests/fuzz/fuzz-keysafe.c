/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: the keysafe XML from a domain's <metadata>.  Whatever
 * parses must format, and the formatted text must parse back to the same
 * text (format is canonical). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nkp-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_round_trip(const nkp_keysafe *ks)
{
        char *xml = NULL;
        if (nkp_keysafe_format(ks, &xml) < 0)
                abort();
        nkp_keysafe *again = NULL;
        if (nkp_keysafe_parse(xml, strlen(xml), &again) < 0)
                abort();
        char *xml2 = NULL;
        if (nkp_keysafe_format(again, &xml2) < 0 || strcmp(xml, xml2) != 0)
                abort();
        if (nkp_keysafe_n_entries(again) != nkp_keysafe_n_entries(ks))
                abort();
        free(xml);
        free(xml2);
        nkp_keysafe_free(again);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        nkp_keysafe *ks = NULL;
        int r = nkp_keysafe_parse((const char *) data, size, &ks);
        if (r == 0) {
                check_round_trip(ks);
                /* walk the accessors the hook uses */
                for (size_t i = 0; i < nkp_keysafe_n_entries(ks); i++)
                        if (!nkp_keysafe_entry_kind(ks, i) || !nkp_keysafe_entry_id(ks, i) ||
                            !nkp_keysafe_entry_secret_uuid(ks, i))
                                abort();
                nkp_keysafe_free(ks);
        } else if (ks || (r != -EBADMSG && r != -EPROTONOSUPPORT)) {
                abort(); /* a refusal is always one of the two documented errors */
        }
        return 0;
}

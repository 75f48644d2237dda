/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: a VM's conversion journal (journal/<uuid>.ini), which
 * recovery acts on.  Whatever loads must name only absolute paths free of
 * "." and "..", scratch directories that are nkp's work directories, and
 * must format and load back to the same text. */
#include <stdlib.h>
#include <string.h>

#include "nkp-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_paths(const GPtrArray *paths, bool scratch)
{
        for (guint i = 0; i < paths->len; i++) {
                const char *p = paths->pdata[i];
                if (p[0] != '/' || strstr(p, "/../") || g_str_has_suffix(p, "/..") ||
                    strstr(p, "/./") || g_str_has_suffix(p, "/.") || strstr(p, "//") ||
                    g_str_has_suffix(p, "/"))
                        abort();
                if (scratch && !g_str_has_suffix(p, "/" NKP_JOURNAL_SCRATCH_NAME))
                        abort();
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        NkpJournal *j = NULL;
        if (nkp_journal_parse((const char *) data, size, NULL, "fuzz", &j) < 0) {
                if (j)
                        abort();
                return 0;
        }
        check_paths(j->files, false);
        check_paths(j->scratch, true);
        size_t len = 0, len2 = 0;
        char *text = nkp_journal_format(j, &len);
        NkpJournal *again = NULL;
        if (nkp_journal_parse(text, len, j->vm_uuid, "fuzz", &again) < 0)
                abort();
        char *text2 = nkp_journal_format(again, &len2);
        if (len != len2 || memcmp(text, text2, len) != 0 || again->files->len != j->files->len)
                abort();
        g_free(text);
        g_free(text2);
        nkp_journal_free(again);
        nkp_journal_free(j);
        return 0;
}

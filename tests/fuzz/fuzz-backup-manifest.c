/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: a backup directory's manifest (nkp_backup_manifest_parse;
 * `nkpctl vm restore-backup DIR` reads it from wherever DIR came from).
 * A refusal says why and returns nothing; whatever parses must format to
 * text that parses to the same text again (the writer is canonical), and
 * names nothing that could leave DIR (targets and checkpoints are
 * [a-z0-9] / nkp-digits only). */
#include <stdlib.h>
#include <string.h>

#include "nkp-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        NkpBackupManifest *m = NULL;
        int r = nkp_backup_manifest_parse((const char *) data, size, &m);
        if (r < 0) {
                if (m || !nkp_error_message()[0])
                        abort();
                return 0;
        }
        for (size_t i = 0; i < m->n_disks; i++)
                if (strpbrk(m->targets[i], "/.") || !m->targets[i][0])
                        abort();
        for (size_t i = 0; i < m->n_levels; i++)
                if (strpbrk(m->checkpoints[i], "/<>'\"&"))
                        abort();
        char *text = nkp_backup_manifest_format(m);
        NkpBackupManifest *again = NULL;
        if (nkp_backup_manifest_parse(text, strlen(text), &again) < 0)
                abort();
        char *text2 = nkp_backup_manifest_format(again);
        if (strcmp(text, text2) != 0)
                abort();
        g_free(text);
        g_free(text2);
        nkp_backup_manifest_free(again);
        nkp_backup_manifest_free(m);
        return 0;
}

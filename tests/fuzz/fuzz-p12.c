/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: nkp_p12_import over arbitrary bytes with a fixed
 * password (the seed corpus in corpus/fuzz-p12/ is made with it by
 * gen-p12-corpus).  The iteration cap is lowered to 2000 so that the fuzzer
 * explores the parser instead of spending its time in PBKDF2; everything
 * else is the code path nkp_p12_import runs.
 *
 * Mutations cannot get past the MAC, so the same bytes also go to the part
 * of the import that runs after it (the SafeContents and the nkp bag in
 * them); the corpus holds seeds of both kinds, whole backups and m-of-n
 * shares (whose share number, threshold, split id and fingerprint are
 * parsed there too). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "p12-internal.h"

#define FUZZ_PASSWORD "nkp-fuzz-password"
#define FUZZ_MAX_ITERATIONS 2000

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        static nkp_secret *password;
        if (!password && nkp_secret_new_copy(FUZZ_PASSWORD, sizeof FUZZ_PASSWORD - 1, &password) < 0)
                abort();

        NkpBackupInfo info;
        nkp_secret *kdk = NULL;
        int r = nkp_p12_import_capped(data, size, password, FUZZ_MAX_ITERATIONS, &info, &kdk);
        if (r == 0) {
                /* whatever was accepted is well formed */
                if (!kdk || nkp_secret_len(kdk) != NKP_KDK_SIZE || info.name[0] == '\0' ||
                    info.key_id[NKP_UUID_STRING_LEN] != '\0')
                        abort();
                nkp_secret_free(kdk);
        } else if (kdk || r >= 0) {
                abort();
        }

        kdk = NULL;
        r = nkp_p12_scan_safecontents(data, size, &info, &kdk);
        if (r == 0) {
                if (!kdk || nkp_secret_len(kdk) != NKP_KDK_SIZE || info.name[0] == '\0' ||
                    info.key_id[NKP_UUID_STRING_LEN] != '\0')
                        abort();
                nkp_secret_free(kdk);
        } else if (kdk || r >= 0) {
                abort();
        }
        /* an accepted share is numbered within its split */
        if (r == 0 && info.share_count &&
            (info.share_index < 1 || info.share_index > info.share_count || info.threshold < 2 ||
             info.threshold > info.share_count || info.share_count > NKP_SHARES_MAX ||
             strlen(info.fingerprint) != 64 || strlen(info.split_id) != NKP_UUID_STRING_LEN))
                abort();
        return 0;
}

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: the provider store file (providers.ini) through the
 * strict loader.  Whatever loads must format, and the formatted text must
 * load back and format to the same text (the writer is canonical). */
#include <stdlib.h>
#include <string.h>

#include "nkp-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static nkp_context *fuzz_context(void)
{
        static nkp_context *ctx;
        /* Never created: the loader only names the path in its errors. */
        if (!ctx && nkp_context_new("/nonexistent/nkp-fuzz-store", &ctx) < 0)
                abort();
        return ctx;
}

static char *format_or_die(const NkpStore *store, size_t *len)
{
        char *text = NULL;
        size_t cap = 0;
        if (nkp_store_format(store, &text, len, &cap) < 0)
                abort();
        return text;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        nkp_context *ctx = fuzz_context();
        char *buf = g_memdup2(data, size);
        NkpStore *store = NULL;
        int r = nkp_store_parse(ctx, buf, size, &store);
        g_free(buf);
        if (r < 0) {
                if (store || !nkp_error_message()[0])
                        abort(); /* a refusal always says why and returns nothing */
                return 0;
        }
        size_t len = 0, len2 = 0;
        char *text = format_or_die(store, &len);
        char *copy = g_memdup2(text, len);
        NkpStore *again = NULL;
        if (nkp_store_parse(ctx, copy, len, &again) < 0)
                abort();
        char *text2 = format_or_die(again, &len2);
        if (len != len2 || memcmp(text, text2, len) != 0 ||
            again->entries->len != store->entries->len)
                abort();
        g_free(copy);
        g_free(text);
        g_free(text2);
        nkp_store_free(again);
        nkp_store_free(store);
        return 0;
}

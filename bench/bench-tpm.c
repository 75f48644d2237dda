/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* bench-tpm ROOT RUNS: times nkp_provider_get_kdk() for one provider
 *   cold: key cache flushed → load the store, open the TPM, CreatePrimary,
 *         salted session, Load, Unseal, check the fingerprint, put into the
 *         cache (what the first VM start after a reboot pays);
 *   warm: from the key cache (what every later VM start pays);
 * and, for reference, the bare TPM part (nkp_tpm_open + nkp_tpm_unseal).
 * ROOT's nkp.conf names the TPM.  Prints median and p95 of each, and the
 * ratio.  Not a test. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nkp-private.h"

static double now_ms(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b)
{
        double x = *(const double *) a, y = *(const double *) b;
        return (x > y) - (x < y);
}

static double pct(double *v, int n, double p)
{
        qsort(v, (size_t) n, sizeof *v, cmp_double);
        int i = (int) (p * (n - 1) + 0.5);
        return v[i];
}

static void die(const char *what)
{
        fprintf(stderr, "bench-tpm: %s: %s\n", what, nkp_error_message());
        exit(1);
}

static double time_get_kdk(nkp_context *ctx, const char *key_id)
{
        nkp_secret *kdk = NULL;
        double t0 = now_ms();
        if (nkp_provider_get_kdk(ctx, key_id, &kdk) < 0)
                die("get_kdk");
        double dt = now_ms() - t0;
        nkp_secret_free(kdk);
        return dt;
}

static void report(const char *what, double *v, int n)
{
        double m = pct(v, n, 0.5), p95 = pct(v, n, 0.95);
        printf("%-34s median %9.3f ms   p95 %9.3f ms\n", what, m, p95);
}

int main(int argc, char **argv)
{
        if (argc != 3) {
                fprintf(stderr, "usage: bench-tpm ROOT RUNS\n");
                return 2;
        }
        int runs = atoi(argv[2]);
        if (runs < 2)
                runs = 2;
        nkp_context *ctx = NULL;
        if (nkp_context_new(argv[1], &ctx) < 0)
                die("context");

        /* A provider of its own in the bench root. */
        nkp_provider *p = NULL;
        char name[32];
        snprintf(name, sizeof name, "bench-%d", (int) getpid());
        double t0 = now_ms();
        if (nkp_provider_create(ctx, name, NKP_PROVIDER_REQUIRE_TPM, &p) < 0)
                die("create a provider");
        double create_ms = now_ms() - t0;
        const char *key_id = nkp_provider_key_id(p);

        NkpStore *store = NULL;
        if (nkp_store_load(ctx, &store) < 0)
                die("load the store");
        const NkpStoreEntry *e = nkp_store_find_key_id(store, key_id);

        double *cold = g_new(double, runs), *warm = g_new(double, runs), *bare = g_new(double, runs);
        for (int i = 0; i < runs; i++) {
                if (nkp_cache_flush(ctx) < 0)
                        die("flush");
                cold[i] = time_get_kdk(ctx, key_id);
                warm[i] = time_get_kdk(ctx, key_id);

                nkp_secret *kdk = NULL;
                NkpTpm *tpm = NULL;
                t0 = now_ms();
                if (nkp_tpm_open(ctx, &tpm) < 0 || nkp_tpm_unseal(tpm, e->tpm_blob, e->tpm_srk_name, &kdk) < 0)
                        die("unseal");
                bare[i] = now_ms() - t0;
                nkp_tpm_close(tpm);
                nkp_secret_free(kdk);
        }
        nkp_cache_flush(ctx);

        double cm = pct(cold, runs, 0.5), wm = pct(warm, runs, 0.5);
        printf("TCTI                               %s\n", nkp_context_tcti(ctx));
        printf("runs                               %d\n", runs);
        printf("provider create (seal, once)       %9.3f ms\n", create_ms);
        report("cold get_kdk (unseal + cache put)", cold, runs);
        report("warm get_kdk (kernel keyring)", warm, runs);
        report("bare TPM open + unseal", bare, runs);
        printf("ratio cold/warm (medians)          %9.0fx\n", wm > 0 ? cm / wm : 0.0);
        g_free(cold);
        g_free(warm);
        g_free(bare);
        nkp_store_free(store);
        nkp_provider_free(p);
        nkp_context_free(ctx);
        return 0;
}

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* bench-tpm ROOT RUNS: times getting a provider's KDK
 *   cold: key cache flushed → open the TPM, CreatePrimary, Load, Unseal,
 *         put into the cache (what a VM start pays once per boot);
 *   warm: from the key cache (what every later VM start pays).
 * ROOT's nkp.conf names the TPM.  Prints median and p95 of each, and the
 * ratio.  Not a test. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* What nkp_provider_get_kdk does for a TPM-sealed provider. */
static void get_kdk(nkp_context *ctx, const NkpCacheInfo *info, GBytes *blob, const char *srk)
{
        nkp_secret *kdk = NULL;
        int r = nkp_cache_get(ctx, info->key_id, &kdk, NULL);
        if (r == -ENOENT) {
                NkpTpm *tpm = NULL;
                if (nkp_tpm_open(ctx, &tpm) < 0)
                        die("open the TPM");
                if (nkp_tpm_unseal(tpm, blob, srk, &kdk) < 0)
                        die("unseal");
                nkp_tpm_close(tpm);
                if (nkp_cache_put(ctx, info, kdk) < 0)
                        die("cache put");
        } else if (r < 0) {
                die("cache get");
        }
        nkp_secret_free(kdk);
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

        nkp_secret *kdk = NULL;
        NkpTpm *tpm = NULL;
        GBytes *blob = NULL;
        char *srk = NULL;
        NkpCacheInfo info = { .name = "bench" };
        nkp_uuid_random(info.key_id);
        if (nkp_secret_new_random(NKP_KDK_SIZE, &kdk) < 0)
                die("random");
        double t0 = now_ms();
        if (nkp_tpm_open(ctx, &tpm) < 0)
                die("open the TPM");
        if (nkp_tpm_seal(tpm, kdk, &blob, &srk) < 0)
                die("seal");
        nkp_tpm_close(tpm);
        double seal_ms = now_ms() - t0;
        nkp_secret_free(kdk);

        double *cold = g_new(double, runs), *warm = g_new(double, runs);
        for (int i = 0; i < runs; i++) {
                if (nkp_cache_flush(ctx) < 0)
                        die("flush");
                t0 = now_ms();
                get_kdk(ctx, &info, blob, srk);
                cold[i] = now_ms() - t0;
                t0 = now_ms();
                get_kdk(ctx, &info, blob, srk);
                warm[i] = now_ms() - t0;
        }
        nkp_cache_flush(ctx);

        double cm = pct(cold, runs, 0.5), c95 = pct(cold, runs, 0.95);
        double wm = pct(warm, runs, 0.5), w95 = pct(warm, runs, 0.95);
        printf("TCTI                 %s\n", nkp_context_tcti(ctx));
        printf("runs                 %d\n", runs);
        printf("seal (once)          %9.3f ms\n", seal_ms);
        printf("cold get_kdk (unseal) median %9.3f ms   p95 %9.3f ms\n", cm, c95);
        printf("warm get_kdk (cache)  median %9.3f ms   p95 %9.3f ms\n", wm, w95);
        printf("ratio cold/warm (median)     %9.0fx\n", wm > 0 ? cm / wm : 0.0);
        g_free(cold);
        g_free(warm);
        g_bytes_unref(blob);
        g_free(srk);
        nkp_context_free(ctx);
        return 0;
}

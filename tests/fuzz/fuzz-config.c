/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: nkp's config (/etc/nkp/nkp.conf) through
 * nkp_context_new.  A config that loads must leave a usable context (a
 * TCTI, absolute paths, a known vTPM policy); one that does not must say
 * why and return no context. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nkp-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char *tmp_root;

static void remove_root(void)
{
        g_autofree char *conf = g_build_filename(tmp_root, "etc", "nkp", "nkp.conf", NULL);
        g_autofree char *etc_nkp = g_build_filename(tmp_root, "etc", "nkp", NULL);
        g_autofree char *etc = g_build_filename(tmp_root, "etc", NULL);
        (void) unlink(conf);
        (void) rmdir(etc_nkp);
        (void) rmdir(etc);
        (void) rmdir(tmp_root);
}

static const char *fuzz_root(void)
{
        if (!tmp_root) {
                tmp_root = g_dir_make_tmp("nkp-fuzz-config-XXXXXX", NULL);
                if (!tmp_root)
                        abort();
                atexit(remove_root);
                g_autofree char *etc = g_build_filename(tmp_root, "etc", "nkp", NULL);
                if (g_mkdir_with_parents(etc, 0700) < 0)
                        abort();
        }
        return tmp_root;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        const char *root = fuzz_root();
        g_autofree char *conf = g_build_filename(root, "etc", "nkp", "nkp.conf", NULL);
        if (!g_file_set_contents(conf, (const char *) data, (gssize) size, NULL))
                abort();
        nkp_context *ctx = NULL;
        if (nkp_context_new(root, &ctx) < 0) {
                if (ctx || !nkp_error_message()[0])
                        abort();
                return 0;
        }
        if (!ctx->tcti || !ctx->tcti[0] || !g_path_is_absolute(ctx->migration_qemu_conf) ||
            !g_path_is_absolute(ctx->vtpm_state_dir) || !ctx->vtpm_swtpm_user ||
            !ctx->vtpm_swtpm_user[0] || ctx->vtpm_policy < NKP_VTPM_POLICY_ENROL ||
            ctx->vtpm_policy > NKP_VTPM_POLICY_OFF || ctx->disks_policy < NKP_DISKS_POLICY_ENROL ||
            ctx->disks_policy > NKP_DISKS_POLICY_OFF)
                abort();
        nkp_context_free(ctx);
        return 0;
}

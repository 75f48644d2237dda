/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl host …: the host's TPM, its key cache, unlocking locked VMs.
 *
 *   host status        the TPM (TCTI, in use, answers), the cached providers
 *                      (names, key ids, deleted flag: never key bytes), and
 *                      the number of alarms.  --json: one document.
 *   host flush-cache   forget every unsealed key now, as a reboot does.
 *   host unlock        after a restore: re-check locked VMs (cmd-vm.c).
 *   host protect [--provider NAME] [--dir DIR]
 *                      encrypt DIR (default: the swtpm state, managed-save,
 *                      dump and NVRAM directories and nkp-saves) at rest
 *                      with the host key (nkp.h "The host key").
 *   host unprotect [--dir DIR]
 *                      turn that protection off again (default: every dir).
 *   host load-key      add the host key to the kernel, nothing else: the
 *                      boot unit nkp-host-unlock.service, before libvirtd.
 * The handlers and their rows of the command table (nkpctl.c). */
#include <stdio.h>

#include "nkpctl.h"

/* -1 when the alarms cannot be read (the reason goes to stderr). */
static int alarm_count(NkpctlGlobals *g)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        if (nkp_alarm_list(g->ctx, &list, &n) < 0) {
                fprintf(stderr, "nkpctl: warning: cannot read the alarms: %s\n",
                        nkp_error_message());
                return -1;
        }
        nkp_alarm_list_free(list, n);
        return (int) n;
}

static void hostkey_json(JsonBuilder *b, const nkp_hostkey_status *hk)
{
        json_builder_set_member_name(b, "host_key");
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "provider");
        if (nkp_hostkey_status_provider(hk))
                json_builder_add_string_value(b, nkp_hostkey_status_provider(hk));
        else
                json_builder_add_null_value(b);
        json_builder_set_member_name(b, "protected");
        json_builder_begin_array(b);
        for (size_t i = 0; i < nkp_hostkey_status_n_dirs(hk); i++) {
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "dir");
                json_builder_add_string_value(b, nkp_hostkey_status_dir(hk, i));
                json_builder_set_member_name(b, "state");
                json_builder_add_string_value(b, nkp_hostkey_status_dir_state(hk, i));
                json_builder_end_object(b);
        }
        json_builder_end_array(b);
        json_builder_set_member_name(b, "fstrim_due");
        if (nkp_hostkey_status_fstrim(hk))
                json_builder_add_string_value(b, nkp_hostkey_status_fstrim(hk));
        else
                json_builder_add_null_value(b);
        json_builder_end_object(b);
}

static void hostkey_text(const nkp_hostkey_status *hk)
{
        if (!nkp_hostkey_status_provider(hk)) {
                printf("Host key:         none (nothing protected: nkpctl host protect)\n");
                return;
        }
        printf("Host key:         from provider '%s' (key id %s)\n",
               nkp_hostkey_status_provider(hk), nkp_hostkey_status_key_id(hk));
        for (size_t i = 0; i < nkp_hostkey_status_n_dirs(hk); i++)
                printf("  %-32s %s\n", nkp_hostkey_status_dir(hk, i),
                       nkp_hostkey_status_dir_state(hk, i));
        if (nkp_hostkey_status_fstrim(hk))
                printf("Note:             the clear copies of directories converted while they "
                       "held files were removed, not erased: run fstrim on %s (said once)\n",
                       nkp_hostkey_status_fstrim(hk));
}

/* The network-bound providers and whether each Tang server answers now
 * (GET /adv, 2 s each): a stolen-host binding that cannot open at the next
 * boot should show before the boot. */
static void bindings_json(NkpctlGlobals *g, JsonBuilder *b)
{
        nkp_provider **list = NULL;
        size_t n = 0;
        json_builder_set_member_name(b, "bound_providers");
        json_builder_begin_array(b);
        if (nkp_provider_list(g->ctx, &list, &n) < 0)
                n = 0;
        for (size_t i = 0; i < n; i++) {
                unsigned t = 0;
                const char *const *servers = nkp_provider_binding(list[i], &t);
                if (!servers)
                        continue;
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, nkp_provider_name(list[i]));
                json_builder_set_member_name(b, "threshold");
                json_builder_add_int_value(b, t);
                json_builder_set_member_name(b, "servers");
                json_builder_begin_array(b);
                for (size_t j = 0; servers[j]; j++) {
                        json_builder_begin_object(b);
                        json_builder_set_member_name(b, "url");
                        json_builder_add_string_value(b, servers[j]);
                        json_builder_set_member_name(b, "answers");
                        json_builder_add_boolean_value(b, nkp_tang_probe(servers[j], 2000) == 0);
                        json_builder_end_object(b);
                }
                json_builder_end_array(b);
                json_builder_end_object(b);
        }
        json_builder_end_array(b);
        nkp_provider_list_free(list, n);
}

static void bindings_text(NkpctlGlobals *g)
{
        nkp_provider **list = NULL;
        size_t n = 0;
        if (nkp_provider_list(g->ctx, &list, &n) < 0)
                return;
        for (size_t i = 0; i < n; i++) {
                unsigned t = 0;
                const char *const *servers = nkp_provider_binding(list[i], &t);
                if (!servers)
                        continue;
                unsigned up = 0, all = 0;
                g_autoptr(GString) s = g_string_new(NULL);
                for (size_t j = 0; servers[j]; j++, all++) {
                        bool ok = nkp_tang_probe(servers[j], 2000) == 0;
                        up += ok;
                        g_string_append_printf(s, "%s%s %s", j ? ", " : "", servers[j], ok ? "up" : "DOWN");
                }
                printf("Bound provider:   %-16s tang, %u of %u needed, %u up now%s (%s)\n",
                       nkp_provider_name(list[i]), t, all, up,
                       up < t ? ": IT WOULD NOT OPEN" : "", s->str);
        }
        nkp_provider_list_free(list, n);
}

static void status_json(NkpctlGlobals *g, const nkp_host_status *st, int alarms,
                        const nkp_hostkey_status *hk)
{
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "root");
        json_builder_add_string_value(b, nkp_context_root(g->ctx));
        json_builder_set_member_name(b, "tpm");
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "tcti");
        json_builder_add_string_value(b, nkp_context_tcti(g->ctx));
        json_builder_set_member_name(b, "in_use");
        json_builder_add_boolean_value(b, nkp_host_status_tpm_in_use(st));
        json_builder_set_member_name(b, "answers");
        json_builder_add_boolean_value(b, nkp_host_status_tpm_answers(st));
        if (nkp_host_status_tpm_error(st)) {
                json_builder_set_member_name(b, "error");
                json_builder_add_string_value(b, nkp_host_status_tpm_error(st));
        }
        json_builder_end_object(b);
        json_builder_set_member_name(b, "cached_providers");
        json_builder_begin_array(b);
        for (size_t i = 0; i < nkp_host_status_n_cached(st); i++) {
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, nkp_host_status_cached_name(st, i));
                json_builder_set_member_name(b, "key_id");
                json_builder_add_string_value(b, nkp_host_status_cached_key_id(st, i));
                json_builder_set_member_name(b, "deleted");
                json_builder_add_boolean_value(b, nkp_host_status_cached_deleted(st, i));
                json_builder_end_object(b);
        }
        json_builder_end_array(b);
        bindings_json(g, b);
        if (hk)
                hostkey_json(b, hk);
        json_builder_set_member_name(b, "alarms");
        if (alarms >= 0)
                json_builder_add_int_value(b, alarms);
        else
                json_builder_add_null_value(b);
        json_builder_end_object(b);
        nkpctl_print_json(json_builder_get_root(b));
}

static void status_text(NkpctlGlobals *g, const nkp_host_status *st, int alarms,
                        const nkp_hostkey_status *hk)
{
        const char *tcti = nkp_context_tcti(g->ctx);
        if (!nkp_host_status_tpm_in_use(st))
                printf("TPM:              none (KDKs rest unsealed in the 0600 store)\n");
        else if (nkp_host_status_tpm_answers(st))
                printf("TPM:              %s (answers; KDKs are sealed to it)\n", tcti);
        else
                printf("TPM:              %s (NOT ANSWERING: %s)\n", tcti,
                       nkp_host_status_tpm_error(st));
        size_t n = nkp_host_status_n_cached(st);
        printf("Cached providers: %zu\n", n);
        for (size_t i = 0; i < n; i++)
                printf("  %-24s %s%s\n", nkp_host_status_cached_name(st, i),
                       nkp_host_status_cached_key_id(st, i),
                       nkp_host_status_cached_deleted(st, i)
                               ? "  (deleted from the store; gone at reboot)"
                               : "");
        bindings_text(g);
        if (hk)
                hostkey_text(hk);
        if (alarms >= 0)
                printf("Alarms:           %d%s\n", alarms, alarms ? " (see nkpctl alarms)" : "");
        else
                printf("Alarms:           unknown\n");
}

static int host_status(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        g_autoptr(nkp_host_status) st = NULL;
        if (nkp_host_status_get(g->ctx, &st) < 0)
                return nkpctl_lib_error();
        int alarms = alarm_count(g);
        g_autoptr(nkp_hostkey_status) hk = NULL;
        if (nkp_hostkey_status_get(g->ctx, &hk) < 0)
                fprintf(stderr, "nkpctl: warning: %s\n", nkp_error_message());
        if (g->json)
                status_json(g, st, alarms, hk);
        else
                status_text(g, st, alarms, hk);
        if (hk && nkp_hostkey_status_fstrim(hk) && nkp_hostkey_fstrim_said(g->ctx) < 0)
                fprintf(stderr, "nkpctl: warning: %s\n", nkp_error_message());
        return 0;
}

static int host_flush(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        size_t n = 0;
        if (nkp_host_flush_cache(g->ctx, &n) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "flushed");
                json_builder_add_int_value(b, (gint64) n);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("Forgot %zu unsealed provider key%s; VMs that need them stay locked until "
                       "the keys are unsealed again.\n",
                       n, n == 1 ? "" : "s");
        }
        return 0;
}

static int host_unlock(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        return nkpctl_host_unlock(g);
}

/* ---- host protect (issues 14/15) ------------------------------------------- */

static char *opt_protect_provider, *opt_protect_dir;

static void print_hostkey(NkpctlGlobals *g, const char *title)
{
        g_autoptr(nkp_hostkey_status) hk = NULL;
        if (nkp_hostkey_status_get(g->ctx, &hk) < 0) {
                fprintf(stderr, "nkpctl: warning: %s\n", nkp_error_message());
                return;
        }
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                hostkey_json(b, hk);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
                return;
        }
        if (!nkp_hostkey_status_provider(hk)) {
                printf("Nothing is protected by the host key any more.\n");
                return;
        }
        printf("%s '%s':\n", title, nkp_hostkey_status_provider(hk));
        for (size_t i = 0; i < nkp_hostkey_status_n_dirs(hk); i++)
                printf("  %-32s %s\n", nkp_hostkey_status_dir(hk, i),
                       nkp_hostkey_status_dir_state(hk, i));
        if (nkp_hostkey_status_fstrim(hk))
                printf("Their old clear copies were removed, not erased: run fstrim on %s.\n",
                       nkp_hostkey_status_fstrim(hk));
}

static int host_protect(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        if (nkp_host_protect(g->ctx, opt_protect_provider, opt_protect_dir) < 0)
                return nkpctl_lib_error();
        print_hostkey(g, "Protected by the host key of provider");
        return 0;
}

static char *opt_unprotect_dir;

static int host_unprotect(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        if (nkp_host_unprotect(g->ctx, opt_unprotect_dir) < 0)
                return nkpctl_lib_error();
        print_hostkey(g, "Still protected by the host key of provider");
        return 0;
}

static const GOptionEntry unprotect_options[] = {
        { "dir", 0, 0, G_OPTION_ARG_STRING, &opt_unprotect_dir,
          "The directory to turn back to plain (default: every protected directory)", "DIR" },
        G_OPTION_ENTRY_NULL,
};

/* The boot unit's verb: no libvirt connection (libvirtd starts after it). */
static int host_load_key(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        int r = nkp_host_key_load(g->ctx);
        if (r < 0)
                return nkpctl_lib_error();
        if (!g->json)
                printf(r > 0 ? "Host key added: the protected directories are unlocked.\n"
                             : "Nothing is protected by the host key.\n");
        else
                print_hostkey(g, "");
        return 0;
}

static const GOptionEntry protect_options[] = {
        { "provider", 0, 0, G_OPTION_ARG_STRING, &opt_protect_provider,
          "The provider the host key comes from (default: the one already used, else the "
          "host's default)", "NAME" },
        { "dir", 0, 0, G_OPTION_ARG_STRING, &opt_protect_dir,
          "The directory to protect (default: [vtpm] state_dir, /var/lib/libvirt/qemu/save, "
          "dump, nvram and nkp-saves)",
          "DIR" },
        G_OPTION_ENTRY_NULL,
};

const NkpctlCommand nkpctl_host_commands[] = {
        { "host", "status", "",
          "Show the TPM, the key cache and the alarm count.",
          "The TPM in use and whether it answers, the cached providers (names and key ids, never "
          "key bytes), the directories protected by the host key and their state, the number "
          "of alarms.", NULL, 0, 0, host_status },
        { "host", "unlock", "",
          "Re-check locked VMs after a provider restore.",
          "Adds the host key (its directories unlock, the hostkey-locked alarms go), clears the "
          "vm-locked alarm of each VM whose provider is back; exits 1 while some "
          "stay locked.", NULL, 0, 0, host_unlock },
        { "host", "flush-cache", "", "Forget every unsealed provider key now.",
          NULL, NULL, 0, 0, host_flush },
        { "host", "protect", "",
          "Encrypt libvirt's state directories at rest with the host key.",
          "The host key is derived from a provider (backed up) and this host's id; the kernel's "
          "file encryption (fscrypt: ext4 with the 'encrypt' feature, f2fs) encrypts, by "
          "default, the swtpm state directory, libvirt's managed-save, dump and NVRAM "
          "directories and /var/lib/libvirt/qemu/nkp-saves (for virsh save/dump files), or DIR. "
          "Missing directories are made as libvirt makes them. A directory holding files is "
          "converted crash-safely (rerun after an interruption), refused while VMs run. The key "
          "is added again at every boot (nkp-host-unlock.service), by nkpd, nkpctl host unlock "
          "or the first VM start; while it is missing every VM start is refused.",
          protect_options, 0, 0, host_protect },
        { "host", "unprotect", "",
          "Turn the host key's protection off (default: for every directory).",
          "Each directory becomes plain again with the same files, crash-safely (rerun after an "
          "interruption); refused while VMs run. The host key must be available (restore its "
          "provider first).",
          unprotect_options, 0, 0, host_unprotect },
        { "host", "load-key", "",
          "Add the host key to the kernel (at boot, before libvirtd).",
          "What nkp-host-unlock.service runs: derives the host key from its provider (TPM or key "
          "cache) and adds it, without talking to libvirt. Exits 1, the directories staying "
          "locked, when the provider is missing.", NULL, 0, 0, host_load_key },
        { 0 },
};

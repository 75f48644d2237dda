/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Where nkp's files are, and its config (ROOT/etc/nkp/nkp.conf, GKeyFile):
 *
 *   [tpm]
 *   tcti = device:/dev/tpmrm0 | swtpm:host=…,port=… | none
 *
 *   [migration]
 *   allow_plain = false | true   receive nkp VMs on a host whose libvirt does
 *                                not force TLS for migrations (default false:
 *                                refused, see docs/migration.md)
 *   qemu_conf = PATH             libvirt's qemu.conf, where the hook reads
 *                                migrate_tls_force (default
 *                                ROOT/etc/libvirt/qemu.conf)
 *
 *   [vtpm]                       (issue 7: vTPMs made by virt-manager & co.)
 *   policy = enrol | require | off
 *                                enrol (default): nkpd enrols a plain
 *                                emulator vTPM with no state yet, with the
 *                                default provider, and the hook refuses to
 *                                start one before that; require: the hook
 *                                refuses every unencrypted vTPM start, nothing
 *                                is enrolled automatically; off: plain vTPMs
 *                                are not nkp's business
 *   swtpm_user = tss             libvirt's swtpm_user: the only non-root user
 *                                nkpd's certificate signer answers
 *   state_dir = PATH             libvirt's swtpm state (default
 *                                /var/lib/libvirt/swtpm); the one place nkp
 *                                (vm encrypt/decrypt/rekey --deep, the hook,
 *                                nkpd) looks for vTPM state
 *
 *   [disks]                      (issue 15: new disks follow the VM)
 *   policy = enrol | require | off
 *                                enrol (default): nkpd encrypts a plain
 *                                qcow2 disk of an nkp VM while it is still
 *                                empty, and raises vm-plain-disk for one
 *                                that holds data; require: the same, and the
 *                                hook refuses to start an nkp VM with any
 *                                plain qcow2 disk; off: plain disks are not
 *                                nkp's business (see enrol.c)
 *
 * Unknown sections and keys are refused (check_config_keys), and so are a
 * section or a key given twice and a line that is not UTF-8 (check_config_lines):
 * GKeyFile lets the last duplicate win and reads a non-UTF-8 value as absent,
 * and either could leave keys unsealed without a word.  Comments go on
 * their own lines: GKeyFile keeps a '#' after a value as part of the value.
 *
 * Without a config the default TCTI is device:/dev/tpmrm0 when that device
 * exists under the root, else "none".  A TCTI set explicitly is a promise
 * that the TPM is there: if it then fails, nkp errors out instead of falling
 * back to keeping keys in the clear store. */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "nkp-private.h"

#define DEFAULT_TCTI "device:/dev/tpmrm0"

char *nkp_context_path(const nkp_context *ctx, const char *rel)
{
        return g_strconcat(ctx->root, rel, NULL);
}

static int load_migration_config(nkp_context *ctx, GKeyFile *kf)
{
        g_autoptr(GError) error = NULL;
        if (g_key_file_has_key(kf, "migration", "allow_plain", NULL)) {
                gboolean v = g_key_file_get_boolean(kf, "migration", "allow_plain", &error);
                if (error)
                        return nkp_fail(-EINVAL,
                                        "The config '%s' has a bad [migration] allow_plain= "
                                        "(write true or false).",
                                        ctx->conf_path);
                ctx->migration_allow_plain = v;
        }
        g_autofree char *qc = g_key_file_get_string(kf, "migration", "qemu_conf", NULL);
        if (qc) {
                g_strstrip(qc);
                if (!g_path_is_absolute(qc))
                        return nkp_fail(-EINVAL,
                                        "The config '%s' has a [migration] qemu_conf= that is "
                                        "not an absolute path.",
                                        ctx->conf_path);
                g_free(ctx->migration_qemu_conf);
                ctx->migration_qemu_conf = g_steal_pointer(&qc);
        }
        return 0;
}

/* A [disks] boolean `key` into *ret when the config sets it. */
static int load_disks_bool(nkp_context *ctx, GKeyFile *kf, const char *key, bool *ret)
{
        if (!g_key_file_has_key(kf, "disks", key, NULL))
                return 0;
        g_autoptr(GError) error = NULL;
        gboolean v = g_key_file_get_boolean(kf, "disks", key, &error);
        if (error)
                return nkp_fail(-EINVAL, "The config '%s' has a bad [disks] %s= (write true or "
                                         "false).",
                                ctx->conf_path, key);
        *ret = v;
        return 0;
}

/* [disks] allow_plain_layers (issue 16, vm-snapshot.c): whether a start of
 * an nkp VM with a plain layer in a disk chain goes on; seal_plain_layers:
 * whether nkpd seals a plain active layer of a running nkp VM under a LUKS
 * overlay (nkp_vm_seal_plain_tops). */
static int load_disks_plain_layers(nkp_context *ctx, GKeyFile *kf)
{
        int r = load_disks_bool(ctx, kf, "allow_plain_layers", &ctx->disks_allow_plain_layers);
        if (r < 0)
                return r;
        return load_disks_bool(ctx, kf, "seal_plain_layers", &ctx->disks_seal_plain_layers);
}

static int load_vtpm_config(nkp_context *ctx, GKeyFile *kf)
{
        g_autofree char *policy = g_key_file_get_string(kf, "vtpm", "policy", NULL);
        if (policy) {
                g_strstrip(policy);
                if (strcmp(policy, "enrol") == 0 || strcmp(policy, "enroll") == 0)
                        ctx->vtpm_policy = NKP_VTPM_POLICY_ENROL;
                else if (strcmp(policy, "require") == 0)
                        ctx->vtpm_policy = NKP_VTPM_POLICY_REQUIRE;
                else if (strcmp(policy, "off") == 0)
                        ctx->vtpm_policy = NKP_VTPM_POLICY_OFF;
                else
                        return nkp_fail(-EINVAL,
                                        "The config '%s' has [vtpm] policy=%s; write enrol, "
                                        "require or off.",
                                        ctx->conf_path, policy);
        }
        g_autofree char *user = g_key_file_get_string(kf, "vtpm", "swtpm_user", NULL);
        if (user) {
                g_strstrip(user);
                if (user[0]) {
                        g_free(ctx->vtpm_swtpm_user);
                        ctx->vtpm_swtpm_user = g_steal_pointer(&user);
                }
        }
        g_autofree char *dir = g_key_file_get_string(kf, "vtpm", "state_dir", NULL);
        if (dir) {
                g_strstrip(dir);
                if (!g_path_is_absolute(dir))
                        return nkp_fail(-EINVAL,
                                        "The config '%s' has a [vtpm] state_dir= that is not an "
                                        "absolute path.",
                                        ctx->conf_path);
                g_free(ctx->vtpm_state_dir);
                ctx->vtpm_state_dir = g_steal_pointer(&dir);
        }
        return 0;
}

static int load_disks_config(nkp_context *ctx, GKeyFile *kf)
{
        g_autofree char *policy = g_key_file_get_string(kf, "disks", "policy", NULL);
        if (!policy)
                return 0;
        g_strstrip(policy);
        if (strcmp(policy, "enrol") == 0 || strcmp(policy, "enroll") == 0)
                ctx->disks_policy = NKP_DISKS_POLICY_ENROL;
        else if (strcmp(policy, "require") == 0)
                ctx->disks_policy = NKP_DISKS_POLICY_REQUIRE;
        else if (strcmp(policy, "off") == 0)
                ctx->disks_policy = NKP_DISKS_POLICY_OFF;
        else
                return nkp_fail(-EINVAL, "The config '%s' has [disks] policy=%s; write enrol, "
                                         "require or off.",
                                ctx->conf_path, policy);
        return 0;
}

/* Every group and key nkp reads.  Anything else is a typo or a setting of
 * another version: refused, because a misspelt key silently left at its
 * default (a "tcit" that leaves provider keys unsealed, say) is worse than a
 * refusal that names it. */
static const struct {
        const char *group;
        const char *const keys[4];
} config_keys[] = {
        { "tpm", { "tcti", NULL } },
        { "migration", { "allow_plain", "qemu_conf", NULL } },
        { "vtpm", { "policy", "swtpm_user", "state_dir", NULL } },
        { "disks", { "policy", "allow_plain_layers", "seal_plain_layers", NULL } },
};

static int check_config_keys(const nkp_context *ctx, GKeyFile *kf)
{
        g_auto(GStrv) groups = g_key_file_get_groups(kf, NULL);
        for (char **g = groups; *g; g++) {
                const char *const *known = NULL;
                for (size_t i = 0; i < G_N_ELEMENTS(config_keys); i++)
                        if (strcmp(*g, config_keys[i].group) == 0)
                                known = config_keys[i].keys;
                if (!known)
                        return nkp_fail(-EINVAL,
                                        "The config '%s' has the unknown section [%s] (nkp reads "
                                        "[tpm], [migration], [vtpm] and [disks]).",
                                        ctx->conf_path, *g);
                g_auto(GStrv) keys = g_key_file_get_keys(kf, *g, NULL, NULL);
                for (char **k = keys; k && *k; k++) {
                        if (!g_strv_contains(known, *k)) {
                                g_autofree char *list = g_strjoinv(", ", (char **) known);
                                return nkp_fail(-EINVAL,
                                                "The config '%s' has the unknown key %s= in [%s] "
                                                "(known there: %s).",
                                                ctx->conf_path, *k, *g, list);
                        }
                        g_autofree char *v = g_key_file_get_value(kf, *g, *k, NULL);
                        if (v && (strstr(v, " #") || strstr(v, "\t#")))
                                return nkp_fail(-EINVAL,
                                                "The config '%s' has a '#' after the value of "
                                                "[%s] %s=; put comments on their own lines.",
                                                ctx->conf_path, *g, *k);
                }
        }
        return 0;
}

/* What GKeyFile would merge or drop without a word, by line: a section or
 * a key (in its section) seen before, and a line that is not UTF-8. */
static int check_config_lines(const nkp_context *ctx, const char *text)
{
        g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
        g_autoptr(GHashTable) seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        g_autofree char *group = NULL;
        for (guint n = 0; lines[n]; n++) {
                guint line = n + 1;
                if (!g_utf8_validate(lines[n], -1, NULL))
                        return nkp_fail(-EINVAL, "The config '%s': line %u is not UTF-8; write it "
                                                 "in UTF-8 (nkp reads no value from it).",
                                        ctx->conf_path, line);
                g_autofree char *l = g_strstrip(g_strdup(lines[n]));
                if (!l[0] || l[0] == '#')
                        continue;
                char *eq = strchr(l, '=');
                g_autofree char *id = NULL;
                if (l[0] == '[' && l[strlen(l) - 1] == ']') {
                        l[strlen(l) - 1] = '\0';
                        g_free(group);
                        group = g_strstrip(g_strdup(l + 1));
                        id = g_strconcat("[", group, "]", NULL);
                } else if (eq && group) {
                        *eq = '\0';
                        id = g_strconcat(group, "\n", g_strstrip(l), NULL);
                } else {
                        continue; /* GKeyFile says what is wrong with it */
                }
                guint first = GPOINTER_TO_UINT(g_hash_table_lookup(seen, id));
                if (first && id[0] == '[')
                        return nkp_fail(-EINVAL, "The config '%s', line %u: the section [%s] "
                                                 "appears a second time (first on line %u); "
                                                 "merge them into one.",
                                        ctx->conf_path, line, group, first);
                if (first)
                        return nkp_fail(-EINVAL, "The config '%s', line %u: [%s] %s= is set a "
                                                 "second time (first on line %u); keep one.",
                                        ctx->conf_path, line, group, l, first);
                g_hash_table_insert(seen, g_steal_pointer(&id), GUINT_TO_POINTER(line));
        }
        return 0;
}

#define CONFIG_MAX (64 * 1024)

static int load_config(nkp_context *ctx)
{
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(GError) error = NULL;
        g_autofree char *text = NULL;
        gsize len = 0;

        /* Read as GKeyFile did (a symlinked config is fine), then checked. */
        if (!g_file_get_contents(ctx->conf_path, &text, &len, &error)) {
                if (g_error_matches(error, G_FILE_ERROR, G_FILE_ERROR_NOENT))
                        return 0;
                return nkp_fail(-EINVAL, "Cannot read the config '%s': %s.", ctx->conf_path,
                                error->message);
        }
        if (len > CONFIG_MAX || strlen(text) != len)
                return nkp_fail(-EINVAL, "The config '%s' is not a text file of at most %d bytes.",
                                ctx->conf_path, CONFIG_MAX);
        int r = check_config_lines(ctx, text);
        if (r < 0)
                return r;
        if (!g_key_file_load_from_data(kf, text, len, G_KEY_FILE_NONE, &error))
                return nkp_fail(-EINVAL, "Cannot read the config '%s': %s.", ctx->conf_path,
                                error->message);
        r = check_config_keys(ctx, kf);
        if (r < 0)
                return r;
        g_autofree char *tcti = g_key_file_get_string(kf, "tpm", "tcti", NULL);
        if (tcti) {
                g_strstrip(tcti);
                if (tcti[0] == '\0')
                        return nkp_fail(-EINVAL, "The config '%s' has an empty [tpm] tcti=.",
                                        ctx->conf_path);
                g_free(ctx->tcti);
                ctx->tcti = g_steal_pointer(&tcti);
                ctx->tcti_explicit = strcmp(ctx->tcti, "none") != 0;
        }
        r = load_migration_config(ctx, kf);
        if (r < 0)
                return r;
        r = load_vtpm_config(ctx, kf);
        if (r < 0)
                return r;
        r = load_disks_config(ctx, kf);
        if (r < 0)
                return r;
        return load_disks_plain_layers(ctx, kf);
}

int nkp_context_new(const char *root, nkp_context **ret)
{
        g_autoptr(nkp_context) ctx = g_new0(nkp_context, 1);

        if (!root || root[0] == '\0')
                root = "/";
        g_autofree char *abs = g_canonicalize_filename(root, NULL);
        ctx->root = strcmp(abs, "/") == 0 ? g_strdup("") : g_steal_pointer(&abs);
        ctx->store_dir = nkp_context_path(ctx, "/var/lib/nkp");
        ctx->store_path = nkp_context_path(ctx, "/var/lib/nkp/providers.ini");
        ctx->lock_path = nkp_context_path(ctx, "/var/lib/nkp/.lock");
        ctx->alarms_path = nkp_context_path(ctx, "/var/lib/nkp/alarms.ini");
        ctx->conf_path = nkp_context_path(ctx, "/etc/nkp/nkp.conf");
        ctx->run_dir = nkp_context_path(ctx, "/run/nkp");
        ctx->migration_qemu_conf = nkp_context_path(ctx, "/etc/libvirt/qemu.conf");
        ctx->vtpm_policy = NKP_VTPM_POLICY_ENROL;
        ctx->vtpm_swtpm_user = g_strdup("tss");
        ctx->vtpm_state_dir = g_strdup("/var/lib/libvirt/swtpm");
        ctx->disks_policy = NKP_DISKS_POLICY_ENROL;
        ctx->disks_seal_plain_layers = true;

        g_autofree char *dev = nkp_context_path(ctx, "/dev/tpmrm0");
        ctx->tcti = g_strdup(access(dev, F_OK) == 0 ? DEFAULT_TCTI : "none");

        int r = load_config(ctx);
        if (r < 0)
                return r;
        *ret = g_steal_pointer(&ctx);
        return 0;
}

void nkp_context_free(nkp_context *ctx)
{
        if (!ctx)
                return;
        g_free(ctx->root);
        g_free(ctx->store_dir);
        g_free(ctx->store_path);
        g_free(ctx->lock_path);
        g_free(ctx->alarms_path);
        g_free(ctx->conf_path);
        g_free(ctx->run_dir);
        g_free(ctx->tcti);
        g_free(ctx->migration_qemu_conf);
        g_free(ctx->vtpm_swtpm_user);
        g_free(ctx->vtpm_state_dir);
        g_free(ctx);
}

const char *nkp_context_root(const nkp_context *ctx)
{
        return ctx->root[0] ? ctx->root : "/";
}

const char *nkp_context_tcti(const nkp_context *ctx)
{
        return ctx->tcti;
}

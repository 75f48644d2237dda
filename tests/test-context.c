/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* context.c: the paths under a root, and the config (ROOT/etc/nkp/nkp.conf):
 * defaults, every setting, and every refusal (one line naming the file,
 * no context returned). */
#include <errno.h>
#include <string.h>

#include "testutil.h"

typedef struct {
        char *root;
        char *conf;
} Fixture;

static void fixture_set_up(Fixture *f, gconstpointer data)
{
        (void) data;
        f->root = testutil_mkdtemp();
        g_autofree char *etc = g_build_filename(f->root, "etc", "nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(etc, 0700), ==, 0);
        f->conf = g_build_filename(etc, "nkp.conf", NULL);
        g_unsetenv("NKP_SWTPM_STATE_DIR");
}

static void fixture_tear_down(Fixture *f, gconstpointer data)
{
        (void) data;
        testutil_rmtree(f->root);
        g_free(f->root);
        g_free(f->conf);
}

static void set_conf(Fixture *f, const char *text)
{
        g_assert_true(g_file_set_contents(f->conf, text, -1, NULL));
}

static nkp_context *open_ok(Fixture *f)
{
        nkp_context *ctx = NULL;
        int r = nkp_context_new(f->root, &ctx);
        if (r < 0)
                g_error("nkp_context_new: %d (%s)", r, nkp_error_message());
        return ctx;
}

static void test_defaults(Fixture *f, gconstpointer data)
{
        (void) data;
        nkp_context *ctx = open_ok(f); /* no config file at all */
        g_assert_cmpstr(nkp_context_root(ctx), ==, f->root);
        g_assert_cmpstr(nkp_context_tcti(ctx), ==, "none"); /* no ROOT/dev/tpmrm0 */
        g_assert_false(ctx->tcti_explicit);
        g_autofree char *store = g_build_filename(f->root, "var/lib/nkp/providers.ini", NULL);
        g_assert_cmpstr(ctx->store_path, ==, store);
        g_autofree char *qc = g_build_filename(f->root, "etc/libvirt/qemu.conf", NULL);
        g_assert_cmpstr(ctx->migration_qemu_conf, ==, qc);
        g_assert_false(ctx->migration_allow_plain);
        g_assert_cmpint(ctx->vtpm_policy, ==, NKP_VTPM_POLICY_ENROL);
        g_assert_cmpstr(ctx->vtpm_swtpm_user, ==, "tss");
        g_assert_cmpstr(ctx->vtpm_state_dir, ==, "/var/lib/libvirt/swtpm");
        g_assert_cmpint(ctx->disks_policy, ==, NKP_DISKS_POLICY_ENROL);
        nkp_context_free(ctx);

        /* A TPM device under the root: it is the default TCTI, not explicit. */
        g_autofree char *dev = g_build_filename(f->root, "dev", NULL);
        g_autofree char *rm0 = g_build_filename(dev, "tpmrm0", NULL);
        g_assert_cmpint(g_mkdir_with_parents(dev, 0700), ==, 0);
        g_assert_true(g_file_set_contents(rm0, "", 0, NULL));
        ctx = open_ok(f);
        g_assert_cmpstr(nkp_context_tcti(ctx), ==, "device:/dev/tpmrm0");
        g_assert_false(ctx->tcti_explicit);
        nkp_context_free(ctx);
}

static void test_every_setting(Fixture *f, gconstpointer data)
{
        (void) data;
        set_conf(f, "# a comment\n"
                    "[tpm]\n"
                    "tcti = swtpm:host=127.0.0.1,port=2321\n"
                    "[migration]\n"
                    "allow_plain = true\n"
                    "qemu_conf = /srv/qemu.conf\n"
                    "[vtpm]\n"
                    "# require: refuse plain vTPMs\n"
                    "policy = require\n"
                    "swtpm_user = swtpm\n"
                    "state_dir = /srv/swtpm\n"
                    "[disks]\n"
                    "policy = require\n");
        nkp_context *ctx = open_ok(f);
        g_assert_cmpstr(nkp_context_tcti(ctx), ==, "swtpm:host=127.0.0.1,port=2321");
        g_assert_true(ctx->tcti_explicit);
        g_assert_true(ctx->migration_allow_plain);
        g_assert_cmpstr(ctx->migration_qemu_conf, ==, "/srv/qemu.conf");
        g_assert_cmpint(ctx->vtpm_policy, ==, NKP_VTPM_POLICY_REQUIRE);
        g_assert_cmpstr(ctx->vtpm_swtpm_user, ==, "swtpm");
        g_assert_cmpstr(ctx->vtpm_state_dir, ==, "/srv/swtpm");
        g_assert_cmpint(ctx->disks_policy, ==, NKP_DISKS_POLICY_REQUIRE);
        nkp_context_free(ctx);

        /* The config is the only source: the environment variable that
         * once overrode it (and hid that vm encrypt ignored the config)
         * is gone. */
        g_setenv("NKP_SWTPM_STATE_DIR", "/elsewhere", TRUE);
        ctx = open_ok(f);
        g_assert_cmpstr(ctx->vtpm_state_dir, ==, "/srv/swtpm");
        nkp_context_free(ctx);
        g_unsetenv("NKP_SWTPM_STATE_DIR");

        /* [disks] policy=off, and [vtpm] left at its default beside it. */
        set_conf(f, "[disks]\npolicy = off\n");
        ctx = open_ok(f);
        g_assert_cmpint(ctx->disks_policy, ==, NKP_DISKS_POLICY_OFF);
        g_assert_cmpint(ctx->vtpm_policy, ==, NKP_VTPM_POLICY_ENROL);
        nkp_context_free(ctx);

        /* "enroll" is accepted for "enrol"; "none" is not an explicit TPM. */
        set_conf(f, "[tpm]\ntcti=none\n[vtpm]\npolicy=enroll\n[disks]\npolicy=enroll\n");
        ctx = open_ok(f);
        g_assert_cmpint(ctx->vtpm_policy, ==, NKP_VTPM_POLICY_ENROL);
        g_assert_cmpint(ctx->disks_policy, ==, NKP_DISKS_POLICY_ENROL);
        g_assert_false(ctx->tcti_explicit);
        nkp_context_free(ctx);
}

static void test_refused(Fixture *f, gconstpointer data)
{
        (void) data;
        static const struct {
                const char *what, *text, *needle;
        } cases[] = {
                { "not a key file", "tcti = none\n", "Cannot read the config" },
                { "unknown section", "[tmp]\ntcti=none\n", "unknown section [tmp]" },
                { "misspelt key", "[tpm]\ntcit=none\n", "unknown key tcit= in [tpm] (known there: tcti)" },
                { "key in the wrong section", "[vtpm]\ntcti=none\n", "unknown key tcti= in [vtpm]" },
                { "comment after a value", "[tpm]\ntcti = device:/dev/tpmrm0   # the TPM\n",
                  "comments on their own lines" },
                { "empty tcti", "[tpm]\ntcti=\n", "empty [tpm] tcti=" },
                { "bad boolean", "[migration]\nallow_plain=maybe\n", "allow_plain" },
                { "relative qemu_conf", "[migration]\nqemu_conf=qemu.conf\n", "qemu_conf" },
                { "unknown policy", "[vtpm]\npolicy=sometimes\n", "policy=sometimes" },
                { "relative state_dir", "[vtpm]\nstate_dir=swtpm\n", "state_dir" },
                { "unknown disks policy", "[disks]\npolicy=always\n",
                  "[disks] policy=always; write enrol, require or off" },
                { "misspelt disks key", "[disks]\npolicey=off\n",
                  "unknown key policey= in [disks] (known there: policy, allow_plain_layers, "
                  "seal_plain_layers)" },
                { "bad seal_plain_layers", "[disks]\nseal_plain_layers=maybe\n",
                  "bad [disks] seal_plain_layers= (write true or false)" },
                { "disks policy twice", "[disks]\npolicy=require\npolicy=off\n",
                  "line 3: [disks] policy= is set a second time" },
                { "[disk] for [disks]", "[disk]\npolicy=off\n", "unknown section [disk]" },
                /* Duplicates: GKeyFile lets the last one win, silently. */
                { "tcti twice (the second unseals)", "[tpm]\ntcti=device:/dev/tpmrm0\ntcti=none\n",
                  "line 3: [tpm] tcti= is set a second time (first on line 2)" },
                { "tcti twice, same value", "[tpm]\ntcti=none\n\n# again\ntcti = none\n",
                  "line 5: [tpm] tcti= is set a second time (first on line 2)" },
                { "[tpm] twice", "[tpm]\ntcti=device:/dev/tpmrm0\n[vtpm]\npolicy=enrol\n[tpm]\ntcti=none\n",
                  "line 5: the section [tpm] appears a second time (first on line 1)" },
                { "[tpm] twice, spaced", "[tpm]\n[ tpm ]\n", "line 2: the section [tpm] appears a second time" },
                { "policy twice", "[vtpm]\npolicy=require\npolicy=off\n",
                  "line 3: [vtpm] policy= is set a second time" },
                { "allow_plain twice", "[migration]\nallow_plain=false\nallow_plain=true\n",
                  "line 3: [migration] allow_plain= is set a second time" },
                /* Not UTF-8: GKeyFile reads no value, the default stays. */
                { "tcti not UTF-8", "[tpm]\ntcti=device:/dev/tpm\xff\n", "line 2 is not UTF-8" },
                { "policy not UTF-8", "[vtpm]\npolicy=requir\xe9\n", "line 2 is not UTF-8" },
                { "section name not UTF-8", "[tpm]\ntcti=none\n[\xc3(]\n", "line 3 is not UTF-8" },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                g_test_message("case: %s", cases[i].what);
                set_conf(f, cases[i].text);
                g_autoptr(GHashTable) before = testutil_snapshot_tree(f->root);
                nkp_context *ctx = NULL;
                g_assert_cmpint(nkp_context_new(f->root, &ctx), ==, -EINVAL);
                g_assert_null(ctx);
                testutil_assert_same_tree(before, f->root);
                const char *msg = nkp_error_message();
                g_test_message("refused: %s", msg);
                g_assert_nonnull(strstr(msg, f->conf));
                g_assert_null(strchr(msg, '\n'));
                if (!strstr(msg, cases[i].needle))
                        g_error("'%s': message '%s' lacks '%s'", cases[i].what, msg, cases[i].needle);
        }
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
#define ADD(path, fn) g_test_add(path, Fixture, NULL, fixture_set_up, fn, fixture_tear_down)
        ADD("/context/defaults", test_defaults);
        ADD("/context/every-setting", test_every_setting);
        ADD("/context/refused", test_refused);
        return g_test_run();
}

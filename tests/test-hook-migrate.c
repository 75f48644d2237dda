/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The hook's migrate step (libvirt-hooks/nkp-hook.c, `migrate begin` on a
 * destination) without a libvirtd: a throwaway root with a real provider, a
 * domain XML whose keysafe that provider opens, and the hook program run on
 * it ($NKP_HOOK).  Every refusal must happen before any libvirt call; the
 * libvirt URI points at a socket that does not exist, so "got as far as
 * handing the keys to libvirt" is told apart from a refusal by the message.
 * Covers: missing provider, drift (same name, another key), a tampered
 * wrapped DEK, the TLS policy (qemu.conf migrate_tls_force, first
 * assignment wins, comments), [migration] allow_plain, a bad config value,
 * the migration-refused alarm. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

#define VM_UUID "6f1c3a52-9d0e-4b8a-a1f2-0c3d4e5f6a7b"
#define SEC_TPM "11111111-2222-4333-8444-555555555555"

typedef struct {
        char *root;
        nkp_context *ctx;
        char *xml; /* domain XML protected by provider p1 of `root` */
} Fixture;

static const char domain_head[] =
        "<domain type='qemu'>\n"
        "  <name>mig1</name>\n"
        "  <uuid>" VM_UUID "</uuid>\n";
static const char domain_tail[] =
        "  <memory unit='KiB'>262144</memory>\n"
        "  <devices>\n"
        "    <tpm model='tpm-crb'>\n"
        "      <backend type='emulator' version='2.0'><encryption secret='" SEC_TPM "'/></backend>\n"
        "    </tpm>\n"
        "  </devices>\n"
        "</domain>\n";

static void write_file(const char *root, const char *rel, const char *text)
{
        g_autofree char *path = g_strconcat(root, rel, NULL);
        g_autofree char *dir = g_path_get_dirname(path);
        g_assert_cmpint(g_mkdir_with_parents(dir, 0700), ==, 0);
        g_assert_true(g_file_set_contents(path, text, -1, NULL));
        g_assert_cmpint(chmod(path, 0600), ==, 0);
}

static void fixture_set_up(Fixture *f, gconstpointer data)
{
        (void) data;
        f->root = testutil_mkdtemp();
        write_file(f->root, "/etc/nkp/nkp.conf", "[tpm]\ntcti=none\n");
        g_assert_cmpint(nkp_context_new(f->root, &f->ctx), ==, 0);
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_create(f->ctx, "p1", 0, &p), ==, 0);
        g_autoptr(nkp_secret) kdk = NULL, kek = NULL, dek = NULL;
        g_assert_cmpint(nkp_provider_get_kdk(f->ctx, nkp_provider_key_id(p), &kdk), ==, 0);
        g_autoptr(nkp_keysafe) ks = NULL;
        g_assert_cmpint(nkp_keysafe_new(VM_UUID, p, &ks), ==, 0);
        g_assert_cmpint(nkp_kek_derive(kdk, nkp_keysafe_kek_salt(ks), nkp_provider_key_id(p),
                                       VM_UUID, &kek),
                        ==, 0);
        g_assert_cmpint(nkp_secret_new_random(NKP_DEK_SIZE, &dek), ==, 0);
        g_assert_cmpint(nkp_keysafe_put_dek(ks, kek, NKP_OBJECT_VTPM, "vtpm", SEC_TPM, dek), ==, 0);
        char *ksxml = NULL;
        g_assert_cmpint(nkp_keysafe_format(ks, &ksxml), ==, 0);
        f->xml = g_strconcat(domain_head, "  <metadata>", ksxml, "</metadata>\n", domain_tail,
                             NULL);
        free(ksxml);
}

static void fixture_tear_down(Fixture *f, gconstpointer data)
{
        (void) data;
        (void) nkp_cache_flush(f->ctx);
        nkp_context_free(f->ctx);
        testutil_rmtree(f->root);
        g_free(f->root);
        g_free(f->xml);
}

/* Runs the hook `mig1 migrate begin -` with `xml` on stdin; returns the
 * exit status, stderr in *err; asserts stdout is empty and a failure is
 * exactly one line. */
static int open_tmp(const Fixture *f, const char *name, const char *content)
{
        g_autofree char *path = g_build_filename(f->root, name, NULL);
        g_assert_true(g_file_set_contents(path, content, -1, NULL));
        int fd = open(path, O_RDWR | O_CLOEXEC);
        g_assert_cmpint(fd, >=, 0);
        return fd;
}

static char *slurp(const Fixture *f, const char *name)
{
        g_autofree char *path = g_build_filename(f->root, name, NULL);
        char *text = NULL;
        g_assert_true(g_file_get_contents(path, &text, NULL, NULL));
        return text;
}

static int run_hook(const Fixture *f, const char *xml, char **err)
{
        const char *hook = g_getenv("NKP_HOOK");
        g_assert_nonnull(hook);
        g_autofree char *uri = g_strdup_printf("qemu+unix:///system?socket=%s/no-such-socket",
                                               f->root);
        g_auto(GStrv) env = g_get_environ();
        env = g_environ_setenv(env, "NKP_ROOT", f->root, TRUE);
        env = g_environ_setenv(env, "NKP_LIBVIRT_URI", uri, TRUE);
        env = g_environ_setenv(env, "NKP_HOOK_TIMEOUT", "10", TRUE);
        const char *argv[] = { hook, "mig1", "migrate", "begin", "-", NULL };
        int in = open_tmp(f, "hook.in", xml);
        int out = open_tmp(f, "hook.out", "");
        int errfd = open_tmp(f, "hook.err", "");
        GPid pid = 0;
        g_autoptr(GError) error = NULL;
        g_assert_true(g_spawn_async_with_pipes_and_fds(NULL, argv, (const char *const *) env,
                                                       G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL,
                                                       in, out, errfd, NULL, NULL, 0, &pid, NULL,
                                                       NULL, NULL, &error));
        g_assert_no_error(error);
        int status = 0;
        g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
        close(in);
        close(out);
        close(errfd);
        g_assert_true(WIFEXITED(status));
        int rc = WEXITSTATUS(status);
        g_autofree char *stdout_text = slurp(f, "hook.out");
        g_assert_cmpstr(stdout_text, ==, "");
        *err = slurp(f, "hook.err");
        if (rc != 0) {
                const char *nl = strchr(*err, '\n');
                g_assert_nonnull(nl);
                g_assert_cmpint(nl[1], ==, '\0');
        }
        g_test_message("hook: rc %d: %s", rc, *err);
        return rc;
}

/* Refused by the TLS policy? (Else it went on to libvirt, which is absent.) */
static bool tls_refused(const char *err)
{
        return strstr(err, "only move between hosts that force TLS") != NULL;
}

static void test_tls_policy(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *err = NULL;

        /* no qemu.conf: libvirt's default (0) */
        g_assert_cmpint(run_hook(f, f->xml, &err), ==, 1);
        g_assert_true(tls_refused(err));
        g_assert_nonnull(strstr(err, "VM 'mig1' cannot be migrated to host '"));
        g_assert_nonnull(strstr(err, "migrate_tls_force = 1"));
        g_assert_nonnull(strstr(err, "allow_plain = true"));

        const struct {
                const char *conf;
                bool forced;
        } cases[] = {
                { "#migrate_tls_force = 1\n", false },
                { "migrate_tls_force = 0\n", false },
                { "migrate_tls_force=1\n", true },
                { "  migrate_tls_force = 1   # forced\n", true },
                { "migrate_tls_force = 0\nmigrate_tls_force = 1\n", false }, /* first wins */
                { "migrate_tls_force_other = 1\n", false },
                { "user = \"root\"\nmigrate_tls_force = 1\n", true },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                write_file(f->root, "/etc/libvirt/qemu.conf", cases[i].conf);
                g_clear_pointer(&err, g_free);
                g_assert_cmpint(run_hook(f, f->xml, &err), ==, 1); /* no libvirt either way */
                g_assert_cmpint(tls_refused(err), ==, !cases[i].forced);
        }

        /* allow_plain = true: the policy lets it through (on to libvirt) */
        write_file(f->root, "/etc/libvirt/qemu.conf", "migrate_tls_force = 0\n");
        write_file(f->root, "/etc/nkp/nkp.conf", "[tpm]\ntcti=none\n[migration]\nallow_plain=true\n");
        g_clear_pointer(&err, g_free);
        g_assert_cmpint(run_hook(f, f->xml, &err), ==, 1);
        g_assert_false(tls_refused(err));

        /* a bad value is an error, never "allowed" */
        write_file(f->root, "/etc/nkp/nkp.conf", "[tpm]\ntcti=none\n[migration]\nallow_plain=maybe\n");
        g_clear_pointer(&err, g_free);
        g_assert_cmpint(run_hook(f, f->xml, &err), ==, 1);
        g_assert_nonnull(strstr(err, "allow_plain"));

        /* qemu_conf = elsewhere */
        write_file(f->root, "/srv/qemu.conf", "migrate_tls_force = 1\n");
        g_autofree char *conf = g_strdup_printf(
                "[tpm]\ntcti=none\n[migration]\nqemu_conf=%s/srv/qemu.conf\n", f->root);
        write_file(f->root, "/etc/nkp/nkp.conf", conf);
        g_clear_pointer(&err, g_free);
        g_assert_cmpint(run_hook(f, f->xml, &err), ==, 1);
        g_assert_false(tls_refused(err));
}

static bool has_alarm(nkp_context *ctx, const char *kind, const char *subject)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_alarm_list(ctx, &list, &n), ==, 0);
        bool found = false;
        for (size_t i = 0; i < n; i++)
                if (strcmp(nkp_alarm_kind(list[i]), kind) == 0 &&
                    strcmp(nkp_alarm_subject(list[i]), subject) == 0)
                        found = true;
        nkp_alarm_list_free(list, n);
        return found;
}

static void test_providers(Fixture *f, gconstpointer data)
{
        (void) data;
        write_file(f->root, "/etc/libvirt/qemu.conf", "migrate_tls_force = 1\n");
        g_autofree char *err = NULL;

        /* tampered: one bit of the wrapped DEK */
        g_autofree char *bad = g_strdup(f->xml);
        char *w = strstr(bad, "wrapped=");
        g_assert_nonnull(w);
        w += strlen("wrapped=\"") + 20;
        *w = *w == 'A' ? 'B' : 'A';
        g_assert_cmpint(run_hook(f, bad, &err), ==, 1);
        g_assert_nonnull(strstr(err, "altered or damaged"));
        g_assert_true(has_alarm(f->ctx, "migration-refused", "mig1"));

        /* drift: p1 is now another key */
        g_assert_cmpint(nkp_provider_delete(f->ctx, "p1", 0, true), ==, 0);
        (void) nkp_cache_flush(f->ctx);
        g_autoptr(nkp_provider) other = NULL;
        g_assert_cmpint(nkp_provider_create(f->ctx, "p1", 0, &other), ==, 0);
        g_clear_pointer(&err, g_free);
        g_assert_cmpint(run_hook(f, f->xml, &err), ==, 1);
        g_assert_nonnull(strstr(err, "provider drift: the provider 'p1' here is another key"));
        g_assert_nonnull(strstr(err, "nkpctl provider delete p1"));

        /* missing */
        g_assert_cmpint(nkp_provider_delete(f->ctx, "p1", 0, true), ==, 0);
        (void) nkp_cache_flush(f->ctx);
        g_clear_pointer(&err, g_free);
        g_assert_cmpint(run_hook(f, f->xml, &err), ==, 1);
        g_assert_nonnull(strstr(err, "its key provider 'p1'"));
        g_assert_nonnull(strstr(err, "is not on this host"));
        g_assert_nonnull(strstr(err, "nkpctl provider restore"));
        g_assert_true(has_alarm(f->ctx, "migration-refused", "mig1"));
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add("/hook-migrate/tls-policy", Fixture, NULL, fixture_set_up, test_tls_policy,
                   fixture_tear_down);
        g_test_add("/hook-migrate/providers", Fixture, NULL, fixture_set_up, test_providers,
                   fixture_tear_down);
        return g_test_run();
}

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* vTPM EK certificate requests (ekcert.c, nkp.h): swtpm_setup's argv parsed
 * (good, not nkp's, malformed: one line each), the in-process signer with
 * and without a ticket, the certificate file (name by type, no symlink),
 * and the client of nkpd's socket against a scripted server: every answer
 * kind, a missing socket that must not read as "not nkp's". */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "testutil.h"

#define VM_UUID "5b3e4f8a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
#define VMID "vm1:" VM_UUID

/* A throwaway root without a TPM (testutil.c). */
typedef TestutilRoot Fixture;
#define setup testutil_root_setup
#define teardown testutil_root_teardown

static char *rsa_ek_hex(void)
{
        EVP_PKEY *k = EVP_RSA_gen(2048);
        g_assert_nonnull(k);
        BIGNUM *n = NULL;
        g_assert_cmpint(EVP_PKEY_get_bn_param(k, OSSL_PKEY_PARAM_RSA_N, &n), ==, 1);
        uint8_t buf[256];
        g_assert_cmpint(BN_bn2binpad(n, buf, sizeof buf), ==, 256);
        BN_free(n);
        EVP_PKEY_free(k);
        char out[2 * sizeof buf + 1];
        nkp_hex_encode(buf, sizeof buf, out);
        return g_strdup(out);
}

/* swtpm_setup's argv (swtpm 0.7.1 call_create_certs), with `extra` appended. */
static GPtrArray *swtpm_argv(const char *type, const char *ek, const char *dir, const char *vmid,
                             const char *const *extra)
{
        GPtrArray *a = g_ptr_array_new();
        const char *base[] = { "nkp-swtpm-certs", "--type", type, "--ek", ek, "--dir", dir,
                               "--logfile", "/dev/null", "--tpm-spec-family", "2.0",
                               "--tpm-spec-level", "0", "--tpm-spec-revision", "164",
                               "--tpm-manufacturer", "id:00001014", "--tpm-model", "swtpm",
                               "--tpm-version", "id:20191023", "--tpm2" };
        for (size_t i = 0; i < G_N_ELEMENTS(base); i++)
                g_ptr_array_add(a, (char *) base[i]);
        if (vmid) {
                g_ptr_array_add(a, (char *) "--vmid");
                g_ptr_array_add(a, (char *) vmid);
        }
        for (size_t i = 0; extra && extra[i]; i++)
                g_ptr_array_add(a, (char *) extra[i]);
        g_ptr_array_add(a, NULL);
        return a;
}

static int parse(GPtrArray *a, nkp_ekcert_request **ret)
{
        return nkp_ekcert_request_from_argv((int) a->len - 1, (char *const *) a->pdata, ret);
}

static void assert_one_line(void)
{
        const char *m = nkp_error_message();
        g_assert_cmpstr(m, !=, "");
        g_assert_null(strchr(m, '\n'));
}

static void test_argv_good(void)
{
        const char *extra[] = { "--allow-signing", "--configfile", "/etc/swtpm-localca.conf", NULL };
        g_autoptr(GPtrArray) a = swtpm_argv("ek", "abcd", "/tmp", VMID, extra);
        g_autoptr(nkp_ekcert_request) req = NULL;
        g_assert_cmpint(parse(a, &req), ==, 0);
        g_assert_cmpstr(nkp_ekcert_request_type(req), ==, "ek");
        g_assert_cmpstr(nkp_ekcert_request_vmid(req), ==, VMID);
}

static void test_argv_not_nkps(void)
{
        struct {
                const char *vmid;
                bool tpm2;
        } cases[] = {
                { NULL, true },             /* swtpm_setup by hand: no --vmid */
                { "vm1", true },            /* no UUID at the end */
                { "vm1:not-a-uuid", true },
                { VMID, false },            /* TPM 1.2 */
        };
        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                g_autoptr(GPtrArray) a = swtpm_argv("ek", "abcd", "/tmp", cases[i].vmid, NULL);
                if (!cases[i].tpm2)
                        g_ptr_array_remove(a, (char *) "--tpm2");
                nkp_ekcert_request *req = NULL;
                g_assert_cmpint(parse(a, &req), ==, -ENOENT);
                g_assert_null(req);
        }
}

static void test_argv_bad(void)
{
        struct {
                const char *const argv[8];
                const char *msg;
        } cases[] = {
                { { "x", "stray", NULL }, "Unexpected argument 'stray'." },
                { { "x", "--tpm2", "--bogus", "1", NULL }, "Unknown option '--bogus'." },
                { { "x", "--tpm2", "--vmid", VMID, "--type", NULL }, "Option '--type' needs a value." },
                { { "x", "--tpm2", "--vmid", VMID, "--type", "ek", "--ek", NULL },
                  "Option '--ek' needs a value." },
                { { "x", "--tpm2", "--vmid", VMID, "--type", "ek", "--ek", "ab" },
                  "--type, --ek and --dir are required." },
                { { "x", "--tpm2", "--vmid", VMID, "--dir", "/tmp", "--ek", "ab" },
                  "--type, --ek and --dir are required." },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                int argc = 0;
                while (argc < 8 && cases[i].argv[argc])
                        argc++;
                nkp_ekcert_request *req = NULL;
                g_assert_cmpint(nkp_ekcert_request_from_argv(argc, (char *const *) cases[i].argv,
                                                             &req),
                                ==, -EINVAL);
                g_assert_null(req);
                assert_one_line();
                g_assert_cmpstr(nkp_error_message(), ==, cases[i].msg);
        }
}

static void ticket(Fixture *f, const char *key_id, unsigned ttl)
{
        g_assert_cmpint(nkp_ekca_ticket_write(f->ctx, VM_UUID, "vm1", key_id, ttl), ==, 0);
}

static X509 *read_cert(const char *path)
{
        g_autofree char *der = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(path, &der, &len, NULL));
        const unsigned char *p = (const unsigned char *) der;
        X509 *x = d2i_X509(NULL, &p, (long) len);
        g_assert_nonnull(x);
        return x;
}

static char *cert_text(X509 *x)
{
        BIO *b = BIO_new(BIO_s_mem());
        X509_print(b, x);
        char *data = NULL;
        long n = BIO_get_mem_data(b, &data);
        char *s = g_strndup(data, (gsize) n);
        BIO_free(b);
        return s;
}

static void test_sign_and_write(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_create(f->ctx, "ekp", 0, &p), ==, 0);
        g_autofree char *ek = rsa_ek_hex();
        g_autofree char *opts = g_build_filename(f->root, "localca.options", NULL);
        g_assert_true(g_file_set_contents(opts,
                                          "--platform-manufacturer Acme\n--platform-version 7.2\n",
                                          -1, NULL));
        const char *extra[] = { "--optsfile", opts, NULL };
        g_autoptr(GPtrArray) a = swtpm_argv("ek", ek, f->root, VMID, extra);
        g_autoptr(nkp_ekcert_request) req = NULL;
        g_assert_cmpint(parse(a, &req), ==, 0);

        uint8_t *der = NULL;
        size_t len = 0;
        char *provider = NULL;
        /* No ticket: not nkp's VM. */
        g_assert_cmpint(nkp_ekcert_sign(f->ctx, req, &der, &len, &provider), ==, -ENOENT);
        g_assert_null(der);
        /* Expired. */
        ticket(f, nkp_provider_key_id(p), 0);
        g_usleep(1100 * 1000);
        g_assert_cmpint(nkp_ekcert_sign(f->ctx, req, &der, &len, &provider), ==, -ETIMEDOUT);
        g_assert_nonnull(strstr(nkp_error_message(), "expired"));
        /* A provider that is not here. */
        ticket(f, "00000000-0000-4000-8000-00000000dead", 300);
        g_assert_cmpint(nkp_ekcert_sign(f->ctx, req, &der, &len, &provider), ==, -ENOKEY);
        g_assert_nonnull(strstr(nkp_error_message(), "provider restore"));
        g_assert_null(der);

        ticket(f, nkp_provider_key_id(p), 300);
        int r = nkp_ekcert_sign(f->ctx, req, &der, &len, &provider);
        if (r < 0)
                g_error("sign: %s", nkp_error_message());
        g_assert_cmpstr(provider, ==, "ekp");
        g_assert_cmpint(nkp_ekcert_write(req, der, len), ==, 0);
        g_autofree char *ekpath = g_build_filename(f->root, "ek.cert", NULL);
        g_autofree char *back = NULL;
        gsize blen = 0;
        g_assert_true(g_file_get_contents(ekpath, &back, &blen, NULL));
        g_assert_cmpmem(back, blen, der, len);
        free(der);
        free(provider);

        /* The platform certificate: platform.cert, the optsfile's values. */
        g_autoptr(GPtrArray) pa = swtpm_argv("platform", ek, f->root, VMID, extra);
        g_autoptr(nkp_ekcert_request) preq = NULL;
        g_assert_cmpint(parse(pa, &preq), ==, 0);
        g_assert_cmpint(nkp_ekcert_sign(f->ctx, preq, &der, &len, NULL), ==, 0);
        g_assert_cmpint(nkp_ekcert_write(preq, der, len), ==, 0);
        free(der);
        g_autofree char *ppath = g_build_filename(f->root, "platform.cert", NULL);
        X509 *x = read_cert(ppath);
        g_autofree char *text = cert_text(x);
        X509_free(x);
        g_assert_nonnull(strstr(text, "2.23.133.5.1.1=Acme"));
        g_assert_nonnull(strstr(text, "2.23.133.5.1.4=QEMU")); /* the default */
        g_assert_nonnull(strstr(text, "2.23.133.5.1.5=7.2"));

        /* Never through a symlink. */
        g_assert_cmpint(unlink(ekpath), ==, 0);
        g_autofree char *target = g_build_filename(f->root, "elsewhere", NULL);
        g_assert_cmpint(symlink(target, ekpath), ==, 0);
        static const uint8_t junk[] = { 1, 2, 3 };
        g_assert_cmpint(nkp_ekcert_write(req, junk, sizeof junk), ==, -ELOOP);
        assert_one_line();
        g_assert_false(g_file_test(target, G_FILE_TEST_EXISTS));

        /* A type the signer does not know: refused when signing. */
        g_autoptr(GPtrArray) ba = swtpm_argv("aik", ek, f->root, VMID, NULL);
        g_autoptr(nkp_ekcert_request) breq = NULL;
        g_assert_cmpint(parse(ba, &breq), ==, 0);
        g_assert_cmpint(nkp_ekcert_sign(f->ctx, breq, &der, &len, NULL), ==, -EINVAL);
}

/* ---- the client against a scripted signer ------------------------------------ */

typedef struct {
        int listen_fd;
        const char *answer;
        size_t answer_len;
        char *request; /* what the client sent */
} Script;

static gpointer serve_once(gpointer data)
{
        Script *s = data;
        int c = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        g_assert_cmpint(c, >=, 0);
        GString *in = g_string_new(NULL);
        char buf[1024];
        while (!g_str_has_suffix(in->str, "\n\n")) {
                ssize_t n = read(c, buf, sizeof buf);
                if (n <= 0)
                        break;
                g_string_append_len(in, buf, n);
        }
        s->request = g_string_free(in, FALSE);
        g_assert_cmpint(write(c, s->answer, s->answer_len), ==, (ssize_t) s->answer_len);
        close(c);
        return NULL;
}

static int listen_at(const char *root)
{
        g_autofree char *dir = g_build_filename(root, "run/nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(dir, 0755), ==, 0);
        g_autofree char *path = g_build_filename(dir, "ekca.sock", NULL);
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        g_assert_cmpuint(strlen(path), <, sizeof sa.sun_path);
        strcpy(sa.sun_path, path);
        (void) unlink(path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        g_assert_cmpint(fd, >=, 0);
        g_assert_cmpint(bind(fd, (struct sockaddr *) &sa, sizeof sa), ==, 0);
        g_assert_cmpint(listen(fd, 4), ==, 0);
        return fd;
}

static int ask(const char *root, const nkp_ekcert_request *req, const char *answer,
               size_t answer_len, uint8_t **der, size_t *len, char **ret_request)
{
        Script s = { .listen_fd = listen_at(root), .answer = answer, .answer_len = answer_len };
        GThread *t = g_thread_new("signer", serve_once, &s);
        int r = nkp_ekcert_request_remote(root, req, der, len);
        g_thread_join(t);
        close(s.listen_fd);
        if (ret_request)
                *ret_request = s.request;
        else
                g_free(s.request);
        return r;
}

static void test_remote(Fixture *f, gconstpointer data)
{
        (void) data;
        const char *extra[] = { "--allow-signing", NULL };
        g_autoptr(GPtrArray) a = swtpm_argv("ek", "abcd", f->root, VMID, extra);
        g_autoptr(nkp_ekcert_request) req = NULL;
        g_assert_cmpint(parse(a, &req), ==, 0);
        uint8_t *der = NULL;
        size_t len = 0;

        /* Nobody listens: an error, never "not nkp's" (-ENOENT), which would
         * give an nkp VM swtpm's local certificates. */
        g_assert_cmpint(nkp_ekcert_request_remote(f->root, req, &der, &len), ==, -ECONNREFUSED);
        g_assert_nonnull(strstr(nkp_error_message(), "is nkpd running?"));
        assert_one_line();

        static const char ok[] = "OK 3\nabc";
        g_autofree char *sent = NULL;
        g_assert_cmpint(ask(f->root, req, ok, sizeof ok - 1, &der, &len, &sent), ==, 0);
        g_assert_cmpmem(der, len, "abc", 3);
        free(der);
        der = NULL;
        /* The request carries the public fields, one per line, then an empty line. */
        g_assert_nonnull(strstr(sent, "type=ek\n"));
        g_assert_nonnull(strstr(sent, "vmid=" VMID "\n"));
        g_assert_nonnull(strstr(sent, "tpm-model=swtpm\n"));
        g_assert_nonnull(strstr(sent, "allow-signing=1\n"));
        g_assert_true(g_str_has_suffix(sent, "\n\n"));

        static const char noticket[] = "NOTICKET\n";
        g_assert_cmpint(ask(f->root, req, noticket, sizeof noticket - 1, &der, &len, NULL), ==,
                        -ENOENT);
        static const char err[] = "ERR nkp: only root and libvirt's swtpm user may ask.\n";
        g_assert_cmpint(ask(f->root, req, err, sizeof err - 1, &der, &len, NULL), ==, -EREMOTEIO);
        g_assert_cmpstr(nkp_error_message(), ==, "nkp: only root and libvirt's swtpm user may ask.");
        struct {
                const char *answer;
        } bad[] = { { "" }, { "no newline" }, { "HELLO\n" }, { "OK 10\nabc" }, { "OK 0\n" },
                    { "OK x\nabc" } };
        for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
                g_assert_cmpint(ask(f->root, req, bad[i].answer, strlen(bad[i].answer), &der,
                                    &len, NULL),
                                ==, -EPROTO);
                g_assert_null(der);
                assert_one_line();
        }
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/ekcert/argv-good", test_argv_good);
        g_test_add_func("/ekcert/argv-not-nkps", test_argv_not_nkps);
        g_test_add_func("/ekcert/argv-bad", test_argv_bad);
        g_test_add("/ekcert/sign-and-write", Fixture, NULL, setup, test_sign_and_write, teardown);
        g_test_add("/ekcert/remote", Fixture, NULL, setup, test_remote, teardown);
        return g_test_run();
}

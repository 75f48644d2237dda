/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpd's loop as a library (daemon.c, nkp.h) against libvirt's test driver
 * (test:///default: one in-process state shared by every connection of the
 * process, with domain lifecycle events):
 *  - a plain vTPM defined before the daemon starts is enrolled by the scan
 *    at connect; one defined afterwards by its "defined" event; a domain
 *    without a vTPM and one with existing clear state are left alone;
 *  - policy=off enrols nothing;
 *  - the signer socket is served by nkp_daemon_iterate (a client thread
 *    asks through nkp_ekcert_request_remote) and removed by nkp_daemon_free;
 *    one certificate per kind per ticket, the subject from the ticket, a
 *    --vmid that disagrees refused; a silent client delays no other; a uid
 *    that is not allowed is refused unread; ROOT/run/nkp made 0750 at start;
 *  - bad flags, a socket path that does not fit.
 * Not covered here: the reconnect after libvirtd restarts (the test driver
 * never closes a connection by itself; integration/t-nkp-enrol.sh runs the
 * real daemon). */
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <libvirt/libvirt.h>

#include "testutil.h"

#define URI "test:///default"

typedef struct {
        char *root;
        char *state_dir;
        nkp_context *ctx;
        NkpVirt *virt; /* the test's own connection: keeps the shared state alive */
        GString *log;
} Fixture;

static void collect_log(enum nkp_log_level level, const char *message, void *userdata)
{
        if (level == NKP_LOG_DEBUG)
                return;
        g_string_append_printf(userdata, "%s\n", message);
}

static void write_conf_user(Fixture *f, const char *swtpm_user, const char *vtpm_extra)
{
        g_autofree char *conf = g_build_filename(f->root, "etc/nkp/nkp.conf", NULL);
        g_autofree char *text = g_strdup_printf("[tpm]\ntcti=none\n[vtpm]\nstate_dir=%s\n"
                                                "swtpm_user=%s\n%s",
                                                f->state_dir, swtpm_user, vtpm_extra);
        g_assert_true(g_file_set_contents(conf, text, -1, NULL));
        nkp_context_free(f->ctx);
        f->ctx = NULL;
        g_assert_cmpint(nkp_context_new(f->root, &f->ctx), ==, 0);
}

static void write_conf(Fixture *f, const char *vtpm_extra)
{
        write_conf_user(f, "root", vtpm_extra);
}

static void setup(Fixture *f, gconstpointer data)
{
        (void) data;
        f->root = testutil_mkdtemp();
        f->state_dir = g_build_filename(f->root, "swtpm", NULL);
        g_autofree char *etc = g_build_filename(f->root, "etc/nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(etc, 0700), ==, 0);
        write_conf(f, "");
        nkp_cache_flush(f->ctx);
        f->log = g_string_new(NULL);
        nkp_set_log_func(collect_log, f->log);

        /* An active default provider: backed up once. */
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_create(f->ctx, "auto", 0, &p), ==, 0);
        g_autoptr(nkp_secret) pw = NULL;
        g_assert_cmpint(nkp_secret_new_copy("pw-for-test", 11, &pw), ==, 0);
        g_autofree char *p12 = g_build_filename(f->root, "auto.p12", NULL);
        g_assert_cmpint(nkp_provider_backup(f->ctx, "auto", p12, pw), ==, 0);
        g_assert_cmpint(nkp_provider_set_default(f->ctx, "auto"), ==, 0);

        g_assert_cmpint(nkp_virt_open(URI, 0, &f->virt), ==, 0);
}

static void teardown(Fixture *f, gconstpointer data)
{
        (void) data;
        nkp_set_log_func(NULL, NULL);
        /* Undefine what the test defined: test:///default outlives the test
         * only while a connection is open, but be tidy. */
        virConnectPtr conn = nkp_virt_connection(f->virt);
        const char *names[] = { "scan1", "event1", "novtpm", "clear1", "off1" };
        for (size_t i = 0; i < G_N_ELEMENTS(names); i++) {
                virDomainPtr dom = virDomainLookupByName(conn, names[i]);
                if (dom) {
                        virDomainUndefine(dom);
                        virDomainFree(dom);
                }
        }
        nkp_virt_close(f->virt);
        nkp_cache_flush(f->ctx);
        nkp_context_free(f->ctx);
        testutil_rmtree(f->root);
        g_free(f->root);
        g_free(f->state_dir);
        g_string_free(f->log, TRUE);
}

static void define(Fixture *f, const char *name, const char *uuid, bool vtpm)
{
        g_autofree char *xml = g_strdup_printf(
                "<domain type='test'><name>%s</name><uuid>%s</uuid><memory>65536</memory>"
                "<os><type>hvm</type></os><devices>%s</devices></domain>",
                name, uuid,
                vtpm ? "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>" : "");
        int r = nkp_virt_domain_define(f->virt, xml);
        if (r < 0)
                g_error("define %s: %s", name, nkp_error_message());
}

static bool enrolled(Fixture *f, const char *name)
{
        g_autofree char *xml = NULL;
        g_assert_cmpint(nkp_virt_domain_xml(f->virt, name, true, &xml), ==, 0);
        return strstr(xml, NKP_KEYSAFE_NS) && strstr(xml, "<encryption secret=");
}

/* Iterates until `name` is enrolled, at most ~`passes` passes. */
static bool iterate_until_enrolled(Fixture *f, nkp_daemon *d, const char *name, int passes)
{
        for (int i = 0; i < passes; i++) {
                g_assert_cmpint(nkp_daemon_iterate(d), ==, 0);
                if (enrolled(f, name))
                        return true;
        }
        return false;
}

/* A clear swtpm state file: header version 1, flags 0 (not encrypted). */
static void clear_state(Fixture *f, const char *uuid)
{
        g_autofree char *dir = g_build_filename(f->state_dir, uuid, "tpm2", NULL);
        g_assert_cmpint(g_mkdir_with_parents(dir, 0700), ==, 0);
        g_autofree char *path = g_build_filename(dir, "tpm2-00.permall", NULL);
        static const char hdr[16] = { 1, 1, 0, 10, 0, 0, 0, 0, 0, 16 };
        g_assert_true(g_file_set_contents(path, hdr, sizeof hdr, NULL));
}

static void test_enrol(Fixture *f, gconstpointer data)
{
        (void) data;
        define(f, "scan1", "11111111-1111-4111-8111-111111111111", true);
        define(f, "novtpm", "22222222-2222-4222-8222-222222222222", false);
        define(f, "clear1", "33333333-3333-4333-8333-333333333333", true);
        clear_state(f, "33333333-3333-4333-8333-333333333333");

        g_autoptr(nkp_daemon) d = NULL;
        g_assert_cmpint(nkp_daemon_new(f->ctx, URI, 0, &d), ==, 0);
        g_assert_false(enrolled(f, "scan1")); /* nothing before the first pass */
        /* The first pass connects and scans. */
        g_assert_cmpint(nkp_daemon_iterate(d), ==, 0);
        g_assert_true(enrolled(f, "scan1"));
        g_assert_false(enrolled(f, "novtpm"));
        g_assert_false(enrolled(f, "clear1"));
        g_assert_nonnull(strstr(f->log->str, "following libvirt's domain events at '" URI "'"));
        g_assert_nonnull(strstr(f->log->str, "VM 'scan1': its new vTPM is now encrypted by "
                                             "provider 'auto'"));
        g_assert_nonnull(strstr(f->log->str, "VM 'clear1' has a plain vTPM with existing clear "
                                             "state: left alone"));

        /* Defined later: its event. */
        define(f, "event1", "44444444-4444-4444-8444-444444444444", true);
        g_assert_true(iterate_until_enrolled(f, d, "event1", 5));
        /* The keysafe names the default provider. */
        g_autofree char *ks = NULL;
        g_assert_cmpint(nkp_virt_keysafe_get(f->virt, "event1", false, &ks), ==, 0);
        g_assert_nonnull(strstr(ks, "name=\"auto\""));
}

static void test_policy_off(Fixture *f, gconstpointer data)
{
        (void) data;
        write_conf(f, "policy=off\n");
        define(f, "off1", "55555555-5555-4555-8555-555555555555", true);
        g_autoptr(nkp_daemon) d = NULL;
        g_assert_cmpint(nkp_daemon_new(f->ctx, URI, 0, &d), ==, 0);
        g_assert_nonnull(strstr(f->log->str, "policy=off"));
        for (int i = 0; i < 3; i++)
                g_assert_cmpint(nkp_daemon_iterate(d), ==, 0);
        g_assert_false(enrolled(f, "off1"));
}

typedef struct {
        const char *root;
        nkp_ekcert_request *req;
        int result;
        uint8_t *der;
        size_t len;
        gint done;
} Client;

static gpointer ask(gpointer data)
{
        Client *c = data;
        c->result = nkp_ekcert_request_remote(c->root, c->req, &c->der, &c->len);
        g_atomic_int_set(&c->done, 1);
        return NULL;
}

static int ask_daemon(nkp_daemon *d, Client *c)
{
        GThread *t = g_thread_new("client", ask, c);
        for (int i = 0; i < 20 && !g_atomic_int_get(&c->done); i++)
                g_assert_cmpint(nkp_daemon_iterate(d), ==, 0);
        g_thread_join(t);
        return c->result;
}

static void test_signer(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_daemon) d = NULL;
        g_assert_cmpint(nkp_daemon_new(f->ctx, NULL, NKP_DAEMON_NO_LIBVIRT, &d), ==, 0);
        g_autofree char *sock = g_build_filename(f->root, "run/nkp/ekca.sock", NULL);
        struct stat st;
        g_assert_cmpint(stat(sock, &st), ==, 0);
        g_assert_true(S_ISSOCK(st.st_mode));
        g_assert_cmpint(st.st_mode & 0777, ==, 0660);

        const char *uuid = "66666666-6666-4666-8666-666666666666";
        g_autofree char *vmid = g_strdup_printf("vm6:%s", uuid);
        /* An RSA modulus is not checked for being a real key: 2048 bits of hex. */
        g_autofree char *ek = g_strnfill(512, 'c');
        const char *argv[] = { "x", "--type", "ek", "--ek", ek, "--dir", f->root, "--vmid", vmid,
                               "--tpm2", "--tpm-manufacturer", "id:00001014", "--tpm-model",
                               "swtpm", "--tpm-version", "id:20191023", "--tpm-spec-family",
                               "2.0", "--tpm-spec-level", "0", "--tpm-spec-revision", "164" };
        g_autoptr(nkp_ekcert_request) req = NULL;
        g_assert_cmpint(nkp_ekcert_request_from_argv(G_N_ELEMENTS(argv), (char *const *) argv,
                                                     &req),
                        ==, 0);

        /* No ticket: NOTICKET, i.e. swtpm's local CA. */
        Client c1 = { .root = f->root, .req = req };
        g_assert_cmpint(ask_daemon(d, &c1), ==, -ENOENT);
        g_assert_nonnull(strstr(f->log->str, "no ticket for 'vm6:"));

        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_get(f->ctx, "auto", &p), ==, 0);
        g_assert_cmpint(nkp_ekca_ticket_write(f->ctx, uuid, "vm6", nkp_provider_key_id(p), 300), ==, 0);
        Client c2 = { .root = f->root, .req = req };
        int r = ask_daemon(d, &c2);
        if (r < 0)
                g_error("remote: %s", nkp_error_message());
        g_assert_cmpuint(c2.len, >, 100);
        g_assert_cmpint(c2.der[0], ==, 0x30); /* a DER SEQUENCE */
        free(c2.der);
        g_assert_nonnull(strstr(f->log->str, "issued the ek certificate of 'vm6:"));

        g_clear_pointer(&d, nkp_daemon_free);
        g_assert_false(g_file_test(sock, G_FILE_TEST_EXISTS));
}

/* ---- the signer is no oracle, and nobody stalls it (issue 13) ------------------ */

#define T_UUID "7a7a7a7a-7777-4777-8777-77777777777a"
#define T_UUID_CAPS "7A7A7A7A-7777-4777-8777-77777777777A"

static nkp_ekcert_request *request(Fixture *f, const char *type, const char *ek, const char *vmid)
{
        const char *argv[] = { "x", "--type", type, "--ek", ek, "--dir", f->root, "--vmid", vmid,
                               "--tpm2", "--tpm-manufacturer", "id:00001014", "--tpm-model",
                               "swtpm", "--tpm-version", "id:20191023", "--tpm-spec-family",
                               "2.0", "--tpm-spec-level", "0", "--tpm-spec-revision", "164" };
        nkp_ekcert_request *req = NULL;
        g_assert_cmpint(nkp_ekcert_request_from_argv(G_N_ELEMENTS(argv), (char *const *) argv,
                                                     &req),
                        ==, 0);
        return req;
}

/* A real P-384 point as swtpm_setup passes an ECC EK: x=..,y=..,id=secp384r1. */
static char *ecc_ek_param(void)
{
        EVP_PKEY *k = EVP_EC_gen("P-384");
        g_assert_nonnull(k);
        uint8_t pt[97];
        size_t n = 0;
        g_assert_cmpint(EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_PUB_KEY, pt, sizeof pt,
                                                        &n),
                        ==, 1);
        g_assert_cmpuint(n, ==, 97);
        EVP_PKEY_free(k);
        GString *s = g_string_new("x=");
        for (size_t i = 1; i < 97; i++)
                g_string_append_printf(s, "%s%02x", i == 49 ? ",y=" : "", pt[i]);
        g_string_append(s, ",id=secp384r1");
        return g_string_free(s, FALSE);
}

/* Asks once; returns the result, the DER freed unless `ret_cn` wants the subject. */
static int ask_once(Fixture *f, nkp_daemon *d, nkp_ekcert_request *req, char **ret_cn)
{
        Client c = { .root = f->root, .req = req };
        int r = ask_daemon(d, &c);
        if (r == 0 && ret_cn) {
                const unsigned char *p = c.der;
                X509 *x = d2i_X509(NULL, &p, (long) c.len);
                g_assert_nonnull(x);
                char cn[512];
                g_assert_cmpint(X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName,
                                                          cn, sizeof cn),
                                >, 0);
                *ret_cn = g_strdup(cn);
                X509_free(x);
        }
        free(c.der);
        return r;
}

static void test_signer_once(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_daemon) d = NULL;
        g_assert_cmpint(nkp_daemon_new(f->ctx, NULL, NKP_DAEMON_NO_LIBVIRT, &d), ==, 0);
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_get(f->ctx, "auto", &p), ==, 0);
        g_assert_cmpint(nkp_ekca_ticket_write(f->ctx, T_UUID, "vm7", nkp_provider_key_id(p), 300),
                        ==, 0);
        g_autofree char *rsa = g_strnfill(512, 'c');
        g_autofree char *ecc = ecc_ek_param();
        /* libvirt's vmid with the UUID in capitals: the subject is still the ticket's. */
        g_autoptr(nkp_ekcert_request) ek_rsa = request(f, "ek", rsa, "vm7:" T_UUID_CAPS);
        g_autoptr(nkp_ekcert_request) ek_ecc = request(f, "ek", ecc, "vm7:" T_UUID);
        g_autoptr(nkp_ekcert_request) platform = request(f, "platform", rsa, "vm7:" T_UUID);
        g_autoptr(nkp_ekcert_request) other_name = request(f, "ek", ecc, "evil:" T_UUID);

        g_autofree char *cn = NULL;
        g_assert_cmpint(ask_once(f, d, ek_rsa, &cn), ==, 0);
        g_assert_cmpstr(cn, ==, "vm7:" T_UUID);

        /* The same kind again: refused, one line, nothing issued. */
        g_assert_cmpint(ask_once(f, d, ek_rsa, NULL), ==, -EREMOTEIO);
        g_assert_nonnull(strstr(nkp_error_message(), "already issued"));
        g_assert_null(strchr(nkp_error_message(), '\n'));

        /* A --vmid that is not the ticket's VM: refused, and the kind it asked
         * for is still there for swtpm_setup. */
        g_assert_cmpint(ask_once(f, d, other_name, NULL), ==, -EREMOTEIO);
        g_assert_nonnull(strstr(nkp_error_message(), "is not the VM whose vTPM is being made"));

        g_autofree char *ticket = g_build_filename(f->root, "run/nkp/ekca", T_UUID, NULL);
        g_assert_cmpint(ask_once(f, d, ek_ecc, NULL), ==, 0);
        g_assert_true(g_file_test(ticket, G_FILE_TEST_EXISTS));
        g_assert_cmpint(ask_once(f, d, platform, NULL), ==, 0);
        /* All three kinds issued: the ticket is gone ... */
        g_assert_false(g_file_test(ticket, G_FILE_TEST_EXISTS));
        /* ... and nkp's CA issues nothing more for this VM. */
        g_assert_cmpint(ask_once(f, d, ek_ecc, NULL), ==, -ENOENT);
        g_assert_cmpint(ask_once(f, d, platform, NULL), ==, -ENOENT);
}

typedef struct {
        const char *root;
        nkp_ekcert_request *req;
        int result;
        gint64 answered; /* monotonic µs */
        gint done;
} TimedClient;

static gpointer ask_timed(gpointer data)
{
        TimedClient *c = data;
        uint8_t *der = NULL;
        size_t len = 0;
        c->result = nkp_ekcert_request_remote(c->root, c->req, &der, &len);
        c->answered = g_get_monotonic_time();
        free(der);
        g_atomic_int_set(&c->done, 1);
        return NULL;
}

static int connect_socket(const char *root)
{
        g_autofree char *path = g_build_filename(root, "run/nkp/ekca.sock", NULL);
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        g_strlcpy(sa.sun_path, path, sizeof sa.sun_path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        g_assert_cmpint(fd, >=, 0);
        if (connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0)
                return -errno;
        return fd;
}

/* A client that connects and sends nothing does not delay the next one: the
 * second answer arrives before the first client's deadline, and the silent
 * one is dropped with one line at its deadline. */
static void test_signer_slow_client(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_daemon) d = NULL;
        g_assert_cmpint(nkp_daemon_new(f->ctx, NULL, NKP_DAEMON_NO_LIBVIRT, &d), ==, 0);
        int silent = connect_socket(f->root);
        g_assert_cmpint(silent, >=, 0);
        gint64 silent_since = g_get_monotonic_time();
        /* nkpd accepts the silent client first. */
        g_assert_cmpint(nkp_daemon_iterate(d), ==, 0);

        g_autofree char *rsa = g_strnfill(512, 'c');
        g_autoptr(nkp_ekcert_request) req = request(f, "ek", rsa, "vm8:" T_UUID);
        TimedClient c = { .root = f->root, .req = req };
        GThread *t = g_thread_new("second", ask_timed, &c);
        for (int i = 0; i < 20 && !g_atomic_int_get(&c.done); i++)
                g_assert_cmpint(nkp_daemon_iterate(d), ==, 0);
        g_thread_join(t);
        g_assert_cmpint(c.result, ==, -ENOENT); /* answered: no ticket */
        g_assert_cmpint(c.answered - silent_since, <,
                        (gint64) NKP_EKCA_CLIENT_DEADLINE_MS * 1000);

        /* The silent client: refused at its deadline, one line. */
        char buf[256] = "";
        ssize_t n = -1;
        for (int i = 0; i < 10 && n < 0; i++) {
                g_assert_cmpint(nkp_daemon_iterate(d), ==, 0);
                n = recv(silent, buf, sizeof buf - 1, MSG_DONTWAIT);
        }
        g_assert_cmpint(n, >, 0);
        buf[n] = '\0';
        g_assert_cmpstr(buf, ==, "ERR nkp: the certificate request did not arrive in time.\n");
        close(silent);
}

/* At most 16 clients at once: the 17th is told at once, not queued. */
static void test_signer_bounded(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_daemon) d = NULL;
        g_assert_cmpint(nkp_daemon_new(f->ctx, NULL, NKP_DAEMON_NO_LIBVIRT, &d), ==, 0);
        int silent[16];
        for (size_t i = 0; i < G_N_ELEMENTS(silent); i++) {
                silent[i] = connect_socket(f->root);
                g_assert_cmpint(silent[i], >=, 0);
        }
        g_assert_cmpint(nkp_daemon_iterate(d), ==, 0); /* accepts all 16 */
        int extra = connect_socket(f->root);
        g_assert_cmpint(extra, >=, 0);
        char buf[128] = "";
        ssize_t n = -1;
        for (int i = 0; i < 5 && n < 0; i++) {
                g_assert_cmpint(nkp_daemon_iterate(d), ==, 0);
                n = recv(extra, buf, sizeof buf - 1, MSG_DONTWAIT);
        }
        g_assert_cmpint(n, >, 0);
        buf[n] = '\0';
        g_assert_cmpstr(buf, ==, "ERR nkp: nkpd is busy; try again.\n");
        /* The 16 are still being read (their deadline has not come). */
        g_assert_cmpint(recv(silent[0], buf, sizeof buf, MSG_DONTWAIT), ==, -1);
        g_assert_cmpint(errno, ==, EAGAIN);
        close(extra);
        for (size_t i = 0; i < G_N_ELEMENTS(silent); i++)
                close(silent[i]);
}

/* A client of a uid that is neither root nor the swtpm user (but in its
 * group, so it can reach the socket) is refused before nkpd reads anything:
 * nkpd closes with the request unread, which the client sees as a reset
 * after the one-line refusal. */
static void test_signer_peer_refused(Fixture *f, gconstpointer data)
{
        (void) data;
        write_conf_user(f, "daemon", "");
        struct passwd *pw = getpwnam("daemon");
        g_assert_nonnull(pw);
        gid_t gid = pw->pw_gid;
        g_autoptr(nkp_daemon) d = NULL;
        g_assert_cmpint(nkp_daemon_new(f->ctx, NULL, NKP_DAEMON_NO_LIBVIRT, &d), ==, 0);
        g_autofree char *run = g_build_filename(f->root, "run", NULL);
        g_assert_cmpint(chmod(f->root, 0755), ==, 0);
        g_assert_cmpint(chmod(run, 0755), ==, 0);

        int sent[2];
        g_assert_cmpint(pipe(sent), ==, 0);
        pid_t pid = fork();
        g_assert_cmpint(pid, >=, 0);
        if (pid == 0) {
                close(sent[0]);
                if (setgroups(0, NULL) < 0 || setgid(gid) < 0 || setuid(65534) < 0)
                        _exit(10);
                int fd = connect_socket(f->root);
                if (fd < 0)
                        _exit(11);
                static const char req[] = "type=ek\nvmid=vm9:" T_UUID "\n\n";
                if (write(fd, req, sizeof req - 1) != sizeof req - 1)
                        _exit(12);
                (void) !write(sent[1], "s", 1); /* nkpd accepts only now */
                char buf[256];
                ssize_t n = read(fd, buf, sizeof buf - 1);
                if (n <= 0)
                        _exit(13);
                buf[n] = '\0';
                if (!g_str_has_prefix(buf, "ERR nkp: only root and libvirt's swtpm user"))
                        _exit(14);
                n = read(fd, buf, sizeof buf);
                _exit(n < 0 && errno == ECONNRESET ? 0 : 15); /* closed unread */
        }
        close(sent[1]);
        char b;
        g_assert_cmpint(read(sent[0], &b, 1), ==, 1);
        close(sent[0]);
        int status = 0;
        for (int i = 0; i < 20 && waitpid(pid, &status, WNOHANG) == 0; i++)
                g_assert_cmpint(nkp_daemon_iterate(d), ==, 0);
        g_assert_true(WIFEXITED(status));
        g_assert_cmpint(WEXITSTATUS(status), ==, 0);
        g_assert_nonnull(strstr(f->log->str, "Refused a certificate client of uid 65534"));
}

/* A hook that ran before nkpd made ROOT/run/nkp 0700 (nkp_mkdir_private for
 * the tickets): nkpd makes it 0750 root:<swtpm group> at start. */
static void test_signer_socket_dir(Fixture *f, gconstpointer data)
{
        (void) data;
        write_conf_user(f, "daemon", "");
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_get(f->ctx, "auto", &p), ==, 0);
        g_assert_cmpint(nkp_ekca_ticket_write(f->ctx, T_UUID, "vm7", nkp_provider_key_id(p), 300),
                        ==, 0);
        g_autofree char *dir = g_build_filename(f->root, "run/nkp", NULL);
        g_autofree char *tickets = g_build_filename(dir, "ekca", NULL);
        struct stat st;
        g_assert_cmpint(stat(dir, &st), ==, 0);
        g_assert_cmpint(st.st_mode & 07777, ==, 0700);

        g_autoptr(nkp_daemon) d = NULL;
        g_assert_cmpint(nkp_daemon_new(f->ctx, NULL, NKP_DAEMON_NO_LIBVIRT, &d), ==, 0);
        g_assert_cmpint(stat(dir, &st), ==, 0);
        g_assert_cmpint(st.st_mode & 07777, ==, 0750);
        g_assert_cmpuint(st.st_uid, ==, 0);
        g_assert_cmpuint(st.st_gid, ==, getpwnam("daemon")->pw_gid);
        g_assert_cmpint(stat(tickets, &st), ==, 0); /* the tickets stay root's alone */
        g_assert_cmpint(st.st_mode & 07777, ==, 0700);
}

static void test_bad(Fixture *f, gconstpointer data)
{
        (void) data;
        nkp_daemon *d = NULL;
        g_assert_cmpint(nkp_daemon_new(f->ctx, URI, 0x80, &d), ==, -EINVAL);
        g_assert_null(d);
        /* A root so deep that ROOT/run/nkp/ekca.sock does not fit sun_path. */
        g_autofree char *deep = g_build_filename(f->root, "a-directory-name-long-enough-to-push",
                                                 "the-socket-path-beyond-one-hundred-and",
                                                 "eight-bytes", NULL);
        g_assert_cmpint(g_mkdir_with_parents(deep, 0700), ==, 0);
        g_autoptr(nkp_context) ctx = NULL;
        g_assert_cmpint(nkp_context_new(deep, &ctx), ==, 0);
        g_assert_cmpint(nkp_daemon_new(ctx, NULL, NKP_DAEMON_NO_LIBVIRT, &d), ==, -ENAMETOOLONG);
        g_assert_null(d);
        g_assert_nonnull(strstr(nkp_error_message(), "too long"));
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add("/daemon/enrol", Fixture, NULL, setup, test_enrol, teardown);
        g_test_add("/daemon/policy-off", Fixture, NULL, setup, test_policy_off, teardown);
        g_test_add("/daemon/signer", Fixture, NULL, setup, test_signer, teardown);
        g_test_add("/daemon/signer-once", Fixture, NULL, setup, test_signer_once, teardown);
        g_test_add("/daemon/signer-slow-client", Fixture, NULL, setup, test_signer_slow_client,
                   teardown);
        g_test_add("/daemon/signer-bounded", Fixture, NULL, setup, test_signer_bounded, teardown);
        g_test_add("/daemon/signer-peer-refused", Fixture, NULL, setup, test_signer_peer_refused,
                   teardown);
        g_test_add("/daemon/signer-socket-dir", Fixture, NULL, setup, test_signer_socket_dir,
                   teardown);
        g_test_add("/daemon/bad", Fixture, NULL, setup, test_bad, teardown);
        return g_test_run();
}

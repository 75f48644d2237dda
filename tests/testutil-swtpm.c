/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "testutil-swtpm.h"
#include "testutil.h"

struct TestSwtpm {
        char *state_dir;
        char *tcti;
        int port;
        GPid pid;
};

bool testutil_swtpm_available(void)
{
        g_autofree char *p = g_find_program_in_path("swtpm");
        return p != NULL;
}

static bool port_free(int port)
{
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t) port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        bool ok = bind(fd, (struct sockaddr *) &sa, sizeof sa) == 0;
        close(fd);
        return ok;
}

static int pick_ports(void)
{
        for (int i = 0; i < 200; i++) {
                int p = g_random_int_range(20000, 60000);
                if (port_free(p) && port_free(p + 1))
                        return p;
        }
        g_error("no two free loopback ports");
}

static bool port_answers(int port)
{
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t) port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        bool ok = connect(fd, (struct sockaddr *) &sa, sizeof sa) == 0;
        close(fd);
        return ok;
}

static void child_setup(gpointer data)
{
        pid_t parent = GPOINTER_TO_INT(data);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
                _exit(1);
}

static bool spawn_on(TestSwtpm *t, int port)
{
        g_autofree char *server = g_strdup_printf("type=tcp,port=%d,bindaddr=127.0.0.1", port);
        g_autofree char *ctrl = g_strdup_printf("type=tcp,port=%d,bindaddr=127.0.0.1", port + 1);
        g_autofree char *state = g_strdup_printf("dir=%s", t->state_dir);
        g_autofree char *log = g_strdup_printf("file=%s.log", t->state_dir);
        char *argv[] = { "swtpm", "socket", "--tpm2", "--server", server, "--ctrl", ctrl,
                         "--tpmstate", state, "--log", log,
                         "--flags", "not-need-init,startup-clear", NULL };
        g_autoptr(GError) error = NULL;
        GPid pid;
        if (!g_spawn_async(NULL, argv, NULL,
                           G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD |
                                   G_SPAWN_STDOUT_TO_DEV_NULL | G_SPAWN_STDERR_TO_DEV_NULL,
                           child_setup, GINT_TO_POINTER(getpid()), &pid, &error))
                g_error("cannot start swtpm: %s", error->message);

        for (int i = 0; i < 1500; i++) { /* 15 s: a loaded CI machine */
                int status;
                if (waitpid(pid, &status, WNOHANG) == pid)
                        return false; /* exited: port taken, try another */
                if (port_answers(port + 1) && port_answers(port)) {
                        t->pid = pid;
                        t->port = port;
                        g_free(t->tcti);
                        t->tcti = g_strdup_printf("swtpm:host=127.0.0.1,port=%d", port);
                        return true;
                }
                g_usleep(10000);
        }
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        g_error("swtpm did not answer on port %d within 15 s", port);
}

TestSwtpm *testutil_swtpm_start(const char *state_dir)
{
        g_assert_true(testutil_swtpm_available());
        TestSwtpm *t = g_new0(TestSwtpm, 1);
        t->state_dir = g_strdup(state_dir);
        g_assert_cmpint(g_mkdir_with_parents(state_dir, 0700), ==, 0);
        for (int i = 0; i < 10; i++)
                if (spawn_on(t, pick_ports()))
                        return t;
        g_error("swtpm failed to start 10 times (see %s.log)", state_dir);
}

static void stop_pid(GPid pid)
{
        if (pid <= 0)
                return;
        kill(pid, SIGTERM);
        for (int i = 0; i < 500; i++) {
                if (waitpid(pid, NULL, WNOHANG) == pid)
                        return;
                g_usleep(10000);
        }
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
}

void testutil_swtpm_stop(TestSwtpm *t)
{
        if (!t)
                return;
        stop_pid(t->pid);
        g_free(t->state_dir);
        g_free(t->tcti);
        g_free(t);
}

void testutil_swtpm_restart(TestSwtpm *t)
{
        stop_pid(t->pid);
        t->pid = 0;
        if (port_free(t->port) && port_free(t->port + 1) && spawn_on(t, t->port))
                return;
        for (int i = 0; i < 10; i++)
                if (spawn_on(t, pick_ports()))
                        return;
        g_error("swtpm failed to restart");
}

const char *testutil_swtpm_tcti(const TestSwtpm *t)
{
        return t->tcti;
}

pid_t testutil_swtpm_pid(const TestSwtpm *t)
{
        return t->pid;
}

const char *testutil_swtpm_state_dir(const TestSwtpm *t)
{
        return t->state_dir;
}

void testutil_root_set_tcti(const char *root, const char *tcti)
{
        g_autofree char *etc = g_build_filename(root, "etc", "nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(etc, 0755), ==, 0);
        g_autofree char *conf = g_build_filename(etc, "nkp.conf", NULL);
        g_autofree char *text = g_strdup_printf("[tpm]\ntcti=%s\n", tcti);
        g_assert_true(g_file_set_contents(conf, text, -1, NULL));
}

char *testutil_make_root(const char *dir, const char *name, const char *tcti)
{
        char *root = g_build_filename(dir, name, NULL);
        g_assert_cmpint(g_mkdir_with_parents(root, 0755), ==, 0);
        if (tcti)
                testutil_root_set_tcti(root, tcti);
        return root;
}

void testutil_isolated(void (*body)(const char *tmpdir))
{
        if (g_test_subprocess()) {
                const char *dir = g_getenv("NKP_TEST_ISOLATED_DIR");
                g_assert_nonnull(dir);
                body(dir);
                return;
        }
        g_autofree char *dir = testutil_mkdtemp();
        g_setenv("NKP_TEST_ISOLATED_DIR", dir, TRUE);
        g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_INHERIT_STDERR);
        g_autofree char *marker = g_build_filename(dir, ".incomplete", NULL);
        g_autofree char *incomplete = NULL;
        (void) g_file_get_contents(marker, &incomplete, NULL, NULL);

        /* Whatever happened: forget the cache of every root made here. */
        GDir *d = g_dir_open(dir, 0, NULL);
        if (d) {
                const char *name;
                while ((name = g_dir_read_name(d))) {
                        g_autofree char *root = g_build_filename(dir, name, NULL);
                        g_autofree char *store = g_build_filename(root, "var/lib/nkp", NULL);
                        if (!g_file_test(store, G_FILE_TEST_IS_DIR))
                                continue;
                        nkp_context *ctx = NULL;
                        if (nkp_context_new(root, &ctx) == 0) {
                                (void) nkp_cache_flush(ctx);
                                nkp_context_free(ctx);
                        }
                }
                g_dir_close(d);
        }
        testutil_rmtree(dir);
        g_unsetenv("NKP_TEST_ISOLATED_DIR");
        if (incomplete) {
                g_test_incomplete(incomplete);
                return;
        }
        g_test_trap_assert_passed();
}

void testutil_incomplete(const char *msg)
{
        const char *dir = g_getenv("NKP_TEST_ISOLATED_DIR");
        if (dir) {
                g_autofree char *marker = g_build_filename(dir, ".incomplete", NULL);
                (void) g_file_set_contents(marker, msg, -1, NULL);
        }
        g_test_incomplete(msg);
}

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Network binding of a provider (Tang servers, through Clevis).
 *
 * A bound provider's key material at rest (the KDK itself when the host has
 * no TPM, else the TPM-sealed blob) is kept only inside a Clevis JWE made by
 * `clevis encrypt sss '{"t":T,"pins":{"tang":[{"url":U1},…]}}' -y`; opening
 * it needs T of the Tang servers (McCallum-Relyea exchange: the servers
 * never see the key) and then, for a TPM provider, this host's TPM.  So a
 * stolen host (disk and TPM) opens nothing away from the network that holds
 * the Tang servers, and a stolen disk alone opens nothing anywhere.  The
 * JWE is Clevis's own format: an administrator recovers the material by
 * hand with `clevis decrypt` (docs/network-binding.md).
 *
 * The material crosses into clevis on its stdin and comes back on its
 * stdout (pipes; never argv, the environment or a file).  The servers and
 * the threshold are not secret and go on argv.  Every run is bounded: the
 * process group is killed after the timeout, so a black-holed server costs
 * seconds, not a hung VM start.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "nkp-private.h"

#define CLEVIS_TIMEOUT_MS 15000
#define OUT_MAX (64 * 1024)
#define ERR_MAX 4096
/* The child's PATH: the hook runs with libvirtd's environment, which may
 * have none; clevis finds its pins (clevis-decrypt-tang, curl, jose) on it. */
static const char *const child_env[] = { "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                         "LC_ALL=C", NULL };

/* ---- the binding policy -------------------------------------------------------- */

void nkp_binding_free(NkpBinding *b)
{
        if (!b)
                return;
        g_strfreev(b->servers);
        g_free(b);
}

/* A URL nkp passes to clevis: http(s)://, no character that would need
 * quoting in the JSON config or the shell, at most 255 bytes. */
static bool url_valid(const char *u)
{
        if (!g_str_has_prefix(u, "http://") && !g_str_has_prefix(u, "https://"))
                return false;
        size_t len = strlen(u);
        if (len > 255 || len <= strlen("http://"))
                return false;
        for (size_t i = 0; i < len; i++)
                if (!g_ascii_isalnum(u[i]) && !strchr("-._~:/?#[]@!$&()*+,;=%", u[i]))
                        return false;
        return true;
}

int nkp_binding_parse(const char *spec, unsigned threshold, NkpBinding **ret)
{
        if (!spec || !g_str_has_prefix(spec, "tang:"))
                return nkp_fail(-EINVAL, "The binding '%s' is not understood; write it as "
                                         "tang:URL[,URL…] (e.g. tang:http://tang1.example,http://tang2.example).",
                                spec ? spec : "");
        g_auto(GStrv) urls = g_strsplit(spec + strlen("tang:"), ",", -1);
        guint n = g_strv_length(urls);
        if (n == 0 || n > NKP_TANG_MAX)
                return nkp_fail(-EINVAL, "A binding names 1 to %d Tang servers, not %u.", NKP_TANG_MAX, n);
        for (guint i = 0; i < n; i++) {
                if (!url_valid(urls[i]))
                        return nkp_fail(-EINVAL, "'%s' is not a Tang server URL nkp accepts (http:// or "
                                                 "https://, no spaces or quotes).",
                                        urls[i]);
                for (guint j = 0; j < i; j++)
                        if (strcmp(urls[i], urls[j]) == 0)
                                return nkp_fail(-EINVAL, "The Tang server '%s' is named twice.", urls[i]);
        }
        if (threshold == 0)
                threshold = 1;
        if (threshold > n)
                return nkp_fail(-EINVAL, "The threshold %u is more than the %u Tang server%s named.",
                                threshold, n, n == 1 ? "" : "s");
        NkpBinding *b = g_new0(NkpBinding, 1);
        b->servers = g_steal_pointer(&urls);
        b->threshold = threshold;
        *ret = b;
        return 0;
}

char *nkp_binding_describe(const NkpBinding *b)
{
        g_autofree char *list = g_strjoinv(", ", b->servers);
        return g_strdup_printf("Tang, %u of %s", b->threshold, list);
}

/* ---- running clevis with the material on pipes ---------------------------------- */

static void child_setup(gpointer unused)
{
        (void) unused;
        setpgid(0, 0); /* its own group: a timeout kills curl and the pins too */
}

static int64_t now_ms(void)
{
        return g_get_monotonic_time() / 1000;
}

/* Writes all of `in` to `fd` with SIGPIPE blocked (a child that exits
 * early makes it EPIPE, not a dead caller). */
static int write_all_nosigpipe(int fd, const void *in, size_t len)
{
        sigset_t block, old;
        sigemptyset(&block);
        sigaddset(&block, SIGPIPE);
        pthread_sigmask(SIG_BLOCK, &block, &old);
        int r = 0;
        const uint8_t *p = in;
        while (len > 0) {
                ssize_t w = write(fd, p, len);
                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0) {
                        r = -errno;
                        break;
                }
                p += w;
                len -= (size_t) w;
        }
        if (r == -EPIPE) {
                struct timespec zero = { 0, 0 };
                (void) sigtimedwait(&block, NULL, &zero);
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        return r;
}

/* Runs `argv` (argv[0] found on child_env's PATH) with `in` on its stdin;
 * its stdout into *ret_out (a secret, at most OUT_MAX bytes, not empty;
 * NULL: discarded), the first
 * line of its stderr into *ret_err.  Returns 0 when it exited 0, -ETIMEDOUT
 * (killed) after `timeout_ms`, -EIO for another exit.  Never fails for
 * what the program said: the caller words that. */
static int run_piped(const char *const *argv, const void *in, size_t in_len, int timeout_ms,
                     nkp_secret **ret_out, char **ret_err)
{
        GPid pid = 0;
        int fd_in = -1, fd_out = -1, fd_err = -1;
        g_autoptr(GError) error = NULL;
        if (!g_spawn_async_with_pipes_and_fds(NULL, argv, child_env,
                                              G_SPAWN_SEARCH_PATH_FROM_ENVP | G_SPAWN_DO_NOT_REAP_CHILD |
                                                      G_SPAWN_CLOEXEC_PIPES,
                                              child_setup, NULL, -1, -1, -1, NULL, NULL, 0, &pid, &fd_in,
                                              &fd_out, &fd_err, &error))
                return nkp_fail(-ENOENT, "Cannot run %s: %s (install the clevis and curl packages).",
                                argv[0], error->message);

        int r = write_all_nosigpipe(fd_in, in, in_len);
        close(fd_in);
        (void) r; /* a child that did not read its input fails below */

        g_autoptr(nkp_secret) out = NULL;
        r = nkp_secret_new(OUT_MAX, &out);
        size_t out_len = 0;
        char err[ERR_MAX];
        size_t err_len = 0;
        int64_t deadline = now_ms() + timeout_ms;
        bool out_open = true, err_open = true, timed_out = false;
        while (r == 0 && (out_open || err_open)) {
                struct pollfd pfd[2] = { { out_open ? fd_out : -1, POLLIN, 0 },
                                         { err_open ? fd_err : -1, POLLIN, 0 } };
                int64_t left = deadline - now_ms();
                if (left <= 0) {
                        timed_out = true;
                        break;
                }
                int n = poll(pfd, 2, (int) left);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = -errno;
                        break;
                }
                if (out_open && pfd[0].revents) {
                        ssize_t k = out_len < OUT_MAX
                                            ? read(fd_out, nkp_secret_data_mut(out) + out_len, OUT_MAX - out_len)
                                            : 0;
                        if (k <= 0)
                                out_open = false;
                        else
                                out_len += (size_t) k;
                }
                if (err_open && pfd[1].revents) {
                        char sink[512];
                        ssize_t k = read(fd_err, sink, sizeof sink);
                        if (k <= 0) {
                                err_open = false;
                        } else {
                                size_t take = MIN((size_t) k, sizeof err - 1 - err_len);
                                memcpy(err + err_len, sink, take);
                                err_len += take;
                        }
                }
        }
        close(fd_out);
        close(fd_err);
        if (timed_out)
                kill(-pid, SIGKILL);
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        g_spawn_close_pid(pid);
        err[err_len] = '\0';
        char *nl = strchr(err, '\n');
        if (nl)
                *nl = '\0';
        if (ret_err)
                *ret_err = g_strdup(g_strstrip(err));
        if (r < 0)
                return nkp_fail(r, "Cannot talk to %s: %s.", argv[0], g_strerror(-r));
        if (timed_out)
                return -ETIMEDOUT;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                return -EIO;
        if (!ret_out)
                return 0;
        if (out_len == 0)
                return nkp_fail(-EBADMSG, "%s %s wrote nothing.", argv[0], argv[1]);
        return nkp_secret_new_copy(nkp_secret_data(out), out_len, ret_out);
}

/* ---- wrap / unwrap -------------------------------------------------------------- */

static char *sss_config(const NkpBinding *b)
{
        g_autoptr(GString) s = g_string_new(NULL);
        g_string_append_printf(s, "{\"t\":%u,\"pins\":{\"tang\":[", b->threshold);
        for (size_t i = 0; b->servers[i]; i++)
                g_string_append_printf(s, "%s{\"url\":\"%s\"}", i ? "," : "", b->servers[i]);
        g_string_append(s, "]}}");
        return g_string_free(g_steal_pointer(&s), FALSE);
}

int nkp_tang_wrap(const NkpBinding *b, const void *data, size_t len, char **ret_jwe)
{
        g_autofree char *config = sss_config(b);
        g_autofree char *desc = nkp_binding_describe(b);
        const char *argv[] = { "clevis", "encrypt", "sss", config, "-y", NULL };
        g_autoptr(nkp_secret) out = NULL;
        g_autofree char *err = NULL;
        int r = run_piped(argv, data, len, CLEVIS_TIMEOUT_MS, &out, &err);
        if (r == -ETIMEDOUT || r == -EIO)
                return nkp_fail(-EHOSTUNREACH,
                                "Cannot bind to the Tang servers (%s): %s; check that they answer "
                                "(curl URL/adv) and try again.",
                                desc, r == -ETIMEDOUT ? "no answer in time" : (err && err[0] ? err : "clevis failed"));
        if (r < 0)
                return r;
        /* A compact JWE: five base64url parts, nothing else. */
        size_t n = nkp_secret_len(out);
        const char *p = (const char *) nkp_secret_data(out);
        while (n > 0 && (p[n - 1] == '\n' || p[n - 1] == '\r'))
                n--;
        unsigned dots = 0;
        for (size_t i = 0; i < n; i++) {
                if (p[i] == '.')
                        dots++;
                else if (!g_ascii_isalnum(p[i]) && p[i] != '-' && p[i] != '_')
                        return nkp_fail(-EBADMSG, "clevis encrypt wrote something that is not a compact JWE.");
        }
        if (dots != 4 || n > NKP_JWE_MAX)
                return nkp_fail(-EBADMSG, "clevis encrypt wrote something that is not a compact JWE.");
        *ret_jwe = g_strndup(p, n);
        return 0;
}

int nkp_tang_unwrap(const char *jwe, const char *provider, const NkpBinding *b, nkp_secret **ret)
{
        g_autofree char *desc = nkp_binding_describe(b);
        const char *argv[] = { "clevis", "decrypt", NULL };
        g_autofree char *err = NULL;
        g_autoptr(nkp_secret) out = NULL;
        int r = run_piped(argv, jwe, strlen(jwe), CLEVIS_TIMEOUT_MS, &out, &err);
        if (r == -ETIMEDOUT || r == -EIO)
                return nkp_fail(-EHOSTUNREACH,
                                "Provider '%s' is bound to the network (%s) and too few of its Tang "
                                "servers answered (%s); it stays locked until they do: restore the "
                                "network to them, then run nkpctl host unlock.",
                                provider, desc,
                                r == -ETIMEDOUT ? "no answer in time" : (err && err[0] ? err : "clevis decrypt failed"));
        if (r < 0)
                return r;
        if (nkp_secret_len(out) == 0)
                return nkp_fail(-EBADMSG, "The network binding of provider '%s' opened to nothing; the store "
                                          "is damaged: restore the provider from its backup.",
                                provider);
        *ret = g_steal_pointer(&out);
        return 0;
}

int nkp_tang_probe(const char *url, unsigned timeout_ms)
{
        if (!url || !url_valid(url))
                return nkp_fail(-EINVAL, "'%s' is not a Tang server URL.", url ? url : "");
        g_autofree char *adv = g_strdup_printf("%s/adv", url);
        g_autofree char *max = g_strdup_printf("%u.%03u", timeout_ms / 1000, timeout_ms % 1000);
        const char *argv[] = { "curl", "-sfg", "-m", max, "-o", "/dev/null", adv, NULL };
        int r = run_piped(argv, "", 0, (int) timeout_ms + 1000, NULL, NULL);
        if (r == -ETIMEDOUT || r == -EIO)
                return nkp_fail(-EHOSTUNREACH, "The Tang server %s does not answer.", url);
        return r;
}

/* ---- providers ------------------------------------------------------------------- */


/* A fresh store entry for `kdk` (sealed to the TPM when there is one),
 * bound to `b` when not NULL: its material moves into the JWE. */
static int entry_new_bound(nkp_context *ctx, const char *name, const char *key_id, unsigned flags,
                           int64_t created, const nkp_secret *kdk, const NkpBinding *b, NkpStoreEntry **ret)
{
        g_autoptr(NkpStoreEntry) e = NULL;
        int r = nkp_store_entry_new(ctx, name, key_id, flags, created, kdk, &e);
        if (r < 0)
                return r;
        if (b) {
                char *jwe = NULL;
                if (e->seal == NKP_SEAL_NONE)
                        r = nkp_tang_wrap(b, nkp_secret_data(e->kdk), nkp_secret_len(e->kdk), &jwe);
                else
                        r = nkp_tang_wrap(b, g_bytes_get_data(e->tpm_blob, NULL), g_bytes_get_size(e->tpm_blob),
                                          &jwe);
                if (r < 0)
                        return nkp_fail_prefix(r, "Provider '%s' was not bound (nothing was written)", name);
                e->bind_jwe = jwe;
                e->bind = g_new0(NkpBinding, 1);
                e->bind->servers = g_strdupv(b->servers);
                e->bind->threshold = b->threshold;
                g_clear_pointer(&e->kdk, nkp_secret_free);
                g_clear_pointer(&e->tpm_blob, g_bytes_unref);
        }
        *ret = g_steal_pointer(&e);
        return 0;
}

int nkp_provider_create_bound(nkp_context *ctx, const char *name, unsigned flags, const char *bind,
                              unsigned threshold, nkp_provider **ret)
{
        if (!ctx)
                return nkp_fail(-EINVAL, "A provider needs a context.");
        if (!bind || !nkp_provider_name_valid(name))
                return nkp_provider_create(ctx, name, flags, ret); /* unbound, or its message */
        if (flags & ~(unsigned) NKP_PROVIDER_REQUIRE_TPM)
                return nkp_fail(-EINVAL, "A new provider can only be created with the require-tpm flag.");
        g_autoptr(NkpBinding) b = NULL;
        int r = nkp_binding_parse(bind, threshold, &b);
        if (r < 0)
                return r;
        {
                g_autoptr(NkpStore) store = NULL;
                r = nkp_store_load(ctx, &store);
                if (r < 0)
                        return r;
                if (nkp_store_find(store, name))
                        return nkp_fail(-EEXIST, "A provider named '%s' already exists; pick another name.",
                                        name);
        }
        g_autoptr(nkp_secret) kdk = NULL;
        r = nkp_secret_new_random(NKP_KDK_SIZE, &kdk);
        if (r < 0)
                return r;
        char key_id[NKP_UUID_STRING_LEN + 1];
        nkp_uuid_random(key_id);
        NkpStoreEntry *e = NULL;
        r = entry_new_bound(ctx, name, key_id, flags, g_get_real_time() / G_USEC_PER_SEC, kdk, b, &e);
        if (r < 0)
                return r;
        return nkp_store_add_provider(ctx, e, kdk, ret);
}

int nkp_provider_rebind(nkp_context *ctx, const char *name, const char *bind, unsigned threshold)
{
        if (!ctx || !name)
                return nkp_fail(-EINVAL, "A rebind needs a provider name.");
        g_autoptr(NkpBinding) b = NULL;
        int r = 0;
        if (bind && strcmp(bind, "none") != 0) {
                r = nkp_binding_parse(bind, threshold, &b);
                if (r < 0)
                        return r;
        }
        char key_id[NKP_UUID_STRING_LEN + 1];
        unsigned flags;
        int64_t created;
        {
                g_autoptr(NkpStore) store = NULL;
                r = nkp_store_load(ctx, &store);
                if (r < 0)
                        return r;
                const NkpStoreEntry *cur = nkp_store_find(store, name);
                if (!cur)
                        return nkp_fail(-ENOENT, "There is no provider named '%s' (see: nkpctl provider list).",
                                        name);
                g_strlcpy(key_id, cur->key_id, sizeof key_id);
                flags = cur->flags;
                created = cur->created;
        }
        /* The KDK (from the key cache, or opened through the current
         * binding): it does not change, so no VM is touched.  The material
         * at rest is made afresh: a new TPM seal, a new JWE under the
         * servers' current keys (after tangd-rotate-keys, the new ones). */
        g_autoptr(nkp_secret) kdk = NULL;
        r = nkp_provider_get_kdk(ctx, key_id, &kdk);
        if (r < 0)
                return r;
        NkpStoreEntry *e = NULL;
        r = entry_new_bound(ctx, name, key_id, flags, created, kdk, b, &e);
        if (r < 0)
                return r;
        return nkp_store_replace(ctx, e, kdk);
}

/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Helpers shared by the unit tests. */
#ifndef NKP_TESTUTIL_H
#define NKP_TESTUTIL_H

#include <glib.h>

#include "nkp-private.h"

/* A fresh empty directory under $TMPDIR, removed by testutil_rmtree(). */
char *testutil_mkdtemp(void);
void testutil_rmtree(const char *path);

/* The path of a vectors file in $NKP_VECTORS_DIR (tests/vectors/); a
 * missing file aborts the test (the vectors live in the tree). */
char *testutil_vector_path(const char *file);

/* A snapshot of every file under `dir` (relative path -> contents+mode), to
 * prove that a failed operation changed nothing. */
GHashTable *testutil_snapshot_tree(const char *dir);
void testutil_assert_same_tree(GHashTable *before, const char *dir);

/* A g_test fixture: a throwaway root whose config says "no TPM" (whatever
 * the machine has) and its context; the root's key cache is flushed before
 * and after, and the root removed. */
typedef struct {
        char *root;
        nkp_context *ctx;
} TestutilRoot;
void testutil_root_setup(TestutilRoot *f, gconstpointer data);

/* Runs argv (PATH searched): 0 when it exits 0, else 1 with its output in
 * the test log; its stdout+stderr in *out when `out` is not NULL. */
int testutil_run_tool(const char *const *argv, char **out);
/* A `qemu-img create` (or convert) that makes a LUKS layer: QEMU 7.2's
 * PBKDF benchmark fails with "Unable to get accurate CPU usage" when a
 * tick-accounted thread reads 0 ms (tools.c); pass encrypt.hash-alg=sha512
 * as nkp does (slower rounds, almost never 0 ms) and this retries the rest
 * with nkp's growing pause.  0 on success, else 1 (output in the log). */
int testutil_run_luks_create(const char *const *argv);
/* qemu-img and qemu-io both installed (the tests that use the real ones). */
bool testutil_have_qemu_tools(void);

/* The context of `root` with ROOT/etc/nkp/nkp.conf written first: `conf`,
 * or NULL for "[tpm] tcti=none" (the machine's TPM never used). */
nkp_context *testutil_context_with_conf(const char *root, const char *conf);
/* Provider `name` created in the store of `ctx` and made the backed-up
 * default: what the VM commands pick without asking. */
void testutil_default_provider(nkp_context *ctx, const char *name);
void testutil_root_teardown(TestutilRoot *f, gconstpointer data);

/* Hex helpers for known-answer vectors. */
GBytes *testutil_unhex(const char *hex);

/* Opens libvirt's test driver on a node written under `root` with one
 * shut-off domain "vm1" (UUID `uuid`) whose qcow2 disk vda is `disk`
 * (the VM the library-level snapshot/clone tests encrypt).  Aborts the
 * test on failure. */
nkp_virt *testutil_test_driver_vm1(const char *root, const char *uuid, const char *disk);

#endif

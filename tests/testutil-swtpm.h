/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Throwaway swtpm instances playing a host's TPM, test roots, and a runner
 * that cleans up after a test even when it fails. */
#ifndef NKP_TESTUTIL_SWTPM_H
#define NKP_TESTUTIL_SWTPM_H

#include <stdbool.h>
#include <sys/types.h>

typedef struct TestSwtpm TestSwtpm;

/* true when the swtpm program is installed. */
bool testutil_swtpm_available(void);

/* Starts `swtpm socket --tpm2` on free loopback ports with its state in
 * `state_dir` (created when missing, kept by stop) and waits until it
 * answers.  The process is killed when the test process dies
 * (PR_SET_PDEATHSIG), so a failing test leaves none behind. */
TestSwtpm *testutil_swtpm_start(const char *state_dir);
/* Stops it by PID (SIGTERM, then SIGKILL after 5 s) and frees `t`. */
void testutil_swtpm_stop(TestSwtpm *t);
/* Stops and starts it again on the same state ("reboot" of the TPM).  The
 * port may change: re-read the TCTI. */
void testutil_swtpm_restart(TestSwtpm *t);
const char *testutil_swtpm_tcti(const TestSwtpm *t);
pid_t testutil_swtpm_pid(const TestSwtpm *t);
const char *testutil_swtpm_state_dir(const TestSwtpm *t);

/* Creates DIR/name (a host root) with ROOT/etc/nkp/nkp.conf holding
 * `[tpm] tcti=` (no config at all when `tcti` is NULL). */
char *testutil_make_root(const char *dir, const char *name, const char *tcti);
void testutil_root_set_tcti(const char *root, const char *tcti);

/* Runs `body(tmpdir)` in a subprocess (g_test_trap_subprocess) with a fresh
 * temporary directory; afterwards, whether it passed or not, flushes the key
 * cache of every root made under that directory, removes it, and asserts
 * that the body passed.  Call it from a test function registered with
 * g_test_add_func(); `body` must make its roots directly under tmpdir. */
void testutil_isolated(void (*body)(const char *tmpdir));
/* From inside an isolated body: marks the test incomplete (TODO) with the
 * reason, in the subprocess and in the parent. */
void testutil_incomplete(const char *msg);

#endif

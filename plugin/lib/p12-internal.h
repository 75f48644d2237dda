/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Internals of backup.c for its fuzz target and unit tests only.  Not
 * installed, not used by the rest of the library.
 */
#ifndef NKP_P12_INTERNAL_H
#define NKP_P12_INTERNAL_H

#include "nkp-private.h"

/* The OIDs nkp mints for its backups, under its own UUID arc
 * 2.25.<UUID 1d9262c2-5675-41ca-8ab7-21ceec4c886b as a decimal integer>
 * (ITU-T X.667: anyone may mint OIDs under a random UUID). */
#define NKP_OID_ARC "2.25.39307690292270796634548669200972154987"
/* secretBag secretTypeId: "the raw 32-byte KDK of an nkp provider", v1. */
#define NKP_OID_SECRET_KDK NKP_OID_ARC ".1.1"
/* Bag attribute: the provider key id, a UTF8String UUID (lower case). */
#define NKP_OID_ATTR_KEY_ID NKP_OID_ARC ".2.1"
/* Bag attribute: the provider flags, a UTF8String: "" or "require-tpm"
 * (a comma-separated list of words; unknown words are refused). */
#define NKP_OID_ATTR_FLAGS NKP_OID_ARC ".2.2"
/* secretBag secretTypeId: "share i of an m-of-n split of an nkp provider's
 * KDK" (libgfshare, GF(256), 32 bytes), v1.  Its bag carries the three
 * attributes above and the four below, every one a UTF8String. */
#define NKP_OID_SECRET_SHARE NKP_OID_ARC ".1.2"
/* "I/N": share number I (1..N) of N. */
#define NKP_OID_ATTR_SHARE NKP_OID_ARC ".2.3"
/* "M": any M shares rebuild the KDK. */
#define NKP_OID_ATTR_THRESHOLD NKP_OID_ARC ".2.4"
/* The split id, a UUID (lower case) drawn for each split. */
#define NKP_OID_ATTR_SPLIT NKP_OID_ARC ".2.5"
/* The fingerprint of the whole KDK, 64 lower-case hex digits. */
#define NKP_OID_ATTR_FINGERPRINT NKP_OID_ARC ".2.6"

/* nkp_p12_import() with another cap on the iteration counts (the fuzz
 * target uses a low one so that it does not spend its time in PBKDF2). */
int nkp_p12_import_capped(const void *der, size_t len, const nkp_secret *password,
                          uint64_t max_iterations, NkpBackupInfo *ret_info, nkp_secret **ret_kdk);

/* The part of nkp_p12_import that runs after the MAC: finds and validates
 * the nkp secret bag in a DER SafeContents (what an encrypted safe holds).
 * For the fuzz target, which cannot get past a MAC by mutation alone.
 * -EBADMSG also when there is no nkp bag. */
int nkp_p12_scan_safecontents(const void *der, size_t len, NkpBackupInfo *ret_info, nkp_secret **ret_kdk);

#endif
